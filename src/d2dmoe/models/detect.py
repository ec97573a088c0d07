"""The adapter a model needs, read from the model itself (`model=auto`): a transformers folder's
config.json (its `architectures` head, else its `model_type`), or a timm folder's config.json
(timm's hub format: an `architecture` name, weights beside it).

    d2dmoe convert model=auto model.path=/my/finetuned-model data=carer
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import Adapter
from .bert import BertAdapter
from .causal_lm import CausalLMAdapter
from .image import ImageClassifierAdapter
from .layouts import LAYOUTS
from .vit import VitAdapter

HEADS = {"ForSequenceClassification": BertAdapter, "ForCausalLM": CausalLMAdapter, "LMHeadModel": CausalLMAdapter,
         "ForImageClassification": ImageClassifierAdapter, "ForImageClassificationWithTeacher": ImageClassifierAdapter}
# without a task head in `architectures` (BertModel, GPT2Model, ViTModel, ...), the table's encoders are classifiers
ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "roformer", "mpnet", "deberta-v2",
                      "modernbert"})
VISION_ENCODERS = frozenset({"vit", "deit", "beit", "dinov2"})
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def adapter_class(path: str, trust_remote_code: bool = False) -> tuple[type[Adapter], dict]:
    """(adapter class, extra constructor arguments) for the model at `path`."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.is_file() else None
    if raw is not None and "architecture" in raw and "model_type" not in raw:  # a timm folder
        weights = next((Path(path) / f for f in TIMM_WEIGHTS if (Path(path) / f).is_file()), None)
        # the folder's own model: its create_model arguments, and its weights (head included) exactly
        return VitAdapter, {"path": raw["architecture"], "weights_file": str(weights) if weights else None,
                            "strict_weights": True, "config": dict(raw.get("model_args") or {})}
    if raw is None:  # a hub id: transformers reads (or downloads) its config
        from transformers import AutoConfig

        raw = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    model_type = raw.get("model_type")
    for architecture in raw.get("architectures") or []:
        for suffix, cls in HEADS.items():
            if architecture.endswith(suffix):
                return cls, {}
    if model_type in VISION_ENCODERS:
        return ImageClassifierAdapter, {}
    if model_type in LAYOUTS:
        return (BertAdapter if model_type in ENCODERS else CausalLMAdapter), {}
    raise ValueError(f"model=auto: cannot tell the task of {path} (model_type {model_type!r}, architectures "
                     f"{raw.get('architectures')}): set model.family to one of bert, causal_lm, hf_vision, vit and model._target_ "
                     "to its adapter (README: Model families)")


def resolved(model_cfg: dict) -> dict:
    """A `model=auto` config group as the adapter it resolved to (for a converted model's d2dmoe.json);
    any other model config as it is."""
    if model_cfg.get("family") != "auto":
        return model_cfg
    cls, extra = adapter_class(model_cfg["path"], bool(model_cfg.get("trust_remote_code")))
    return {**model_cfg, "_target_": f"{cls.__module__}.{cls.__qualname__}", "family": cls.family,
            **with_config(extra, model_cfg.get("config"))}


def with_config(extra: dict, given: dict | None) -> dict:
    """The arguments read from a folder, its create_model arguments under the model config's `config`
    (whose keys win)."""
    return {**extra, "config": {**extra.get("config", {}), **(given or {})}}


def auto(name: str, path: str, family: str | None = None, **kwargs) -> Adapter:
    """The adapter for the model at `path`, chosen from the model (adapter_class)."""
    cls, extra = adapter_class(path, bool(kwargs.get("trust_remote_code")))
    if family not in (None, "auto", cls.family):
        raise ValueError(f"model.family={family!r}, but {path} holds a {cls.family!r} model ({cls.__name__})")
    return cls(name, **{**kwargs, "path": path, **with_config(extra, kwargs.get("config"))})
