"""transformers encoders with a sequence-classification head: BERT (MiniLM), RoBERTa, XLM-RoBERTa,
DistilBERT, or any encoder whose FFN layout is in layouts.LAYOUTS or the model config."""
from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Dims


class BertAdapter(Adapter):
    """transformers encoders (`AutoModelForSequenceClassification`) with a classification head on the
    first token: BERT's pooler, RoBERTa's and DistilBERT's two-layer heads (d x d, then d x C)."""

    family = "bert"

    def hf_config(self, num_labels: int):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.path, num_labels=num_labels, **self.hub_kwargs, **self.config_overrides)
        cfg._attn_implementation = self.attention_for(cfg, "AutoModelForSequenceClassification")
        return cfg

    def dims(self, num_labels: int) -> Dims:
        c = self.hf_config(num_labels)
        matrices = 3 if self.config_layout(c).gated else 2  # ModernBERT's FFN is gated
        return Dims(c.num_hidden_layers, c.hidden_size, self.ffn_width(c), num_labels, matrices)

    def build(self, num_labels: int, weights: bool = True) -> nn.Module:
        """The dense classifier; pretrained weights when configured and `weights`, else initialised."""
        from transformers import AutoModelForSequenceClassification

        cfg = self.hf_config(num_labels)
        torch.manual_seed(0)  # the fresh head (and a model built from a config) starts the same every time
        if self.pretrained and weights:
            return self.from_pretrained(AutoModelForSequenceClassification, cfg)
        return AutoModelForSequenceClassification.from_config(cfg)

    def analytic_fixed_macs(self, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
        """MACs of everything except the FFNs, per sample with `tokens` real tokens ([B] -> [B]).
        Per layer: Q, K, V, O projections (4 T d^2) and attention scores and mixing (2 T^2 d);
        then the head on the first token: BERT's pooler (d^2) and classifier (d C), or RoBERTa's and
        DistilBERT's dense layer (d^2) and output projection (d C). Embeddings and norms: no MACs."""
        t = tokens.double()
        per_layer = 4 * t * dims.d**2 + 2 * t**2 * dims.d
        return dims.layers * per_layer + dims.d**2 + dims.d * dims.num_labels
