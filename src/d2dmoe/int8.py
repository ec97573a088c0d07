"""int8 inference on the CPU: torch's dynamic quantization (weights int8, activations quantized at
each call; fbgemm/oneDNN kernels), for the dense model and, composed with the conversion, for a
converted one.

- `dense_int8(model)`: the one line a user tries first, `quantize_dynamic` on every nn.Linear.
- `converted_int8(model)`: the same for a converted model's nn.Linear layers (attention, heads), the
  routers left in float32 so that they select as they were trained to, and every MoE layer's experts
  as int8 (`Int8Experts`), masked or gathered like the float32 ones.

Expert weights are quantized per output row (symmetric), with the scales of the whole FFN matrix, so
the masked and gathered executions multiply by the same int8 weights; they differ only in how the
activations of each call are quantized.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .moe import MoE, Router, moe_layers


def quantize_dynamic(model: nn.Module, spec) -> nn.Module:
    with warnings.catch_warnings():  # torch points eager quantization users to torchao; it still works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def dense_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantized to int8 (torch's defaults)."""
    return quantize_dynamic(model, {nn.Linear})


def converted_int8(model: nn.Module) -> nn.Module:
    """A copy of a converted model with int8 experts and int8 linear layers, routers in float32.
    Layers already set to impl=auto get their executions timed again, with the int8 ones."""
    routers = [name for name, m in model.named_modules() if isinstance(m, Router)]
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and not any(name.startswith(r + ".") for r in routers)}
    model = quantize_dynamic(copy.deepcopy(model), linears) if linears else copy.deepcopy(model)
    layers = moe_layers(model)
    for moe in layers:
        moe.int8 = Int8Experts(moe)
    auto = [moe for moe in layers if moe.impl == "auto"]
    if auto:
        from .crossover import set_tables

        set_tables(auto)
    return model


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 scales of w [rows, cols] -> [rows]."""
    return (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()


def pack(w: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None):
    """w [out, in] quantized per output row with `scales`, packed for quantized.linear_dynamic."""
    with warnings.catch_warnings():  # the same deprecation notice
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w.contiguous().float(), scales, torch.zeros(len(scales), dtype=torch.long),
                                       0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if b is None else b.float().contiguous())


def linear(x: torch.Tensor, packed, relu: bool = False) -> torch.Tensor:
    # reduce_range: 7-bit activations, as torch's dynamic quantization uses on x86 (no int16 overflow)
    if relu:  # the ReLU in the kernel's output pass: the same numbers, one pass over [N, F] fewer
        return torch.ops.quantized.linear_relu_dynamic(x, packed, True)
    return torch.ops.quantized.linear_dynamic(x, packed, True)


class Int8Experts:
    """A MoE layer's experts as int8 matrices: all of them at once (masked) and one by one (gather)."""

    def __init__(self, moe: MoE):
        if moe.w1.is_cuda:
            raise ValueError("int8 experts run on the CPU (torch's quantized kernels); the model is on a GPU")
        E, s, d = moe.w1.shape
        w1 = moe.w1.detach().reshape(E * s, d)  # [F, d], expert e's rows e*s..(e+1)*s
        w2 = moe.w2.detach().transpose(0, 1).reshape(d, E * s)  # [d, F], expert e's columns
        s1, s2 = row_scales(w1), row_scales(w2)  # [F], [d]
        b1 = moe.b1.detach().reshape(-1)
        self.act, self.num_experts, self.expert_size = moe.act, E, s
        self.b2 = moe.b2.detach()
        self.all1, self.all2 = pack(w1, s1, b1), pack(w2, s2, self.b2)
        rows = [slice(e * s, (e + 1) * s) for e in range(E)]
        self.each1 = [pack(w1[r], s1[r], b1[r]) for r in rows]
        self.each2 = [pack(w2[:, r], s2, None) for r in rows]
        self.all_up = self.each_up = None
        if moe.up is not None:
            up = moe.up.detach().reshape(E * s, d)
            su = row_scales(up)
            self.all_up, self.each_up = pack(up, su, None), [pack(up[r], su[r], None) for r in rows]

    def execute(self, x: torch.Tensor, mask: torch.Tensor, impl: str) -> torch.Tensor:
        flat, mask = x.reshape(-1, x.shape[-1]).float(), mask.reshape(-1, self.num_experts)  # [N, d], [N, E]
        out = self.masked(flat, mask) if impl == "masked" or bool(mask.all()) else self.gathered(flat, mask)
        return out.to(x.dtype).reshape(x.shape)

    def activated(self, x: torch.Tensor, packed) -> torch.Tensor:
        """act(x W1^T + b1): a plain ReLU (nothing hooked on it) runs inside the int8 kernel."""
        if type(self.act) is nn.ReLU and not self.act._forward_hooks:
            return linear(x, packed, relu=True)
        return self.act(linear(x, packed))

    def masked(self, flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.activated(flat, self.all1)  # [N, F]
        if self.all_up is not None:
            h = h * linear(flat, self.all_up)
        if not bool(mask.all()):  # zero the unselected experts, in place unless a hook holds h
            h = h.unflatten(-1, (self.num_experts, self.expert_size))  # [N, E, s]
            h = h * mask.unsqueeze(-1) if self.act._forward_hooks else h.mul_(mask.unsqueeze(-1))
        return linear(h.flatten(-2) if h.dim() == 3 else h, self.all2)  # [N, d], b2 included

    def gathered(self, flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        expert, token = mask.T.nonzero(as_tuple=True)  # [P] pairs, by expert
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        outs = []
        for e, xs in enumerate(flat[token].split(counts)):  # xs: [n_e, d]
            if len(xs):
                h = self.activated(xs, self.each1[e])  # [n_e, s]
                if self.each_up is not None:
                    h = h * linear(xs, self.each_up[e])
                outs.append(linear(h, self.each2[e]))  # [n_e, d]
        y = torch.cat(outs) if outs else flat.new_zeros(0, flat.shape[1])  # [P, d]
        return (flat.new_zeros(flat.shape) + self.b2).index_add_(0, token, y)
