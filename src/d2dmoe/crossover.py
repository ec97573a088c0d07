"""experts.impl=auto: each MoE layer runs, per call, the fastest of its executions for the fraction of
experts the call executes. Selective execution (gather, or the fused kernel on a GPU) pays per expert
and per selected pair, so it wins at low fractions and loses at high ones, where one masked matmul
over every expert is faster: on this CPU, gather alone was 2.4x slower than dense over a whole model
at tau 0.002.

The choice is measured, not modelled: once per layer shape, device, dtype, int8 or not, and thread
count, every candidate execution is timed on random masks of exactly k experts per token at a ladder
of fractions; a call runs the fastest candidate of the ladder fraction nearest its own. Random masks
spread tokens evenly over the experts, a router does not, and such a table sent real calls to gather
where masked was faster (docs/results.md, wall-clock time), so where data is at hand `calibrate`
times each layer on the model's own inputs and routing instead.
"""
from __future__ import annotations

import statistics
import time

import torch

from .moe import IMPLS, DynamicKGate, MoE, fused_unavailable, moe_layers, set_gate

FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
TOKENS = 4096  # per timed call: as many rows as a batch of 32 x 128, so per-call overheads weigh as they do there
REPEATS = 3
TABLES: dict[tuple, list[tuple[float, str]]] = {}  # (shape, device, dtype, candidates, threads) -> table


def candidates(moe: MoE) -> tuple[str, ...]:
    """What auto chooses among: masked, and selective execution (the fused kernel on a GPU where it
    runs, else gather); with int8 experts also float32 gather, whose per-expert calls cost less."""
    if moe.int8 is not None:
        return "masked", "gather", "gather_float"
    if moe.w1.is_cuda and fused_unavailable() is None:
        from .fused import activation_name

        try:
            activation_name(moe.act)
            return "masked", "fused"
        except ValueError:  # an activation the kernel lacks: gather runs it
            pass
    return "masked", "gather"


def execution_ms(moe: MoE, x: torch.Tensor, mask: torch.Tensor, impl: str) -> float:
    """The median time of one call of the layer's experts with execution `impl`, after a warm-up."""
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    moe.execute(x, mask, impl)  # warm-up: scratch buffers, kernel compilation
    times = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        moe.execute(x, mask, impl)
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def measure(moe: MoE, impls: tuple[str, ...], tokens: int = TOKENS, timer=execution_ms) -> list[tuple[float, str]]:
    """[(executed fraction, fastest of `impls` there)] over the ladder. `timer(moe, x, mask, impl)`
    gives milliseconds."""
    gen = torch.Generator().manual_seed(0)  # the global RNG stays untouched
    device, E = moe.w1.device, moe.num_experts
    x = torch.randn(tokens, moe.d, generator=gen).to(device, moe.w1.dtype)  # [N, d]
    # one expert per token, then the ladder (fewer rungs for small E)
    table, ks = [], sorted({1} | {max(1, round(fraction * E)) for fraction in FRACTIONS})
    for k in ks:
        if k == E:  # every expert: execute() itself takes masked
            break
        chosen = torch.rand(tokens, E, generator=gen).topk(k, dim=-1).indices
        mask = torch.zeros(tokens, E, dtype=torch.bool).scatter_(-1, chosen, True).to(device)  # [N, E]
        ms = {impl: timer(moe, x, mask, impl) for impl in impls}
        table.append((k / E, min(ms, key=ms.get)))
    return table + [(1.0, "masked")]


def table_key(moe: MoE, impls: tuple[str, ...]) -> tuple:
    return ((moe.d, moe.expert_size, moe.num_experts, moe.up is not None), str(moe.w1.device), moe.w1.dtype,
            impls, torch.get_num_threads())


def set_tables(layers: list[MoE]) -> None:
    """Give every layer its table of fastest executions, measuring each new key once."""
    for moe in layers:
        impls = candidates(moe)
        key = table_key(moe, impls)
        if key not in TABLES:
            TABLES[key] = measure(moe, impls)
        moe.fastest = TABLES[key]


@torch.inference_mode()
def calibrate(model: torch.nn.Module, run, taus, timer=execution_ms) -> None:
    """Set every MoE layer to auto with its own table, timed on the model's own routing (no random-mask
    table is timed first): `run()` passes one real batch through the model, the experts running
    masked; at each tau, every layer's candidates are timed on that layer's input and mask from the
    batch. The layers' gates are restored."""
    layers = moe_layers(model)
    gates = [moe.gate for moe in layers]
    for moe in layers:  # routing does not depend on the execution
        moe.impl = "masked"
    seen: dict[MoE, tuple] = {}
    hooks = [moe.register_forward_hook(lambda m, args, out: seen.__setitem__(m, (args[0], m.last_mask)))
             for moe in layers]
    tables: dict[MoE, list[tuple[float, str]]] = {moe: [] for moe in layers}
    try:
        for tau in taus:
            set_gate(model, DynamicKGate(float(tau)))
            seen.clear()
            run()
            for moe in layers:
                x, mask = seen[moe]  # [B, T, d], [B, T, E]
                if not bool(mask.all()):
                    ms = {impl: timer(moe, x, mask, impl) for impl in candidates(moe)}
                    tables[moe].append((mask.sum().item() / mask.numel(), min(ms, key=ms.get)))
    finally:
        for hook in hooks:
            hook.remove()
        for moe, gate in zip(layers, gates):
            moe.gate = gate
    for moe in layers:
        moe.fastest, moe.impl = sorted(tables[moe]) + [(1.0, "masked")], "auto"


def set_impl(model: torch.nn.Module, impl: str) -> None:
    """Choose how every MoE layer executes its experts: `masked`, `gather`, `grouped`, `fused` or
    `auto` (same outputs). `fused` is checked here, before any compute: a GPU (or Triton's interpreter) and
    activations the kernel knows. `auto` times each layer shape's executions here (once per shape,
    device, dtype and thread count): masked against `fused` on a GPU where it can run, else `gather`."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE execution {impl!r}; allowed: {list(IMPLS)}")
    layers = moe_layers(model)
    if impl == "fused":
        if reason := fused_unavailable():
            raise ValueError(reason)
        from .fused import activation_name

        for moe in layers:
            activation_name(moe.act)
    if impl == "auto":
        set_tables(layers)
    for moe in layers:
        moe.impl = impl
