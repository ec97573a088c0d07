"""transformers' Auto classes know a converted folder once d2dmoe is imported.

A converted transformers model's folder holds, as config.json, a small config of model_type
`d2dmoe` (the original architecture's config sits in base/config.json). Without d2dmoe, transformers
refuses it ("model type `d2dmoe`"), so the folder can never load as the dense model with random
FFNs; with `import d2dmoe`, `AutoModelForCausalLM.from_pretrained(folder)` (and AutoModel,
AutoModelForSequenceClassification, AutoModelForImageClassification) return what `d2dmoe.load(folder)` does.
"""
from __future__ import annotations

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, PretrainedConfig)

from .export import MODEL_TYPE, load


class D2DMoEConfig(PretrainedConfig):
    """The marker config of a converted folder: what the original was, and how to load it."""

    model_type = MODEL_TYPE


class D2DMoEAutoModel:
    """What the Auto classes build for a `d2dmoe` config: the folder loaded by d2dmoe.load."""

    config_class = D2DMoEConfig

    @classmethod
    def from_pretrained(cls, path, *args, device_map=None, trust_remote_code: bool = False, **kwargs):
        device = device_map if isinstance(device_map, str) and device_map != "auto" else "cpu"
        return load(path, device=device, trust_remote_code=trust_remote_code)


def register() -> None:
    AutoConfig.register(MODEL_TYPE, D2DMoEConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForImageClassification):
        auto.register(D2DMoEConfig, D2DMoEAutoModel, exist_ok=True)

