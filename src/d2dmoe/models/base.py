"""What every model-family adapter shares.

An adapter is the only code that knows a family: it builds the task model (pretrained or from a
config), puts a family-independent `FFN` in place of each block's feed-forward network, runs the
model on a batch, and gives the analytic MAC count of everything that is not an FFN. Everything
downstream (sparsify, split, routers, cost) sees only `FFN`/`MoE`, the adapter and its task.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..moe import FFN
from ..tasks import Classification


@dataclass(frozen=True)
class Dims:
    layers: int
    d: int  # model width
    d_ff: int  # FFN width
    num_labels: int  # outputs of the head: classes, or a language model's vocabulary
    ffn_matrices: int = 2  # weight matrices per FFN: 2 (W1, W2), 3 when gated (gate, up, down)


class Adapter:
    """A family's adapter. Each family provides `dims`, `build`, `find_blocks`, `make_ffn`,
    `ffn_slots` and `fixed_macs` (and `projection_slots` for attention.convert); it may override
    `tokenizer`, `forward`, `token_mask`, `patch_grid` and `projection_macs`, and the facts below."""

    family = ""
    task = Classification()
    where = ""  # where the family keeps its blocks, for error messages
    # why attention.convert cannot work for the family, or None when it can
    no_attention_conversion: str | None = None
    # a transformers model: its config.json and tokenizer are saved beside a converted model's
    # weights, and loading reads them from that folder
    config_in_folder = True

    def __init__(self, name: str, path: str | None = None, family: str | None = None, pretrained: bool = True,
                 config: dict | None = None, attn_implementation: str = "sdpa", trust_remote_code: bool = False):
        if family is not None and family != self.family:
            raise ValueError(f"model.family={family!r} does not match {type(self).__name__} ({self.family!r})")
        self.name, self.path, self.pretrained = name, path, pretrained
        self.config_overrides = dict(config or {})
        self.attn_implementation = attn_implementation
        # a hub model's own Python code runs only when its config says so (model.trust_remote_code=true)
        self.hub_kwargs = {"trust_remote_code": True} if trust_remote_code else {}

    # -- to be provided by each family ---------------------------------------------------------
    def find_blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def make_ffn(self, block: nn.Module) -> FFN:
        """Replace the block's feed-forward network by an equivalent `FFN` (the model's own
        activation) and return it."""
        raise NotImplementedError

    def projection_slots(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of the block's attention projections Q, K, V, O, each a d -> d
        Linear (or what replaced it); a fused QKV layer is first cut into its parts (attention.Fused)."""
        raise NotImplementedError(f"the {self.family!r} family does not support attention.convert")

    def projection_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """The part of `fixed_macs` that the attention projections make up ([B] -> [B])."""
        return dims.layers * 4 * tokens.double() * dims.d**2

    # -- shared ----------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        try:
            return list(self.find_blocks(model))
        except AttributeError as err:
            from . import ADAPTERS

            raise ValueError(
                f"model class {type(model).__name__}: the {self.family!r} adapter looks for its FFNs in "
                f"{self.where} and cannot find them ({err}); adapters that exist: {sorted(ADAPTERS)} "
                "(set model.family and model._target_ to the one matching your model)") from err

    def install_ffns(self, model: nn.Module, activation: nn.Module | None = None) -> nn.Module:
        """Put an `FFN` in each block (blocks that have one keep it). activation=None keeps the
        model's own; otherwise a copy of it goes in every FFN."""
        for block in self.blocks(model):
            ffn = next((m for m in block.modules() if isinstance(m, FFN) and m.kind == "ffn"), None)
            if ffn is None:
                ffn = self.make_ffn(block)
            if activation is not None:
                ffn.act = copy.deepcopy(activation)
        return model

    def tokenizer(self, data=None):
        """The tokenizer the data is encoded with; None for models that take no text."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, **self.hub_kwargs)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The model's logits on a batch: [B, C] for classifiers, [B, T, V] for language models."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def token_mask(self, batch: dict) -> torch.Tensor:
        """[B, T] mask of the real tokens the FFNs see (1 = real, 0 = padding)."""
        return batch["attention_mask"]

    @property
    def patch_grid(self) -> tuple[int, int, int] | None:
        """(prefix tokens, grid height, grid width) when tokens are image patches, else None."""
        return None
