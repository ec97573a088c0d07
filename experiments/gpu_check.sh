#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA, torch and triton of its own and no network
# (the `device` tool's machines). Their image lacks omegaconf, so bring its wheels once:
#   python -m pip download --no-deps -d .gpu_wheels omegaconf==2.3.1
#   python -m pip wheel --no-deps -w .gpu_wheels antlr4-python3-runtime==4.9.3   # PyPI has only its sources
# and, for the official D2DMoE kernels beside ours, a checkout of github.com/bartwojcik/D2DMoE in .peer/D2DMoE
# (ignored by git; carry it), e.g. from `fetch`'s mirror: git --git-dir=<mirror> archive HEAD | tar -x -C .peer/D2DMoE
#   bash experiments/gpu_check.sh        # there, carrying .gpu_wheels and .peer
# IMPLS=fused skips the gather path's eager tables, IMPLS= both executions' (the CUDA graph tables stay).
# PEER_CONFIGS: about this many of each peer kernel's autotuning configs (default 12; "all" is about 100 each,
# each compiled on a fresh machine: minutes).
# 1. the fused Triton kernel, the grouped-GEMM execution and the peer kernels against the masked path on the GPU;
# 2. the fused layer in a CUDA graph against eager; the layer benchmark, fused kernel (with grouped, masked and the
#    peer's two kernels on the same masks) and gather path, float32 and bfloat16, and again as CUDA graph
#    replays, into $OUT (or benchmark/);
# 3. the whole converted model at BERT-base size (12 layers, batch 64 x 128) at an expert fraction of 0.1;
# 4. where a fused layer's time goes: torch.profiler's GPU kernels for one BERT-base-sized layer.
# Back here, plot one with: python experiments/fig_wallclock.py --input FILE --name fig_wallclock_cuda
set -euo pipefail
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
python3 -c "import omegaconf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
out=${OUT:-benchmark}
python3 - <<'PY'
import torch

from tests.test_fused import check_fused_equals_masked, check_fused_in_cuda_graph

torch.backends.cuda.matmul.allow_tf32 = False  # the kernel follows torch's setting; compare exactly
check_fused_equals_masked("cuda")
print("fused == masked on", torch.cuda.get_device_name(), "torch", torch.__version__)
check_fused_in_cuda_graph()
print("fused in a CUDA graph == fused eager")
from tests.test_moe import check_grouped_equals_masked

check_grouped_equals_masked("cuda", torch.bfloat16)
print("grouped == masked (bfloat16)")
PY
peer=()
if [ -d .peer/D2DMoE ]; then
  python3 -c "from tests.test_peer import check_peer_equals_masked as c; c('.peer/D2DMoE', 'cuda'); print('peer == masked')"
  peer=(--peer .peer/D2DMoE)
  [ "${PEER_CONFIGS:-12}" = all ] || peer+=(--peer-configs "${PEER_CONFIGS:-12}")
fi
for dtype in bfloat16 float32; do
  for impl in ${IMPLS-fused gather}; do
    also=()
    [ "$impl" = fused ] && also=(--also grouped,masked "${peer[@]}")
    python3 experiments/bench_wallclock.py --device cuda --impl "$impl" --dtype "$dtype" --repeats 20 "${also[@]}" \
      --out "$out/bench_wallclock_cuda_${impl}_${dtype}.json"
  done
  python3 experiments/bench_wallclock.py --device cuda --cuda-graph --dtype "$dtype" --repeats 20 "${peer[@]}" \
    --out "$out/bench_wallclock_cuda_graph_fused_${dtype}.json"
done
python3 experiments/bench_wallclock.py --device cuda --synthetic-model --dtype bfloat16 --repeats 10 \
  --out "$out/bench_wallclock_cuda_model_bfloat16.json"
python3 - <<'PY'
import torch

from experiments.bench_wallclock import layer_pair

for dtype in (torch.float32, torch.bfloat16):
    for E in (128, 32):
        _, moe = layer_pair(768, 3072, E, "cuda", dtype, "fused")
        x = torch.randn(32, 128, 768, device="cuda", dtype=dtype)  # [B, T, d]
        mask = torch.rand(32, 128, E, device="cuda") < 0.25
        moe.gate = lambda scores, m=mask: m  # a quarter of the experts, at random
        with torch.inference_mode():
            for _ in range(3):
                moe(x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    moe(x)
                torch.cuda.synchronize()
        print(f"\nfused layer, d=768, d_ff=3072, {E} experts, 1/4 of them per token, {dtype}, 10 calls:")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))
PY
