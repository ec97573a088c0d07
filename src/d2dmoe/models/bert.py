"""BERT-family encoders (BERT, MiniLM, ...) with a sequence-classification head."""
from __future__ import annotations

import torch
from torch import nn

from ..moe import FFN
from .base import Adapter, Dims


class BertAdapter(Adapter):
    """transformers' BERT encoders (BERT, MiniLM, ...) with a sequence-classification head."""

    family = "bert"
    where = "model.bert.encoder.layer[i].intermediate / .output"

    def hf_config(self, num_labels: int):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.path, num_labels=num_labels, **self.hub_kwargs, **self.config_overrides)
        cfg._attn_implementation = self.attn_implementation
        return cfg

    def dims(self, num_labels: int) -> Dims:
        c = self.hf_config(num_labels)
        return Dims(c.num_hidden_layers, c.hidden_size, c.intermediate_size, num_labels)

    def build(self, num_labels: int, weights: bool = True) -> nn.Module:
        """The dense classifier; pretrained weights when configured and `weights`, else initialised."""
        from transformers import AutoModelForSequenceClassification

        cfg = self.hf_config(num_labels)
        torch.manual_seed(0)  # the fresh head (and a model built from a config) starts the same every time
        if self.pretrained and weights:
            return AutoModelForSequenceClassification.from_pretrained(self.path, config=cfg, **self.hub_kwargs)
        return AutoModelForSequenceClassification.from_config(cfg)

    def find_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.bert.encoder.layer

    def make_ffn(self, block: nn.Module) -> FFN:
        """`intermediate` computes the whole FFN, `output.dense` becomes the identity (BertOutput
        then adds dropout, the residual and LayerNorm as before)."""
        inter, out = block.intermediate, block.output
        block.intermediate = FFN(inter.dense, out.dense, inter.intermediate_act_fn)
        out.dense = nn.Identity()
        return block.intermediate

    def ffn_slots(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of each block's FFN, for swapping it for an MoE."""
        return [(block, "intermediate") for block in self.blocks(model)]

    def projection_slots(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        att = block.attention
        return [(att.self, "query"), (att.self, "key"), (att.self, "value"), (att.output, "dense")]

    def fixed_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """MACs of everything except the FFNs, per sample with `tokens` real tokens ([B] -> [B]).
        Per layer: Q, K, V, O projections (4 T d^2) and attention scores and mixing (2 T^2 d);
        then the pooler on [CLS] (d^2) and the classifier (d C). Embeddings and norms: no MACs."""
        t = tokens.double()
        per_layer = 4 * t * dims.d**2 + 2 * t**2 * dims.d
        return dims.layers * per_layer + dims.d**2 + dims.d * dims.num_labels
