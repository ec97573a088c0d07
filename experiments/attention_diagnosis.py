"""Where the accuracy of attention-converted models goes: the projections' routers or their experts.

    python experiments/attention_diagnosis.py [Hydra overrides]   # default: experiment=fig_ablation_attention attention.convert=true

Loads (or trains) the converted model of the given config and measures on the validation split:
1. a separate tau for the FFN MoE layers and for the projection MoE layers (grid of both);
2. the projections gated by the true expert output norms ||W2_e act(W1_e x + b1_e)|| (an oracle
   router, what the regression routers are trained to predict), every FFN expert on.
If (2) loses accuracy as fast as the routers do, the projection MLPs' activations are not sparse
enough for any router, and better routing cannot help. Prints one JSON line per setting and writes
figures/attention_diagnosis.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from d2dmoe import pipeline
from d2dmoe.calibrate import measure
from d2dmoe.conf import CONF
from d2dmoe.crossover import set_impl
from d2dmoe.moe import MoE, moe_layers, set_layer_taus

DEFAULT = ["experiment=fig_ablation_attention", "attention.convert=true"]
FFN_TAUS, ATTENTION_TAUS = (0.2, 0.3, 0.4), (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ORACLE_TAUS = (0.0, 0.2, 0.3, 0.4, 0.6)


class OracleScores(torch.nn.Module):
    """Scores = each expert's true output norm [..., E]; keeps the router's layers for the cost model."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.net = moe.router.net  # router MACs are still counted: the comparison is at equal cost
        self.layer = [moe]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.layer[0]
        return moe.hidden_norms(moe.hidden(x))


def gate(model: torch.nn.Module, ffn_tau: float, attention_tau: float) -> None:
    set_layer_taus(model, [ffn_tau if moe.kind == "ffn" else attention_tau for moe in moe_layers(model)])


def main(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides or DEFAULT)
    if not cfg.attention.convert:
        sys.exit("attention_diagnosis needs attention.convert=true")
    ctx, _dense, model = pipeline.convert(cfg)
    set_impl(model, "gather")
    rows = []

    def record(**setting) -> None:
        rows.append({**setting, **measure(ctx, model, "validation")})
        print(json.dumps(rows[-1]), flush=True)

    for ffn_tau in FFN_TAUS:
        for attention_tau in ATTENTION_TAUS:
            gate(model, ffn_tau, attention_tau)
            record(router="learned", ffn_tau=ffn_tau, attention_tau=attention_tau)
    routers = {moe: moe.router for moe in moe_layers(model, "attention")}
    for moe in routers:
        moe.router = OracleScores(moe)
    for attention_tau in ORACLE_TAUS:
        gate(model, 0.0, attention_tau)
        record(router="oracle", ffn_tau=0.0, attention_tau=attention_tau)
    for moe, router in routers.items():
        moe.router = router
    for attention_tau in ORACLE_TAUS:  # the learned routers at the same settings, for comparison
        gate(model, 0.0, attention_tau)
        record(router="learned", ffn_tau=0.0, attention_tau=attention_tau)
    out = Path("figures/attention_diagnosis.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"overrides": overrides or DEFAULT, "split": "validation", "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
