"""transformers image classifiers (`AutoModelForImageClassification`): ViT, DeiT (with its
distillation token), BEiT, DINOv2, or any whose FFN layout is in layouts.LAYOUTS or the model
config. Cost per image over all its tokens (prefix tokens and patches; images have no padding)."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from .base import Adapter, Dims
from .layouts import get


class ImageClassifierAdapter(Adapter):
    """A transformers vision encoder with a classification head, fed {"pixel_values": [B, C, H, W]}
    by the image data modules (data.image_size must be the model's image_size)."""

    family = "hf_vision"
    # BEiT (and other vision models) keep tensors made in a forward in an lru_cache: made on the meta
    # device, they would poison every later forward (NaN outputs)
    weightless_device = "cpu"

    def tokenizer(self, data=None):
        return None  # images

    def hf_config(self, num_labels: int):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.path, num_labels=num_labels, **self.hub_kwargs, **self.config_overrides)
        cfg._attn_implementation = self.attention_for(cfg, "AutoModelForImageClassification")
        return cfg

    def model_class(self, cfg):
        """The image-classification class of the config: its `architectures` entry where the auto
        mapping offers several (DeiT: with or without its distillation head), else the first."""
        from transformers import AutoModelForImageClassification

        found = AutoModelForImageClassification._model_mapping[type(cfg)]
        classes = found if isinstance(found, (tuple, list)) else (found,)
        named = [c for c in classes if c.__name__ in (cfg.architectures or [])]
        return (named or list(classes))[0]

    def build(self, num_labels: int, weights: bool = True) -> nn.Module:
        cfg = self.hf_config(num_labels)
        cls = self.model_class(cfg)
        torch.manual_seed(0)  # a fresh head (and a model built from a config) starts the same every time
        if self.pretrained and weights:
            return self.from_pretrained(cls, cfg)
        return cls(cfg)

    @cached_property
    def shape(self) -> dict:
        """What the cost and the patch maps need, read from a weightless model: the tokens the first
        block sees per image, the patch grid, the FFN width."""
        cfg = self.hf_config(1)
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        patch = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (cfg.patch_size, cfg.patch_size)
        image = (cfg.num_channels, *size)
        seen = {}

        def count(block, args, kwargs) -> None:  # the first block's input: [1, tokens, d]
            seen["tokens"] = (args[0] if args else kwargs["hidden_states"]).shape[1]

        with torch.random.fork_rng(devices=[]), torch.device(self.weightless_device):
            model = self.build(1, weights=False).eval()
            first = self.blocks(model)[0]
            hook = first.register_forward_pre_hook(count, with_kwargs=True)
            with torch.no_grad():
                model(pixel_values=torch.zeros(1, *image))
            hook.remove()
        grid = (size[0] // patch[0], size[1] // patch[1])
        layout = self.layout(model)
        return {"layers": len(self.blocks(model)), "d": cfg.hidden_size, "tokens": seen["tokens"], "grid": grid,
                "image": image, "d_ff": get(first, layout.w2).in_features, "matrices": 3 if layout.gated else 2}

    def dims(self, num_labels: int) -> Dims:
        s = self.shape
        return Dims(s["layers"], s["d"], s["d_ff"], num_labels, s["matrices"])

    @property
    def fixed_tokens(self) -> int:
        return self.shape["tokens"]

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """The prefix tokens (class, distillation) first, then the patches row by row."""
        gh, gw = self.shape["grid"]
        return (self.shape["tokens"] - gh * gw, gh, gw)

    def dummy_batch(self, tokens: int) -> dict:
        return {"pixel_values": torch.zeros(1, *self.shape["image"])}

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits  # [B, C]

    def token_mask(self, batch: dict) -> torch.Tensor:
        """Every token is real: [B, tokens] of ones."""
        pixels = batch["pixel_values"]
        return torch.ones(len(pixels), self.shape["tokens"], dtype=torch.long, device=pixels.device)
