"""The official D2DMoE expert kernels, timed beside ours: `architectures/moe/moe_impls.py` of
github.com/bartwojcik/D2DMoE (MIT licence), imported from a checkout given on the command line
(`bench_wallclock.py --peer PATH`); nothing of it is copied into this repository.

The kernels module imports the checkout's `utils.py`, whose first lines import its whole training
stack (wandb, accelerate, fvcore, its datasets module, ...). The kernels use only the Triton helpers
defined in that file, so while the module is imported, each package that is not installed is
replaced by an empty placeholder module; everything the kernels run is the checkout's own code.

The peer's layer (`CustomKernelExperts` in its moe_layers.py) computes, for x [N, d] and a routing
tensor [N, E] (> 0: the expert runs): sort indices and per-expert counts on the device, a first kernel
that writes every expert's activations for its tokens ([E, N, s]), and a second kernel that multiplies
by w2 and either adds into the output atomically ("atomic") or writes per-expert rows that a third
kernel merges ("merge"). Its weights are [E, d, s] and [E, s, d]: ours, transposed.
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import torch

from d2dmoe.moe import MoE

VARIANTS = ("atomic", "merge")
ACTIVATIONS = {"ReLU": "relu", "GELU": "gelu"}  # the peer kernels' activation names


class Placeholder(types.ModuleType):
    """A package that is not installed, imported at the top of the checkout's utils.py: any attribute,
    and any call, gives another placeholder, so `from accelerate.state import AcceleratorState` and
    module-level tables like `{'aten::add': elementwise_flop_counter(0, 1)}` go through."""

    __path__: list = []  # a package, so that submodule imports resolve here too

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return Placeholder(f"{self.__name__}()")


def load(checkout: str | Path, attempts: int = 50) -> types.ModuleType:
    """The checkout's architectures.moe.moe_impls module."""
    root = Path(checkout).resolve()
    if not (root / "architectures" / "moe" / "moe_impls.py").is_file():
        raise FileNotFoundError(f"{root} is not a D2DMoE checkout: no architectures/moe/moe_impls.py")
    sys.path.insert(0, str(root))
    placed = []
    try:
        for _ in range(attempts):
            try:
                return importlib.import_module("architectures.moe.moe_impls")
            except ModuleNotFoundError as missing:  # a package of its training stack: a placeholder
                name = missing.name
                if not name or name in sys.modules or name.startswith(("architectures", "triton", "torch")):
                    raise
                sys.modules[name] = Placeholder(name)
                placed.append(name)
                for module in [m for m in sys.modules if m in ("utils", "data_utils", "data_utils.data")]:
                    del sys.modules[module]  # re-run the partly imported modules with the placeholder in
        raise ImportError(f"could not import the peer kernels from {root} after {attempts} placeholders")
    finally:
        sys.path.remove(str(root))
        for name in placed:  # placeholders served the import only
            sys.modules.pop(name, None)


class PeerExperts:
    """Our MoE layer's experts run by the peer's kernels. Call with x [N, d] and mask [N, E]."""

    def __init__(self, impls: types.ModuleType, moe: MoE, variant: str = "atomic"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown peer variant {variant!r}; allowed: {list(VARIANTS)}")
        if moe.up is not None:
            raise ValueError("the peer kernels have no gated (up-projection) experts")
        act = ACTIVATIONS.get(type(moe.act).__name__)
        if act is None or getattr(moe.act, "approximate", "none") != "none":
            raise ValueError(f"the peer kernels run {sorted(ACTIVATIONS)}, not {moe.act}")
        self.impls, self.variant, self.act = impls, variant, act
        self.w1 = moe.w1.detach().transpose(1, 2).contiguous()  # [E, d, s]
        self.b1 = moe.b1.detach().contiguous()  # [E, s]
        self.w2 = moe.w2.detach().transpose(1, 2).contiguous()  # [E, s, d]
        self.b2 = moe.b2.detach()

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        routing = mask.to(torch.int32)  # [N, E], as the peer's extract_indices casts it
        sort_indices = routing.argsort(dim=0, descending=True)  # [N, E]: each expert's tokens first
        counts = routing.sum(dim=0)  # [E]
        h = self.impls.MoeFirstLayerImplementation.apply(x, self.w1, self.b1, sort_indices, counts, self.act)
        if self.variant == "atomic":  # h: [E, N, s]
            out = self.impls.MoeSecondLayerAtomicImplementation.apply(h, self.w2, sort_indices, counts)
        else:
            out = self.impls.MoeSecondLayerMergingImplementation.apply(h, self.w2, sort_indices.argsort(dim=0),
                                                                       counts, routing)
        return out + self.b2  # [N, d]; the peer's experts have no output bias: ours is added once


def autotuners(impls: types.ModuleType) -> list:
    """The peer's autotuned kernels (each holds its list of configs)."""
    names = ("moe_first_kernel", "moe_second_kernel_atomic", "moe_second_kernel", "moe_merge_results_kernel")
    return [getattr(impls, n) for n in names]


def limit_configs(impls: types.ModuleType, keep: int | None) -> None:
    """Keep about `keep` of each kernel's autotuning configs, evenly spread over its list (None: all
    of them, about 100 per kernel: the peer at its best, but each is compiled on a fresh machine,
    minutes in all). Under Triton's CPU interpreter one is enough to check outputs."""
    if keep is None:
        return
    for tuner in autotuners(impls):
        tuner.configs = tuner.configs[::math.ceil(len(tuner.configs) / keep)]
