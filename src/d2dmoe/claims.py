"""The paper's claims, one row each: the figure JSON that measures it, how its numbers read, and a
verdict worded to what the intervals support.

A margin (evidence.summarise: positive = the claimed side better) supports a claim where its 95%
interval lies above 0 (`reproduced`), contradicts it where the interval lies below 0 (`not
reproduced`), and decides nothing where it holds 0 (`inconclusive`). A claim read at several places
(panels, costs, steps) is reproduced where each place reproduces it, not reproduced where one
contradicts it, and inconclusive otherwise. A claim whose figure has no committed data is `pending`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .evidence import describe

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PENDING = "reproduced", "not reproduced", "inconclusive", "pending"
SAVING = 0.6  # "up to 60% of the cost saved within about one point"


@dataclass(frozen=True)
class Finding:
    where: str  # model/data, an ablation step, ...
    measured: str  # the numbers, with their intervals and seeds
    verdict: str


def verdict(row: dict | None, flip: bool = False) -> str:
    """A margin row's verdict (flip: the claim says the margin is negative)."""
    if row is None or row.get("lo") is None:
        return INCONCLUSIVE
    lo, hi = (-row["hi"], -row["lo"]) if flip else (row["lo"], row["hi"])
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE


def overall(verdicts: list[str]) -> str:
    if not verdicts:
        return PENDING
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def margin_text(row: dict | None, metric: str, cost: str) -> str:
    return f"at rel_cost {cost}: {describe(row, 'margin', metric)}"


def main_margins(panels: dict) -> list[Finding]:
    """D2DMoE minus MoEfication per panel, at each checked cost; MoEfication ahead anywhere contradicts."""
    out = []
    for panel, s in panels.items():
        m, metric = s["d2dmoe_minus_moefication"], s["metric"]
        rows = {c: r for c, r in m["at"].items() if r is not None}
        verdicts = [verdict(r) for r in rows.values()]
        lead = m["moefication_leads_excluding_0"]
        if lead:
            verdicts.append(NOT_REPRODUCED)
        said = "; ".join(margin_text(r, metric, c) for c, r in rows.items())
        said += "; MoEfication ahead with an interval excluding 0: " + ("nowhere" if lead is None else
                                                                       f"{lead[0]:.3f} to {lead[1]:.3f}")
        out.append(Finding(f"`{panel}`, seeds {', '.join(map(str, s['seeds']))}", said, overall(verdicts)))
    return out


def saving(panels: dict) -> list[Finding]:
    """The cheapest point within the bar (chosen on validation), as the share of cost saved."""
    out = []
    for panel, s in panels.items():
        c, metric = s["cheapest_within"], s["metric"]
        cost = c["rel_cost"]
        if cost["mean"] is None:
            out.append(Finding(f"`{panel}`", "no point within the bar on any seed", NOT_REPRODUCED))
            continue
        saved = {"mean": 1 - cost["mean"], "lo": None if cost["hi"] is None else 1 - cost["hi"],
                 "hi": None if cost["lo"] is None else 1 - cost["lo"]}
        text = (f"saved {describe(saved, 'cost', metric)} of the cost, test {metric} minus dense "
                f"{describe(c['minus_dense'], 'margin', metric)}; seeds {', '.join(map(str, s['seeds']))}")
        verdicts = verdict({k: None if v is None else v - SAVING for k, v in saved.items()})
        out.append(Finding(f"`{panel}`", text, verdicts))
    return out


def steps(names: list[str] | None = None, flip: bool = False) -> Callable[[dict], list[Finding]]:
    """Each arm of an ablation (fig_ablations.py) against the previous one, at rel_cost 0.5 (the
    named arms only, where given)."""
    def read(arms: dict) -> list[Finding]:
        out = []
        for label, arm in arms.items():
            m = arm.get("minus_previous")
            if m is None or (names is not None and label not in names):
                continue
            row = m["at"].get("0.5")
            out.append(Finding(f"{label} minus {m['previous']}, seeds {', '.join(map(str, m['seeds']))}",
                               margin_text(row, arm["metric"], "0.5"), verdict(row, flip)))
        return out
    return read


@dataclass(frozen=True)
class Claim:
    statement: str  # the paper's words, shortened
    figure: str  # the JSON under figures/ that measures it
    read: Callable[[dict], list[Finding]]
    command: str  # what makes the figure's data


FIG_MAIN = "fig_main_default.json"
CLAIMS = (
    Claim("Activation sparsity improves the conversion", "fig_ablation_phases.json",
          steps(["+ sparsity penalty"]), "python run.py -m experiment=fig_ablation_phases seed=0,1,2"),
    Claim("Dynamic-k beats top-k at equal cost (the same routers)", "fig_ablation_phases.json",
          steps(["+ dynamic-k = D2DMoE"]), "python run.py -m experiment=fig_ablation_phases seed=0,1,2"),
    Claim("D2DMoE is above MoEfication at every budget, on NLP and on vision", FIG_MAIN, main_margins,
          "python run.py -m experiment=fig_main (fig_main_carer, fig_main_gpt2, fig_main_vit)"),
    Claim("Each phase adds: MoEfication, + sparsity, + regression routers, + dynamic-k", "fig_ablation_phases.json",
          steps(), "python run.py -m experiment=fig_ablation_phases seed=0,1,2"),
    Claim("Smaller experts are better (with dynamic-k)", "fig_ablation_expert_size.json", steps(),
          "python run.py -m experiment=fig_ablation_expert_size seed=0,1,2"),
    Claim("The ReLU swap beats keeping the model's activation", "fig_ablation_activation.json", steps(flip=True),
          "python run.py -m experiment=fig_ablation_activation seed=0,1,2"),
    Claim("Converting the attention projections saves more", "fig_ablation_attention.json", steps(),
          "python run.py -m experiment=fig_ablation_attention seed=0,1,2"),
    Claim("Up to 60% of the cost saved within about one point", FIG_MAIN, saving,
          "python run.py -m experiment=fig_main (and the other panels)"),
)


def findings(claim: Claim, figures: Path) -> list[Finding] | None:
    """The claim's findings from its figure's JSON; None when the figure is not made (pending)."""
    path = figures / claim.figure
    return claim.read(json.loads(path.read_text())) if path.exists() else None
