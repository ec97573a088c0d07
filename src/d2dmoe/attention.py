"""Attention projections as MLPs: the paper's extension that lets MoE savings reach past the FFNs.

Each attention projection (Q, K, V, O; a fused QKV layer is first cut into its three parts) is a
d -> d Linear. It is replaced by a two-layer MLP d -> h -> d with ReLU and
h = round((d^2 + d) / (2d + 1)): h (2d + 1) hidden-layer parameters for the projection's d^2 + d,
and 2 d h ~ d^2 MACs per token. The MLP starts either random or (`svd`) as the projection's best
rank-h/2 approximation, which a ReLU MLP of h neurons computes exactly:
B relu(A x) - B relu(-A x) = B A x. `attention.width` > 1 widens the MLP past the projection's cost
(h = width * round((d^2 + d) / (2d + 1))): from h = 2d the svd start is exact, and a wider ReLU
layer has room for a sparser code, which is what dynamic-k can then exploit. The MLP is an `FFN`
of kind "attention", so the sparsity penalty, the split into experts, the routers and the cost
model treat it like a block's FFN. The MLPs learn
by distillation (phases/attention.py): while the original model runs unchanged, `Distill` feeds
each MLP the input of the projection it replaces and records its squared error to the output.
"""
from __future__ import annotations

import torch
from torch import nn

from .moe import FFN, bias


def projection_hidden(d: int, width: float = 1.0) -> int:
    """Hidden width of the MLP that replaces a d -> d projection: at width 1 the projection's
    parameters and MACs, `width` times that otherwise."""
    return round(width * round((d * d + d) / (2 * d + 1)))


INITS = ("svd", "random")


def projection_mlp(proj: nn.Linear, init: str = "random", width: float = 1.0) -> FFN:
    """An MLP of the projection's shape, on its device and dtype: PyTorch's random initialisation, or
    `svd`: equal to the projection's best rank-min(h/2, d) approximation (plus its bias) before any
    training."""
    d_in, d_out = proj.in_features, proj.out_features
    if d_in != d_out:
        raise ValueError(f"attention projections must be square to convert (d -> d), got {d_in} -> {d_out}")
    if init not in INITS:
        raise ValueError(f"unknown attention.init {init!r}; allowed: {list(INITS)}")
    h = projection_hidden(d_in, width)
    kwargs = {"device": proj.weight.device, "dtype": proj.weight.dtype}
    mlp = FFN(nn.Linear(d_in, h, **kwargs), nn.Linear(h, d_out, **kwargs), nn.ReLU(), kind="attention")
    if init == "svd":
        svd_init(mlp, proj)
    return mlp


@torch.no_grad()
def svd_init(mlp: FFN, proj: nn.Linear) -> None:
    """W = U S V^T truncated to r = min(h // 2, d): A = S^1/2 V^T [r, d], B = U S^1/2 [d, r];
    w1 = [A; -A], w2 = [B, -B], b1 = 0, b2 = the projection's bias. Neurons past 2r keep their random
    w1 row and get a zero w2 column: the MLP's output is unchanged, and they still learn."""
    h = mlp.w1.out_features
    r = min(h // 2, proj.in_features)
    u, s, vh = torch.linalg.svd(proj.weight.detach().double())
    a = (s[:r].sqrt()[:, None] * vh[:r]).to(mlp.w1.weight.dtype)  # [r, d]
    b = (u[:, :r] * s[:r].sqrt()).to(mlp.w2.weight.dtype)  # [d, r]
    mlp.w1.weight[:r], mlp.w1.weight[r:2 * r] = a, -a
    mlp.w1.bias[:2 * r].zero_()
    mlp.w2.weight.zero_()
    mlp.w2.weight[:, :r], mlp.w2.weight[:, r:2 * r] = b, -b
    mlp.w2.bias.copy_(bias(proj, proj.out_features))


def linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> nn.Linear:
    """An nn.Linear computing rows `rows` of a [out, in] weight (and bias)."""
    w = weight.detach()[rows]
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    linear.weight.data.copy_(w)
    if bias is not None:
        linear.bias.data.copy_(bias.detach()[rows])
    return linear


class Fused(nn.Module):
    """A fused projection (GPT-2's c_attn, timm's qkv) as its parts: x -> cat(part(x) for each part).
    Same outputs as the fused layer; each part can then be replaced on its own."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pieces: int) -> Fused:
        """A Linear (weight [pieces * d, d]) cut along its outputs into `pieces` Linear(d, d)."""
        d = linear.out_features // pieces
        return cls([linear_rows(linear.weight, linear.bias, slice(i * d, (i + 1) * d)) for i in range(pieces)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)  # [..., pieces * d]

    def slots(self) -> list[tuple[nn.Module, str]]:
        return [(self.parts, str(i)) for i in range(len(self.parts))]


class Distill(nn.Module):
    """Stands in for a projection while its MLP learns: returns the original projection's output
    (so the model computes exactly what it did) and keeps, per token, `error`: the MLP's mean squared
    error on the same input, and `power`: the output's mean square ([..., d] -> [...] each)."""

    def __init__(self, original: nn.Module, mlp: FFN):
        super().__init__()
        self.original, self.mlp = original, mlp
        self.error: torch.Tensor | None = None
        self.power: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = self.original(x)
        self.error = (self.mlp(x) - target).pow(2).mean(-1)
        self.power = target.detach().pow(2).mean(-1)
        return target


def projection_slots(adapter, model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every attention projection of the model, block by block."""
    return adapter.projection_slots(model)


def install_projection_mlps(adapter, model: nn.Module, distill: bool = False, init: str = "random",
                            width: float = 1.0) -> nn.Module:
    """Replace every attention projection of the model, in place, by a fresh MLP; with `distill`,
    by a `Distill` holding the original and the MLP (unwrap with `finish_distillation`)."""
    for parent, attr in projection_slots(adapter, model):
        proj = getattr(parent, attr)
        mlp = projection_mlp(proj, init, width)
        setattr(parent, attr, Distill(proj, mlp) if distill else mlp)
    return model


def distill_modules(model: nn.Module) -> list[Distill]:
    return [m for m in model.modules() if isinstance(m, Distill)]


def finish_distillation(adapter, model: nn.Module) -> nn.Module:
    """Put each `Distill`'s MLP in its place: the originals are dropped, and every weight trains again
    (distillation froze all but the MLPs; the next phase, sparsify, trains the whole model)."""
    for parent, attr in projection_slots(adapter, model):
        module = getattr(parent, attr)
        if isinstance(module, Distill):
            setattr(parent, attr, module.mlp)
    return model.requires_grad_(True)
