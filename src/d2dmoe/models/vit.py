"""Vision Transformers through timm (`timm.create_model`; FFNs in `blocks[i].mlp`): image
classification, cost per image over all its tokens (patches and prefix tokens; images have no padding)."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ..moe import FFN
from .base import Adapter, Dims


def load_exactly(model: nn.Module, path: str) -> None:
    """Every weight of a checkpoint (safetensors, or a torch file read without unpickling code) into
    `model`, or an error naming the keys that do not fit."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = [f"{k} {tuple(state[k].shape)} (the model's {tuple(own[k].shape)})" for k in own
                 if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        head = " A trained head with another class count than the data's cannot serve it: use the folder's " \
               "labels, or name the architecture (a vit model config) to train a fresh head." \
            if any(k.startswith("head") for k in [*missing, *unexpected, *[m.split()[0] for m in misshapen]]) else ""
        raise ValueError(f"{path} does not fit the model its config builds: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, other shapes {misshapen[:8]}.{head}")
    model.load_state_dict(state, strict=True)


class VitAdapter(Adapter):
    """timm ViTs. `path` names the timm architecture (e.g. `vit_base_patch16_224`); `config` holds
    create_model arguments (img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio);
    `weights_file` a local checkpoint for the pretrained weights (else timm fetches them from the hub):
    a pretrained backbone whose head timm replaces when the class count differs, or, with
    `strict_weights` (a timm folder read by model=auto: a fine-tuned model), the whole model, every
    weight and the trained head loaded exactly or the load fails naming the keys.
    attn_implementation `eager` makes attention explicit matmuls (timm's non-fused path)."""

    family = "vit"
    default_model_type = "timm_vit"  # layouts.LAYOUTS: FFNs in blocks[i].mlp (fc1, act, fc2)
    config_in_folder = False  # timm: the architecture is the adapter's settings, no config file

    def __init__(self, *args, weights_file: str | None = None, strict_weights: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights_file, self.strict_weights = weights_file, strict_weights

    def tokenizer(self, data=None):
        return None  # images

    def create(self, num_labels: int, pretrained: bool) -> nn.Module:
        import timm

        kwargs = dict(self.config_overrides)
        exact = pretrained and self.weights_file and self.strict_weights
        if pretrained and self.weights_file and not exact:
            kwargs["pretrained_cfg_overlay"] = {"file": self.weights_file}
        torch.manual_seed(0)  # a model built from a config (and a fresh head) starts the same every time
        model = timm.create_model(self.path, pretrained=pretrained and not exact, num_classes=num_labels, **kwargs)
        if exact:
            load_exactly(model, self.weights_file)
        if self.attn_implementation == "eager":
            for block in model.blocks:
                block.attn.fused_attn = False
        return model

    @cached_property
    def shape(self) -> dict:
        """What the cost needs from the architecture, read from a model built on the meta device."""
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        with torch.device("meta"):
            m = self.create(1, pretrained=False)
        if not isinstance(m, (VisionTransformer, Eva)):  # CaiT's blocks see the patches without the class token, ...
            raise ValueError(f"model.path={self.path}: a timm {type(m).__name__}; the vit family converts timm's "
                             "VisionTransformer and its subclasses (ViT, DeiT, distilled DeiT) and Eva (EVA-02), whose "
                             "blocks all see every patch and prefix token: the cost of another layout would be counted "
                             "wrong")
        conv = m.patch_embed.proj
        mlp = m.blocks[0].mlp
        return {"layers": len(m.blocks), "d": m.embed_dim, "d_ff": mlp.fc2.in_features,
                "matrices": 3 if self.glu(mlp) else 2,
                "patches": m.patch_embed.num_patches, "prefix": m.num_prefix_tokens,
                "image": (conv.in_channels, *m.patch_embed.img_size),
                "grid": tuple(m.patch_embed.grid_size),
                "patch_macs": conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels}

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """timm puts the prefix tokens (class, registers) first, then the patches row by row."""
        return (self.shape["prefix"], *self.shape["grid"])

    @property
    def fixed_tokens(self) -> int:
        return self.shape["patches"] + self.shape["prefix"]

    def dummy_batch(self, tokens: int) -> dict:
        return {"pixel_values": torch.zeros(1, *self.shape["image"])}

    def dims(self, num_labels: int) -> Dims:
        s = self.shape
        return Dims(s["layers"], s["d"], s["d_ff"], num_labels, s["matrices"])

    def build(self, num_labels: int, weights: bool = True) -> nn.Module:
        return self.create(num_labels, pretrained=self.pretrained and weights)

    @staticmethod
    def glu(mlp: nn.Module) -> bool:
        from timm.layers import GluMlp

        return type(mlp) is GluMlp

    def layout(self, model: nn.Module):
        """timm's plain Mlp (fc1, act, fc2), or its GluMlp (EVA-02: fc1 gives [gate; up])."""
        from .layouts import layout_for

        gated = not self.layout_override and self.glu(self.blocks_of(model)[0].mlp)
        return layout_for("timm_glu" if gated else self.default_model_type, self.layout_override,
                          f"model class {type(model).__name__}")

    @staticmethod
    def blocks_of(model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def make_ffn(self, block: nn.Module, layout) -> FFN:
        """timm's Mlp and GluMlp also hold dropouts and an optional norm between the layers: only the
        plain forms (no norm, dropout 0; GluMlp activating the first half) convert exactly."""
        from timm.layers import Mlp

        mlp = block.mlp
        if type(mlp) is not Mlp and not self.glu(mlp):  # SwiGLU (fc1_g, fc1_x), ...
            raise ValueError(f"{type(mlp).__name__} in {type(block).__name__}: only timm's Mlp (fc1, act, fc2) and "
                             "GluMlp (fc1 = [gate; up], act, fc2) convert; this timm MLP is not supported")
        if self.glu(mlp) and (mlp.gate_last or mlp.chunk_dim != -1):
            raise ValueError(f"GluMlp in {type(block).__name__} activates the second half of fc1 (gate_last): only "
                             "the first-half form converts")
        if not isinstance(mlp.norm, nn.Identity) or mlp.drop1.p or mlp.drop2.p:
            raise ValueError(f"{type(mlp).__name__}: only timm Mlp blocks without a hidden norm or "
                             "dropout convert exactly (set drop_rate=0)")
        return super().make_ffn(block, layout)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["pixel_values"])  # [B, C]

    def token_mask(self, batch: dict) -> torch.Tensor:
        """Every token is real: [B, patches + prefix tokens] of ones."""
        s = self.shape
        return torch.ones(len(batch["pixel_values"]), s["patches"] + s["prefix"], dtype=torch.long,
                          device=batch["pixel_values"].device)

    def analytic_fixed_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """MACs of everything except the FFNs per image ([B] token counts -> [B]): the patch
        embedding, then per layer Q, K, V, O (4 T d^2) and attention scores and mixing (2 T^2 d),
        then the classifier on the pooled token (d C)."""
        t = tokens.double()
        s = self.shape
        return s["patches"] * s["patch_macs"] + dims.layers * (4 * t * dims.d**2 + 2 * t**2 * dims.d) \
            + dims.d * dims.num_labels
