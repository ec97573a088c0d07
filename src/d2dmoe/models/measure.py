"""The non-FFN cost of any model, measured: FlopCounterMode on the dense model at a few sequence
lengths, less the FFNs' known cost, fitted exactly by a polynomial in the token count T.

Everything outside the FFNs costs, per sample, a0 + a1 T + a2 T^2 MACs: the heads on one token
(a0), every per-token projection (a1: attention projections, embedding projections, an LM head),
attention scores and mixing (a2). Three lengths determine the polynomial; a fourth checks it, so a
model whose cost is not of this form stops with an error instead of a wrong count. Models whose
samples all have the same token count (images) are measured once at that count. The model is
built without weights, on the meta device when its forward runs there (no memory, no compute),
else on the CPU; attention runs eagerly, as explicit matmuls the counter sees.
"""
from __future__ import annotations

import copy
from fractions import Fraction

import torch
from torch.utils.flop_counter import FlopCounterMode

LENGTHS = (1, 2, 3)  # fit
CHECK = 5  # and check


def counted_macs(adapter, model, batch: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.forward(model, batch)
    return counter.get_total_flops() // 2


def non_ffn_macs(adapter, dims, lengths: list[int], device: str) -> list[int]:
    """Counted MACs of one sample of each token count in `lengths`, less its FFNs."""
    with torch.random.fork_rng(devices=[]), torch.device(device):  # building seeds torch: keep the caller's stream
        model = adapter.build(dims.num_labels if adapter.task.head_from_labels else None, weights=False).eval()
        # no parameter asks for gradients: FlopCounterMode's module tracker hooks the gradients of module
        # inputs, and fails on a parameter handed to a module (DeBERTa's relative embeddings, CaiT)
        model.requires_grad_(False)
        batches = [adapter.dummy_batch(t) for t in lengths]
    ffn = dims.layers * dims.ffn_matrices * dims.d * dims.d_ff
    return [counted_macs(adapter, model, b) - t * ffn for t, b in zip(lengths, batches)]


def measure(adapter, dims, lengths: list[int]) -> list[int]:
    eager = copy.copy(adapter)  # the same model, attention as explicit matmuls
    eager.attn_implementation = "eager"
    if hasattr(eager, "_config"):
        eager._config = None
    try:
        return non_ffn_macs(eager, dims, lengths, adapter.weightless_device)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):  # a forward that reads values
        return non_ffn_macs(eager, dims, lengths, "cpu")


def fit(adapter, dims) -> tuple[Fraction, Fraction, Fraction]:
    """(a0, a1, a2): the non-FFN MACs per sample, a0 + a1 T + a2 T^2, measured."""
    if adapter.fixed_tokens is not None:
        return Fraction(measure(adapter, dims, [adapter.fixed_tokens])[0]), Fraction(0), Fraction(0)
    y1, y2, y3, got = map(Fraction, measure(adapter, dims, [*LENGTHS, CHECK]))
    a2 = (y3 - 2 * y2 + y1) / 2  # the second difference over T = 1, 2, 3
    a1 = y2 - y1 - 3 * a2
    a0 = y1 - a1 - a2
    if a0 + a1 * CHECK + a2 * CHECK**2 != got:
        raise ValueError(f"{type(adapter).__name__} ({adapter.name}): the cost outside the FFNs is not a polynomial of "
                         f"degree 2 in the token count (measured {got} MACs at {CHECK} tokens, the fit from 1, 2, 3 "
                         f"gives {float(a0 + a1 * CHECK + a2 * CHECK**2)})")
    return a0, a1, a2
