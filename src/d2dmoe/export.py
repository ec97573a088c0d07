"""A converted model as a folder that loads without the training config.

    folder/
      model.safetensors   every weight of the MoE model (experts, routers, the rest)
      d2dmoe.json         family, how to rebuild the architecture (adapter settings, experts per
                          layer, router shapes, activation), the operating tau (or `layer_taus`, one
                          per MoE layer), and the calibration tables (validation rel_cost and metric
                          at each operating point) that `set_budget` reads
      config.json         (transformers families) a marker of model_type `d2dmoe` (auto.py): without
                          d2dmoe, transformers refuses the folder instead of loading a dense model
                          with random FFNs
      base/config.json    (transformers families) the original architecture's config
      tokenizer files     where the converted model has a tokenizer

`load(folder)` (a hub id too; or `AutoModel*.from_pretrained(folder)` after `import d2dmoe`)
rebuilds the model and loads the weights. What it returns is the original's class with
ConvertedModel's methods (`D2DMoEGPT2LMHeadModel`, ...): its forward, outputs, `generate()` and
pipelines as before, and `set_tau` / `set_budget` to move the operating point at run time.

A model folder is data, never code: loading reads the weights with safetensors (no unpickling),
builds the adapter from a closed set of known classes (KNOWN_ADAPTERS) with plain arguments, and refuses,
naming the key, a folder that names anything else, holds a `_target_` anywhere else in d2dmoe.json,
or asks to run the model's own Python code (`trust_remote_code`) without the caller's leave.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .architecture import build
from .models import ADAPTERS, VitAdapter
from .models.detect import resolved
from .crossover import set_impl
from .moe import DynamicKGate, moe_layers, set_gate, set_layer_taus
from .tasks import sign

CONFIG = "d2dmoe.json"
WEIGHTS = "model.safetensors"
BASE = "base"  # the original architecture's config.json (transformers)
FORMAT = 2  # 2: config.json is the d2dmoe marker, the original's in base/ (1: the original's config.json)
READS = (1, 2)
HUB_ONLY_KEYS = ("gguf_file", "tokenizer", "weights_file")  # how the original was fetched, not what it is
# the adapters a folder may name, under the names the model configs and model=auto give them
MODEL_TYPE = "d2dmoe"  # config.json's model_type in a converted transformers folder (auto.py registers it)
HOW_TO_LOAD = "a D2DMoE-converted model: load it with d2dmoe.load(folder), or with transformers' Auto classes after `import d2dmoe`"
KNOWN_ADAPTERS = {name: cls for cls in ADAPTERS.values()
                  for name in (f"d2dmoe.models.{cls.__name__}", f"{cls.__module__}.{cls.__qualname__}")}


class UnsafeFolder(ValueError):
    """A model folder whose description would make loading run something other than the known code."""


def targets(node, path: str = "") -> list[str]:
    """The key paths of every `_target_` in a JSON value."""
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out += [f"{path}{key}"] if key == "_target_" else targets(value, f"{path}{key}.")
        return out
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in targets(v, f"{path}{i}.")]
    return []


def safe_adapter(spec: dict, source: Path, trust_remote_code: bool):
    """The adapter d2dmoe.json's `adapter` describes, built from KNOWN_ADAPTERS only (see the module docstring)."""
    args = dict(spec["adapter"])
    name = args.pop("_target_", None)
    if name not in KNOWN_ADAPTERS:
        raise UnsafeFolder(f"{source}: adapter._target_ is {name!r}; a converted model folder may name only "
                           f"{sorted(KNOWN_ADAPTERS)}, and nothing in it is imported or called otherwise")
    nested = [t for t in targets(spec) if t != "adapter._target_"]
    if nested:
        raise UnsafeFolder(f"{source}: {', '.join(nested)}: a converted model folder holds data only; no `_target_` "
                           "is built from it")
    if args.get("trust_remote_code") and not trust_remote_code:
        raise UnsafeFolder(f"{source}: adapter.trust_remote_code is true: the model's own Python code would run. "
                           "Load it with d2dmoe.load(path, trust_remote_code=True) only if you trust where it came from")
    return KNOWN_ADAPTERS[name](**args)


class ConvertedModel:
    """Mixed into a converted model's own class (`D2DMoE<Class>`, converted_class): the model keeps
    the original's interface (its forward and outputs, `.config`, `generate()` for causal LMs,
    transformers pipelines; a timm model's forward) and gains the operating point (`set_tau`,
    `set_layer_taus`, `set_budget`), the experts' execution (`set_impl`) and a `save_pretrained`
    that writes a converted folder. `run(batch)` gives the logits the pipeline evaluates."""

    d2dmoe_adapter: object  # the family's adapter (models/): how a batch runs, what the tokenizer is
    d2dmoe_spec: dict  # d2dmoe.json: the architecture, the operating point, the calibration tables

    @classmethod
    def wrap(cls, model: nn.Module, adapter, spec: dict) -> nn.Module:
        """`model` itself, its class now converted_class(its class), at the spec's operating point."""
        model.__class__ = converted_class(type(model))
        model.d2dmoe_adapter, model.d2dmoe_spec = adapter, spec
        set_impl(model, "auto")  # per layer and call, the fastest execution: never far slower than dense
        if spec.get("layer_taus"):
            model.set_layer_taus(spec["layer_taus"])
        else:
            model.set_tau(spec["tau"])
        return model

    def run(self, batch: dict) -> torch.Tensor:
        """The logits ([B, C] or [B, T, V]) of a batch as the data modules make it."""
        return self.d2dmoe_adapter.forward(self, batch)

    def set_impl(self, impl: str) -> None:
        """How the experts execute: `auto` (the default: per layer and call, the execution timed
        fastest for the fraction of experts it runs), `gather`, `masked`, or `fused` (GPU kernel)."""
        set_impl(self, impl)

    def set_tau(self, tau: float) -> None:
        """Dynamic-k threshold of every MoE layer (0 runs every expert, 1 only the top one)."""
        set_gate(self, DynamicKGate(float(tau)))
        self.tau, self.layer_taus = float(tau), None

    def set_layer_taus(self, taus: list[float]) -> None:
        """A dynamic-k threshold per MoE layer, in module order."""
        set_layer_taus(self, taus)
        self.tau, self.layer_taus = None, [float(t) for t in taus]

    def set_budget(self, budget: float) -> float | list[float]:
        """The operating point with the best validation metric whose validation rel_cost is within
        `budget` (the cheapest when none is): among the per-layer calibration when the model was
        converted with one (`convert.per_layer`), else among the global taus. Sets it and returns
        the tau, or the list of per-layer taus."""
        spec = self.d2dmoe_spec
        if spec.get("layer_calibration"):
            taus = choose_tau(spec["layer_calibration"], budget, spec["metric"])["taus"]
            self.set_layer_taus(taus)
            return taus
        tau = choose_tau(spec["calibration"], budget, spec["metric"])["tau"]
        self.set_tau(tau)
        return tau

    def save_pretrained(self, path: str | Path, tokenizer=None, **_) -> Path:
        """A converted folder (see the module docstring) at the current operating point; the
        tokenizer too where given."""
        spec = {**self.d2dmoe_spec, "layer_taus": self.layer_taus}
        if self.tau is not None:
            spec["tau"] = self.tau
        return save(path, self, spec, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        **_) -> nn.Module:
        return load(path, device, trust_remote_code)


@functools.cache
def converted_class(cls: type) -> type:
    """The original class with ConvertedModel's methods first, under the original's name (transformers
    pipelines check a model's class name against the task's; isinstance(m, ConvertedModel) tells)."""
    return type(cls.__name__, (ConvertedModel, cls), {"__module__": __name__, "__qualname__": f"D2DMoE{cls.__name__}"})


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
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):  # transformers: the original's config in base/, a marker as config.json
        config.save_pretrained(folder / BASE)
        (folder / "config.json").write_text(json.dumps(marker(config), indent=2))
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


def marker(base) -> dict:
    """config.json of a converted folder whose original config is `base`: transformers refuses it
    without d2dmoe, and loads it through auto.py with it."""
    return {"model_type": MODEL_TYPE, "base_model_type": base.model_type,
            "architectures": [f"D2DMoE{a}" for a in (base.architectures or [])], "d2dmoe": HOW_TO_LOAD}


def mismatch(model: nn.Module, weights: Path) -> str:
    """Which tensors of a weights file do not fit the model: missing, unexpected, or of another shape
    ('' when the file cannot be read at all)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return ""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    said = [f"{k} {saved[k]} in the file, {own[k]} in the model" for k in own if k in saved and saved[k] != own[k]]
    said += [f"{k} missing from the file" for k in own if k not in saved]
    said += [f"{k} in the file, not in the model" for k in saved if k not in own]
    return "; ".join(said[:6]) + (f"; and {len(said) - 6} more" if len(said) > 6 else "")


def local_folder(path: str | Path) -> Path:
    """A local folder as it is; a hub id (`owner/name`) fetched to the hub's cache first."""
    folder = Path(path).expanduser()
    if not folder.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path)))
    return folder


def load(path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """The converted model in a folder (or a hub id): its own class with ConvertedModel's methods,
    at the operating point the folder records."""
    folder = local_folder(path)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; a converted model folder holds {CONFIG} and {WEIGHTS} "
                                    "(written by `d2dmoe convert` or save_pretrained)")
    try:
        spec = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG}: not valid JSON ({err})") from err
    if spec.get("format") not in READS:
        raise ValueError(f"{folder / CONFIG}: format {spec.get('format')!r}; this version reads formats {READS}")
    if KNOWN_ADAPTERS.get(spec.get("adapter", {}).get("_target_"), VitAdapter).config_in_folder:
        base = folder / BASE if spec["format"] >= 2 else folder  # format 1 kept the original's config.json beside
        spec = {**spec, "adapter": {**spec["adapter"], "path": str(base)}}
    adapter = safe_adapter(spec, folder / CONFIG, trust_remote_code)
    model = build(adapter, spec["num_labels"], spec["experts"])  # the pipeline's architecture builder
    try:
        load_model(model, str(folder / WEIGHTS), device=str(device))
    except Exception as err:
        raise ValueError(f"{folder / WEIGHTS} does not match the architecture {CONFIG} describes: "
                         f"{mismatch(model, folder / WEIGHTS) or ' '.join(str(err).split())[:300]}") from err
    return ConvertedModel.wrap(model.to(device).eval(), adapter, spec)
