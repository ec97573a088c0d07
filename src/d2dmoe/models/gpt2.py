"""GPT-2 language models (transformers `GPT2LMHeadModel`). Its MLP keeps weights in `Conv1D`
layers, transposed relative to `nn.Linear`: they become Linear layers inside the `FFN`."""
from __future__ import annotations

from torch import nn

from ..attention import Fused
from ..moe import FFN
from .causal_lm import CausalLMAdapter


def conv1d_to_linear(conv) -> nn.Linear:
    """transformers' Conv1D (weight [in, out]) as the equivalent nn.Linear (weight [out, in])."""
    d_in, d_out = conv.weight.shape
    linear = nn.Linear(d_in, d_out)
    linear.weight.data.copy_(conv.weight.detach().T)
    linear.bias.data.copy_(conv.bias.detach())
    return linear


class GPT2Adapter(CausalLMAdapter):
    family = "gpt2"
    where = "model.transformer.h[i].mlp (c_fc, act, c_proj, dropout)"
    config_class = "GPT2Config"

    def ffn_width(self, c) -> int:
        return c.n_inner or 4 * c.hidden_size

    def find_blocks(self, model: nn.Module) -> list[nn.Module]:
        return model.transformer.h

    def make_ffn(self, block: nn.Module) -> FFN:
        """The block's `mlp` becomes Sequential(FFN, the MLP's dropout)."""
        mlp = block.mlp
        ffn = FFN(conv1d_to_linear(mlp.c_fc), conv1d_to_linear(mlp.c_proj), mlp.act)
        block.mlp = nn.Sequential(ffn, mlp.dropout)
        return ffn

    def ffn_slots(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(block.mlp, "0") for block in self.blocks(model)]

    def projection_slots(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        """c_attn (Conv1D d -> 3d) becomes Fused(Q, K, V) and c_proj a Linear, on first use."""
        attn = block.attn
        if not isinstance(attn.c_attn, Fused):
            attn.c_attn = Fused.from_linear(conv1d_to_linear(attn.c_attn), 3)
        if type(attn.c_proj).__name__ == "Conv1D":
            attn.c_proj = conv1d_to_linear(attn.c_proj)
        return [*attn.c_attn.slots(), (attn, "c_proj")]
