"""Gated-FFN language models in the Llama layout (Llama, SmolLM, Qwen, Mistral, Gemma; Phi-3's fused
gate/up projection is cut in two): mlp = down(act(gate(x)) * up(x)). The ReLU swap goes on the gate
branch; the split clusters the gate projection's rows, and each expert carries its slices of gate,
up and down."""
from __future__ import annotations

from .causal_lm import CausalLMAdapter


class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    config_class = "LlamaConfig"
    no_attention_conversion = "not supported for gated-FFN LLMs (the llama family): their grouped-query K/V projections are not d -> d"
