"""Fused expert execution for GPUs: one Triton kernel runs every selected (token, expert) pair.

Each program takes one expert and a block of the tokens that selected it: it gathers their rows of
x, computes the expert's activations in registers, multiplies by its w2 and atomically adds the
result into the output rows. Nothing is written between the two matmuls, and the host never waits
on the device: the per-expert token lists come from a sort on the device, and programs past an
expert's token count return at once. Inference only (no backward); MoE falls back to its autograd
gather path when gradients are on.

With TRITON_INTERPRET=1 set before this module is imported, the same kernel runs on CPU tensors
through Triton's interpreter: slow, but it is how the tests check it without a GPU.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from torch import nn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_S = 64  # expert-neuron tile; wider experts loop over tiles
# Tokens per program (BLOCK_T) and model-width tile (BLOCK_D): on a GPU, the fastest of these for
# each layer shape and dtype is chosen on first use (triton.autotune). The first never spills
# registers on sm_90 (ptxas, tested) and is the one the interpreter runs; larger tiles spill in some
# variants (fp32, gated, wide experts), where autotuning's timing decides whether they still pay.
CONFIGS = [triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w)
           for t, d, w in ((32, 32, 8), (64, 32, 8), (128, 32, 8), (32, 64, 8), (64, 64, 8), (32, 32, 4),
                           (64, 32, 4))]


def block_s(S: int) -> int:
    """The expert-neuron tile for experts of S neurons: tl.dot needs tiles of at least 16."""
    return min(MAX_BLOCK_S, max(16, triton.next_power_of_2(S)))


PROBE = torch.linspace(-6, 6, 241)
ACTIVATIONS = {  # the kernel's activations, as torch computes them
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
}


ACTIVATION_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # probed once each


def activation_name(act: nn.Module) -> str:
    """Which of the kernel's activations `act` computes, found by evaluating it on a CPU probe, so
    that any module works (nn.GELU, transformers' GELUActivation and NewGELUActivation, ...). Each
    module is probed once: every fused forward asks again."""
    if act in ACTIVATION_NAMES:
        return ACTIVATION_NAMES[act]
    with torch.no_grad():
        out = act(PROBE)
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out, fn(PROBE), rtol=0, atol=1e-5):
            ACTIVATION_NAMES[act] = name
            return name
    raise ValueError(f"experts.impl=fused: the experts' activation {act} is none of {list(ACTIVATIONS)}")


def available() -> str | None:
    """None when the fused kernel can run here, else why not."""
    if INTERPRET or torch.cuda.is_available():
        return None
    return "experts.impl=fused needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"


@triton.jit
def _activate(h, ACT: tl.constexpr):
    if ACT == "relu":
        h = tl.maximum(h, 0.0)
    elif ACT == "gelu":
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == "gelu_tanh":  # tanh(u) = 2 sigmoid(2u) - 1
        h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    else:  # silu
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def _experts_kernel(x_ptr, tokens_ptr, counts_ptr, w1_ptr, b1_ptr, up_ptr, w2_ptr, out_ptr, N, D, S,
                    ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (e, b): tokens b*BLOCK_T.. of expert e's list. x [N, D], tokens [E, N] (expert e's
    tokens first), counts [E], w1/up [E, S, D], b1 [E, S], w2 [E, D, S], out [N, D] float32."""
    e = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_T
    count = tl.load(counts_ptr + e)
    if first < count:
        rows = first + tl.arange(0, BLOCK_T)
        row_ok = rows < count
        token = tl.load(tokens_ptr + e * N + rows, mask=row_ok, other=0).to(tl.int64)  # [BT]
        e_off = e.to(tl.int64) * S * D
        for s0 in range(0, S, BLOCK_S):
            s_idx = s0 + tl.arange(0, BLOCK_S)
            s_ok = s_idx < S
            h = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            u = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):  # h = x_tokens @ w1[e, s-tile].T
                d_idx = d0 + tl.arange(0, BLOCK_D)
                d_ok = d_idx < D
                xb = tl.load(x_ptr + token[:, None] * D + d_idx[None, :],
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BD]
                w_off = e_off + s_idx[None, :] * D + d_idx[:, None]  # w1[e].T tile [BD, BS]
                w_ok = d_ok[:, None] & s_ok[None, :]
                h += tl.dot(xb, tl.load(w1_ptr + w_off, mask=w_ok, other=0.0), input_precision=PRECISION)
                if GATED:
                    u += tl.dot(xb, tl.load(up_ptr + w_off, mask=w_ok, other=0.0), input_precision=PRECISION)
            h = _activate(h + tl.load(b1_ptr + e * S + s_idx, mask=s_ok, other=0.0)[None, :], ACT)
            if GATED:
                h = h * u
            h = tl.where(s_ok[None, :], h, 0.0).to(w2_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):  # out[tokens] += h @ w2[e, :, s-tile].T
                d_idx = d0 + tl.arange(0, BLOCK_D)
                d_ok = d_idx < D
                w2b = tl.load(w2_ptr + e_off + d_idx[None, :] * S + s_idx[:, None],
                              mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BS, BD]
                tl.atomic_add(out_ptr + token[:, None] * D + d_idx[None, :], tl.dot(h, w2b, input_precision=PRECISION),
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")  # nothing reads out before the end


# out is restored after each timed trial: the trials add into it
_tuned_kernel = triton.autotune(CONFIGS, key=["D", "S"], restore_value=["out_ptr"])(_experts_kernel)
# autotuning's choice for each kernel variant: later calls launch it directly, without the
# autotuner's per-call argument handling on the host
CHOSEN: dict[tuple, triton.Config] = {}


def capture(fn):
    """fn run once on a side stream (autotuning, compilation and lazily made library state happen
    there), then captured in a CUDA graph. Returns the graph and the captured call's output, which
    each graph.replay() rewrites. Fused MoE layers never wait on the host, so they can be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def precision() -> str:
    """float32 matmuls as torch does them: tf32 only where torch allows it."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def expert_tokens(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [N, E] -> (tokens [E, N] int32, each row listing the tokens that selected that expert
    first, in order; counts [E] int32), computed on the device."""
    counts = mask.sum(0, dtype=torch.int32)
    tokens = torch.argsort(mask.T.to(torch.uint8), dim=1, descending=True, stable=True)
    return tokens.to(torch.int32).contiguous(), counts  # [E, N]: argsort keeps the transpose's strides


def fused_experts(x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, act: nn.Module, up: torch.Tensor | None = None) -> torch.Tensor:
    """sum over selected experts e of w2_e act(w1_e x + b1_e) (* up_e x), plus b2.
    x [N, d], mask [N, E] bool, w1/up [E, s, d], b1 [E, s], w2 [E, d, s], b2 [d] -> [N, d]."""
    if not (INTERPRET or x.is_cuda):
        raise ValueError(f"experts.impl=fused runs on a CUDA GPU; this layer's input is on {x.device}")
    if INTERPRET and x.dtype == torch.bfloat16:  # it would return wrong numbers without an error
        raise ValueError("Triton's CPU interpreter multiplies bfloat16 as raw integer bits (triton 3.8); "
                         "run bfloat16 on a GPU, or float16/float32 in the interpreter")
    N, D = x.shape
    E, S, _ = w1.shape
    out = torch.empty(N, D, device=x.device, dtype=torch.float32).copy_(b2)  # float32: the atomic adds accumulate here
    if N == 0:  # an empty batch: no programs to launch
        return out.to(x.dtype)
    tokens, counts = expert_tokens(mask)
    w1, w2 = w1.contiguous(), w2.contiguous()
    args = (x.contiguous(), tokens, counts, w1, b1.contiguous(), w1 if up is None else up.contiguous(), w2, out,
            N, D, S)
    constants = {"ACT": activation_name(act), "GATED": up is not None, "PRECISION": precision(),
                 "BLOCK_S": block_s(S)}

    def grid(meta: dict) -> tuple[int, int]:
        return E, triton.cdiv(N, meta["BLOCK_T"])

    variant = (D, S, x.dtype, *constants.values())
    config = CONFIGS[0] if INTERPRET else CHOSEN.get(variant)  # autotuning times trials on a GPU
    if config is None:
        _tuned_kernel[grid](*args, **constants)
        CHOSEN[variant] = _tuned_kernel.best_config
    else:
        _experts_kernel[grid(config.kwargs)](*args, **constants, **config.kwargs, num_warps=config.num_warps,
                                             num_stages=config.num_stages)
    return out.to(x.dtype)
