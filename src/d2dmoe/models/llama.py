"""Gated-FFN language models in the Llama layout (Llama, SmolLM, Qwen, Mistral, Gemma):
mlp = down(act(gate(x)) * up(x)). The ReLU swap goes on the gate branch; the split clusters the
gate projection's rows, and each expert carries its slices of gate, up and down."""
from __future__ import annotations

from torch import nn

from ..moe import FFN
from .causal_lm import CausalLMAdapter


class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    where = "model.model.layers[i].mlp (gate_proj, up_proj, down_proj, act_fn)"
    config_class = "LlamaConfig"
    ffn_matrices = 3
    no_attention_conversion = "not supported for gated-FFN LLMs (the llama family): their grouped-query K/V projections are not d -> d"

    def find_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.model.layers

    def make_ffn(self, block: nn.Module) -> FFN:
        """The block's `mlp` becomes a gated FFN."""
        mlp = block.mlp
        block.mlp = FFN(mlp.gate_proj, mlp.down_proj, mlp.act_fn, up=mlp.up_proj)
        return block.mlp

    def ffn_slots(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(block, "mlp") for block in self.blocks(model)]

    def projection_slots(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        raise NotImplementedError(f"attention.convert is {self.no_attention_conversion}")
