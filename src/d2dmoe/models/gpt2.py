"""GPT-2 language models (transformers `GPT2LMHeadModel`). Its MLP keeps weights in `Conv1D`
layers, transposed relative to `nn.Linear`: they become Linear layers inside the `FFN`
(layouts.LAYOUTS["gpt2"])."""
from __future__ import annotations

from .causal_lm import CausalLMAdapter


class GPT2Adapter(CausalLMAdapter):
    family = "gpt2"
    config_class = "GPT2Config"
