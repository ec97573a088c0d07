"""A converted model as a folder that loads without the training config.

    folder/
      model.safetensors   every weight of the MoE model (experts, routers, the rest)
      d2dmoe.json         family, how to rebuild the architecture (adapter settings, experts per
                          layer, router shapes, activation), the operating tau (or `layer_taus`, one
                          per MoE layer), and the calibration tables (validation rel_cost and metric
                          at each operating point) that `set_budget` reads
      config.json, tokenizer files   (transformers families) the architecture's own config and tokenizer

`load(folder)` (or `ConvertedModel.from_pretrained`) rebuilds the module and loads the weights;
`set_tau` / `set_budget` move the operating point at run time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from safetensors.torch import load_model, save_model
from torch import nn

from .architecture import build
from .models.detect import resolved
from .moe import DynamicKGate, moe_layers, set_gate, set_impl, set_layer_taus
from .tasks import sign

CONFIG = "d2dmoe.json"
WEIGHTS = "model.safetensors"
FORMAT = 1
HUB_ONLY_KEYS = ("gguf_file", "tokenizer", "weights_file")  # how the original was fetched, not what it is


class ConvertedModel(nn.Module):
    """A converted model ready to run: `model(**batch)` gives the logits ([B, C] or [B, T, V])."""

    def __init__(self, model: nn.Module, adapter, spec: dict):
        super().__init__()
        self.model, self.adapter, self.spec = model, adapter, spec
        set_impl(model, "auto")  # per layer and call, the fastest execution: never far slower than dense
        if spec.get("layer_taus"):
            self.set_layer_taus(spec["layer_taus"])
        else:
            self.set_tau(spec["tau"])

    def forward(self, **batch) -> torch.Tensor:
        return self.adapter.forward(self.model, batch)

    def set_impl(self, impl: str) -> None:
        """How the experts execute: `auto` (the default: per layer and call, the execution timed
        fastest for the fraction of experts it runs), `gather`, `masked`, or `fused` (GPU kernel)."""
        set_impl(self.model, impl)

    def set_tau(self, tau: float) -> None:
        """Dynamic-k threshold of every MoE layer (0 runs every expert, 1 only the top one)."""
        set_gate(self.model, DynamicKGate(float(tau)))
        self.tau, self.layer_taus = float(tau), None

    def set_layer_taus(self, taus: list[float]) -> None:
        """A dynamic-k threshold per MoE layer, in module order."""
        set_layer_taus(self.model, taus)
        self.tau, self.layer_taus = None, [float(t) for t in taus]

    def set_budget(self, budget: float) -> float | list[float]:
        """The operating point with the best validation metric whose validation rel_cost is within
        `budget` (the cheapest when none is): among the per-layer calibration when the model was
        converted with one (`convert.per_layer`), else among the global taus. Sets it and returns
        the tau, or the list of per-layer taus."""
        if self.spec.get("layer_calibration"):
            taus = choose_tau(self.spec["layer_calibration"], budget, self.spec["metric"])["taus"]
            self.set_layer_taus(taus)
            return taus
        tau = choose_tau(self.spec["calibration"], budget, self.spec["metric"])["tau"]
        self.set_tau(tau)
        return tau

    def save_pretrained(self, path: str | Path) -> Path:
        return save(path, self.model, self.spec)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> ConvertedModel:
        return load(path, device)


def choose_tau(calibration: list[dict], budget: float, metric: str) -> dict:
    """The calibration row (tau, rel_cost, value) of best value with rel_cost <= budget; ties go to
    the cheaper one; the cheapest row when none fits."""
    fits = [row for row in calibration if row["rel_cost"] <= budget]
    if not fits:
        return min(calibration, key=lambda row: row["rel_cost"])
    return max(fits, key=lambda row: (sign(metric) * row["value"], -row["rel_cost"]))


def save(path: str | Path, model: nn.Module, spec: dict, tokenizer=None) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS))
    if hasattr(getattr(model, "config", None), "save_pretrained"):  # transformers: the architecture's config
        model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / CONFIG).write_text(json.dumps({"format": FORMAT, **spec}, indent=2))
    return folder


def model_spec(model_cfg: dict, moe: nn.Module, num_labels: int | None, activation: str, router_kind: str,
               attention: tuple[int, int] | None) -> dict:
    """What `load` needs to rebuild `moe`: the adapter, from the run's `model` config group, and the
    architecture's description (architecture.py), read off the model."""
    ffn, projections = moe_layers(moe, "ffn"), moe_layers(moe, "attention")
    model_cfg = resolved(model_cfg)  # model=auto: the adapter it chose
    adapter = {k: v for k, v in model_cfg.items() if k not in HUB_ONLY_KEYS}
    adapter["pretrained"] = False  # the weights come from the folder
    return {"family": model_cfg["family"], "adapter": adapter, "num_labels": num_labels,
            "experts": {"num_experts": ffn[0].num_experts, "expert_size": ffn[0].expert_size,
                        "router_hidden": ffn[0].router.net[0].out_features, "router_kind": router_kind,
                        "activation": activation,
                        "attention": None if attention is None else
                        {"num_experts": projections[0].num_experts, "router_hidden": attention[1],
                         "hidden": projections[0].num_experts * projections[0].expert_size}}}


def load(path: str | Path, device: str | torch.device = "cpu") -> ConvertedModel:
    folder = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; a converted model folder holds {CONFIG} and {WEIGHTS} "
                                    "(written by `d2dmoe convert` or save_pretrained)")
    try:
        spec = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG}: not valid JSON ({err})") from err
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: format {spec.get('format')!r}; this version reads format {FORMAT}")
    adapter_args = dict(spec["adapter"])
    if get_class(adapter_args["_target_"]).config_in_folder:  # config.json and the tokenizer are in the folder
        adapter_args["path"] = str(folder)
    adapter = instantiate(adapter_args)
    model = build(adapter, spec["num_labels"], spec["experts"])  # the pipeline's architecture builder
    try:
        load_model(model, str(folder / WEIGHTS), device=str(device))
    except Exception as err:
        raise ValueError(f"{folder / WEIGHTS} does not match the architecture {CONFIG} describes "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
    return ConvertedModel(model.to(device).eval(), adapter, spec).to(device)
