#!/usr/bin/env bash
# Every paper figure: each experiment's sweep (phases shared between figures train once, in
# artifacts/), then its figure script, writing figures/<name>.png and .pdf.
#   bash experiments/all_figures.sh                    # all of them
#   bash experiments/all_figures.sh fig_main           # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A SCRIPT=(
  [fig_main]="experiments/fig_main.py"
  [fig_main_vit]="experiments/fig_main.py"  # each family's sweep adds its panel to fig_main
  [fig_main_gpt2]="experiments/fig_main.py"
  [fig_motivation]="experiments/fig_motivation.py"
  [fig_expert_use]="experiments/fig_expert_use.py"
  [fig_patch_map]="experiments/fig_patch_map.py"
  [fig_ablation_phases]="experiments/fig_ablations.py phases"
  [fig_ablation_alpha]="experiments/fig_ablations.py alpha"
  [fig_ablation_expert_size]="experiments/fig_ablations.py expert_size"
  [fig_ablation_activation]="experiments/fig_ablations.py activation"
  [fig_ablation_attention]="experiments/fig_ablations.py attention"
)
ORDER=(fig_main fig_main_vit fig_main_gpt2 fig_motivation fig_expert_use fig_ablation_phases fig_ablation_alpha
       fig_ablation_expert_size fig_ablation_activation fig_ablation_attention fig_patch_map)
for name in "${@:-${ORDER[@]}}"; do
  [[ -n "${SCRIPT[$name]:-}" ]] || { echo "unknown figure $name; known: ${ORDER[*]}" >&2; exit 2; }
  echo "== $name: $(date -u +%T)"
  python run.py -m "experiment=$name"
  [[ -n "${SWEEPS_ONLY:-}" ]] || python ${SCRIPT[$name]}
done
