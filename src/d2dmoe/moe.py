"""FFN, MoE layer, router and gates.

Shapes: B batch, T tokens, d model width, F = d_ff FFN width, E experts, s = F / E neurons per expert.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn


class FFN(nn.Module):
    """The dense FFN, family-independent: x -> w2(act(w1 x)), or x -> w2(act(w1 x) * up(x)) when gated
    (SwiGLU/GeGLU: w1 is the gate projection). Adapters put one in every block; `kind` "attention"
    marks the two-layer MLPs that replace attention projections (attention.py)."""

    def __init__(self, w1: nn.Linear, w2: nn.Linear, act: nn.Module, up: nn.Linear | None = None,
                 kind: str = "ffn"):
        super().__init__()
        self.w1, self.act, self.w2, self.up = w1, act, w2, up
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))
        return self.w2(h if self.up is None else h * self.up(x))


ROUTER_KINDS = ("regression", "moefication", "moefication_original")


class Router(nn.Module):
    """d -> hidden -> E, no biases. Three kinds:
    - `regression` (D2DMoE): ReLU between, abs on the output; regresses each expert's output norm.
    - `moefication`: tanh between; the sigmoid of its logits is trained by BCE to predict each
      expert's share of the layer's activation (the MoEfication baseline as the D2DMoE paper runs it).
    - `moefication_original`: MoEfication's own MLP selection (Zhang et al., 2022): trained like
      `moefication`, but on the unit-normalised input, E wide (hidden = E), and starting from the
      experts' centroids (start_at_centroids), where it ranks experts as MoEfication's similarity
      selection does."""

    def __init__(self, d: int, num_experts: int, hidden: int = 128, kind: str = "regression"):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; allowed: {list(ROUTER_KINDS)}")
        if hidden < 1:  # a zero-width router scores every expert 0: every tau would run them all
            raise ValueError(f"a router's hidden width must be >= 1, got {hidden}")
        if kind == "moefication_original" and hidden != num_experts:
            raise ValueError(f"a moefication_original router is as wide as its {num_experts} experts, not {hidden}")
        self.kind = kind
        self.normalize = kind == "moefication_original"
        self.net = nn.Sequential(
            nn.Linear(d, hidden, bias=False), nn.ReLU() if kind == "regression" else nn.Tanh(),
            nn.Linear(hidden, num_experts, bias=False)
        )

    def start_at_centroids(self, w1: torch.Tensor) -> None:
        """First layer: each expert's centroid, the mean of its unit-normalised W1 rows (w1: [E, s, d]);
        second layer: the identity. Then logit e grows with the input's alignment with expert e's rows."""
        with torch.no_grad():
            self.net[0].weight.copy_(F.normalize(w1.float(), dim=-1).mean(1))  # [E, d]
            self.net[2].weight.copy_(torch.eye(w1.shape[0]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.normalize(x, dim=-1) if self.normalize else x)  # [..., E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores >= 0 ([..., E]) that the gates compare."""
        out = self.logits(x)
        return out.abs() if self.kind == "regression" else out.sigmoid()


class AllExperts:
    """Run every expert: the MoE then equals the dense FFN."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores, dtype=torch.bool)

    def __repr__(self) -> str:
        return "AllExperts()"


def run_all_if_unscored(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A token with a non-finite router score (NaN, or inf from an overflowing router) runs every
    expert: it keeps the dense FFN's output and pays the dense cost, which the measured cost shows,
    instead of silently losing its FFN output. Decided on the device: no host sync, so the fused
    path stays capturable in a CUDA graph."""
    return mask | ~scores.isfinite().all(dim=-1, keepdim=True)


class DynamicKGate:
    """Dynamic-k: run expert e iff r_e >= tau * max_j r_j. tau=0 runs every expert; tau=1 the experts
    tied at the maximum (every expert when all scores are equal, all-zero scores included); a token
    with a non-finite score runs every expert (run_all_if_unscored)."""

    def __init__(self, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
        self.tau = float(tau)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        # the maximum always satisfies the rule, so at least one expert runs
        return run_all_if_unscored(scores, scores >= self.tau * scores.amax(dim=-1, keepdim=True))

    def __repr__(self) -> str:
        return f"DynamicKGate(tau={self.tau})"


class TopKGate:
    """Top-k: run the k experts with the largest router scores (every expert when k >= E). Ties go to
    the lower expert index, so the choice does not depend on the device's sort; a token with a
    non-finite score runs every expert (run_all_if_unscored)."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = int(k)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        top = scores.argsort(dim=-1, descending=True, stable=True)[..., :self.k]  # [..., min(k, E)]
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return run_all_if_unscored(scores, mask)

    def __repr__(self) -> str:
        return f"TopKGate(k={self.k})"


IMPLS = ("masked", "gather", "grouped", "fused", "auto")


class MoE(nn.Module):
    """An FFN cut into E experts. Expert e owns rows e*s..(e+1)*s of w1/b1 (and of the up projection
    when gated) and the same columns of w2; the output bias b2 is added once, outside the experts.
    Gates are binary: outputs are not scaled. Layers without biases get zero biases.

    Executions with the same outputs (`impl`): `masked` computes every expert and zeroes the
    unselected ones (one big matmul; what training with all experts uses); `gather` runs each expert
    on its selected tokens only (what saves time at inference); `fused` does the same in one Triton
    kernel on a GPU, without host synchronisation (fused.py; inference only: with gradients on it
    runs as `gather`); `grouped` does gather's work in one torch._grouped_mm per weight matrix
    (inference; with gradients on, `gather`). `auto` takes, per call, the execution measured fastest
    for the fraction of experts the call runs (crossover.py). The cost model counts only the selected
    experts either way. With `int8` set (int8.py), inference runs int8 experts, masked or gathered.
    """

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 act: nn.Module, router: Router, up: torch.Tensor | None = None, kind: str = "ffn"):
        super().__init__()
        self.kind = kind  # what it was cut from: "ffn" or "attention" (a projection's MLP)
        self.num_experts, self.expert_size, self.d = w1.shape  # w1: [E, s, d]
        self.w1 = nn.Parameter(w1)  # [E, s, d]
        self.b1 = nn.Parameter(b1)  # [E, s]
        self.w2 = nn.Parameter(w2)  # [E, d, s]
        self.b2 = nn.Parameter(b2)  # [d]
        self.up = None if up is None else nn.Parameter(up)  # [E, s, d], gated FFNs only
        self.matrices = 2 if up is None else 3  # weight matrices each expert multiplies by
        self.tap = nn.Identity()  # every expert's activations [..., E, s] pass here: a hook point
        self.act = act
        self.router = router
        self.gate = AllExperts()
        self.impl = "masked"
        # impl=auto: [(executed fraction, the execution measured fastest there)], from crossover.py
        self.fastest: list[tuple[float, str]] | None = None
        self.int8 = None  # int8.Int8Experts: int8 expert weights for CPU inference
        self.last_mask: torch.Tensor | None = None  # [B, T, E] of the last forward, for cost counting

    @classmethod
    def from_ffn(cls, ffn: FFN, experts: list[torch.Tensor], router: Router) -> "MoE":
        """experts[e] holds the neuron indices of expert e; all of one size."""
        order = torch.cat(experts)
        E, s = len(experts), len(experts[0])
        w1 = ffn.w1.weight.detach()[order].reshape(E, s, -1)
        b1 = bias(ffn.w1, ffn.w1.out_features)[order].reshape(E, s)
        w2 = ffn.w2.weight.detach()[:, order].reshape(-1, E, s).transpose(0, 1)
        up = None if ffn.up is None else ffn.up.weight.detach()[order].reshape(E, s, -1).clone()
        return cls(w1.clone(), b1.clone(), w2.contiguous(), bias(ffn.w2, ffn.w2.out_features).clone(),
                   ffn.act, router, up, ffn.kind)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's activations: [..., d] -> [..., E, s]."""
        h = self.act(nn.functional.linear(x, self.w1.reshape(-1, self.d), self.b1.reshape(-1)))  # [..., E*s]
        if self.up is not None:
            h = h * (x @ self.up.reshape(-1, self.d).T)
        return h.unflatten(-1, (self.num_experts, self.expert_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.gate(self.router(x))  # [B, T, E]
        self.last_mask = mask
        impl = self.faster(mask) if self.impl == "auto" else self.impl
        return self.execute(x, mask, impl)

    def faster(self, mask: torch.Tensor) -> str:
        """impl=auto's choice for this call: the execution measured fastest at the nearest executed
        fraction. Reading the fraction waits on the device (as gather's token counts do)."""
        if self.fastest is None:
            raise RuntimeError("experts.impl=auto needs its executions timed first: set it with set_impl")
        return fastest(self.fastest, mask.sum().item() / max(mask.numel(), 1))

    def execute(self, x: torch.Tensor, mask: torch.Tensor, impl: str) -> torch.Tensor:
        """The experts under `mask` with execution `impl` ("masked", "gather", "grouped" or "fused"; with int8
        experts, "masked" and "gather" run them and "gather_float" the float32 ones)."""
        if self.int8 is not None and not torch.is_grad_enabled() and impl != "gather_float":
            return self.int8.execute(x, mask, impl)
        if impl == "fused" and not torch.is_grad_enabled():
            return self.fused(x, mask)
        if impl == "grouped" and not torch.is_grad_enabled():
            return self.grouped(x, mask)
        if impl == "masked" or bool(mask.all()):  # every expert runs: one matmul is fastest
            return self.masked(x, mask)
        return self.gathered(x, mask)

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.tap(self.hidden(x))  # [B, T, E, s]
        # in inference, a pass over h costs about what the activation does (a tenth of the layer's
        # time on a CPU): in place where nothing else holds h, and on a CPU none when every expert
        # runs (asking a GPU would wait on it)
        hooked = self.act._forward_hooks or self.tap._forward_hooks
        if torch.is_grad_enabled() or hooked:
            h = h * mask.unsqueeze(-1)
        elif x.is_cuda or not bool(mask.all()):
            h = h.mul_(mask.unsqueeze(-1))
        w2 = self.w2.transpose(0, 1).reshape(self.d, -1)  # [d, E*s]
        return nn.functional.linear(h.flatten(-2), w2, self.b2)  # [B, T, d]

    def fused(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from .fused import fused_experts  # imports triton: only where this path is chosen

        out = fused_experts(x.reshape(-1, self.d), mask.reshape(-1, self.num_experts), self.w1, self.b1,
                            self.w2, self.b2, self.act, self.up)  # [N, d]
        return out.reshape(x.shape)

    def grouped(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gather on a library kernel: the selected pairs sorted by expert, one grouped matmul per FFN
        matrix (torch._grouped_mm: each expert's rows times its own weights), the activation between,
        outputs scatter-added. Counting the pairs waits on the device."""
        flat = x.reshape(-1, self.d)  # [N, d]
        expert, token = mask.reshape(-1, self.num_experts).T.nonzero(as_tuple=True)  # [P] pairs, by expert
        out = flat.new_zeros(flat.shape) + self.b2  # [N, d]
        if not len(token):
            return out.reshape(x.shape)
        ends = torch.bincount(expert, minlength=self.num_experts).cumsum(0).to(torch.int32)  # [E]
        xs = flat[token]  # [P, d]
        h = self.act(torch._grouped_mm(xs, self.w1.transpose(1, 2), offs=ends) + self.b1[expert])  # [P, s]
        if self.up is not None:
            h = h * torch._grouped_mm(xs, self.up.transpose(1, 2), offs=ends)
        y = torch._grouped_mm(h, self.w2.transpose(1, 2), offs=ends)  # [P, d]
        return out.index_add_(0, token, y).reshape(x.shape)

    def gathered(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each expert's two matmuls on the tokens that selected it, outputs scatter-added."""
        flat = x.reshape(-1, self.d)  # [N, d]
        expert, token = mask.reshape(-1, self.num_experts).T.nonzero(as_tuple=True)  # [P] pairs, by expert
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        if torch.is_grad_enabled():
            outs = [self.expert(e, xs) for e, xs in enumerate(flat[token].split(counts)) if len(xs)]
            y = torch.cat(outs) if outs else flat.new_zeros(0, self.d)  # [P, d]; no pairs: no experts ran
            out = torch.zeros_like(flat).index_add_(0, token, y)  # [N, d]
            return (out + self.b2).reshape(x.shape)
        return self.gathered_inference(flat, token, counts).reshape(x.shape)

    def gathered_inference(self, flat: torch.Tensor, token: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The same without autograd, into reused buffers: on CPU, fresh multi-megabyte tensors on
        every call cost more in page faults than the experts' matmuls (about 2x the time, measured)."""
        P = len(token)
        xs = torch.index_select(flat, 0, token, out=scratch("xs", (P, self.d), flat))  # [P, d]
        h = scratch("h", (P, self.expert_size), flat)  # [P, s]
        up = scratch("up", (P, self.expert_size), flat) if self.up is not None else None
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.addmm(self.b1[e], xs[rows], self.w1[e].T, out=h[rows])
                if up is not None:
                    torch.mm(xs[rows], self.up[e].T, out=up[rows])
                start += n
        h = self.act(h) if up is None else self.act(h) * up
        y = scratch("y", (P, self.d), flat)  # [P, d]
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(h[start:start + n], self.w2[e].T, out=y[start:start + n])
                start += n
        return (flat.new_zeros(flat.shape) + self.b2).index_add_(0, token, y)  # [N, d]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on its tokens: [n, d] -> [n, d]."""
        h = self.act(x @ self.w1[e].T + self.b1[e])  # [n, s]
        if self.up is not None:
            h = h * (x @ self.up[e].T)
        return h @ self.w2[e].T

    @torch.no_grad()
    def expert_norms(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Router targets: ||W2_e act(W1_e x + b1_e)||_2 for every expert. x: [N, d] -> [N, E]."""
        return torch.cat([self.hidden_norms(self.hidden(xc)) for xc in x.split(chunk)])

    @torch.no_grad()
    def hidden_norms(self, h: torch.Tensor) -> torch.Tensor:
        """Expert output norms from the experts' activations h [..., E, s] -> [..., E].
        Computed as sqrt(h_e^T G_e h_e) with G_e = W2_e^T W2_e [s, s]: s/d of the work of forming
        each expert's d-dim output."""
        gram = torch.einsum("eds,edt->est", self.w2, self.w2)  # [E, s, s]
        hg = torch.einsum("...es,est->...et", h, gram)  # [..., E, s]
        return (hg * h).sum(-1).clamp_min(0).sqrt()


# Inference gather's scratch tensors, shared by every MoE layer (layers run one after another, and
# each layer's result is a fresh tensor), so memory holds one layer's pairs, not one per layer.
SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(name: str, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A reused tensor of `shape` with `like`'s dtype and device, grown when too small."""
    size = shape[0] * shape[1]
    key = (name, like.device, like.dtype)
    buf = SCRATCH.get(key)
    # a buffer made under inference mode (Lightning's evaluation) cannot be written outside it
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or buf.numel() < size or stale:
        SCRATCH.pop(key, None)  # free the old one before allocating the larger
        buf = SCRATCH[key] = like.new_empty(max(size, 1))
    return buf[:size].view(shape)


def free_scratch() -> None:
    """Release the gather scratch space (e.g. after an evaluation)."""
    SCRATCH.clear()


def fastest(table: list[tuple[float, str]], fraction: float) -> str:
    """The execution measured fastest at the ladder fraction nearest `fraction` (crossover.py times them)."""
    return min(table, key=lambda row: abs(row[0] - fraction))[1]


def bias(linear: nn.Linear, size: int) -> torch.Tensor:
    return linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(size)


def moe_layers(model: nn.Module, kind: str | None = None) -> list[MoE]:
    """The model's MoE layers in module order, all or those of one kind ("ffn", "attention")."""
    return [m for m in model.modules() if isinstance(m, MoE) and kind in (None, m.kind)]


def ffn_layers(model: nn.Module, kind: str | None = None) -> list[FFN]:
    return [m for m in model.modules() if isinstance(m, FFN) and kind in (None, m.kind)]


def set_gate(model: nn.Module, gate) -> None:
    """Give every MoE layer of the model the same expert-selection rule."""
    for moe in moe_layers(model):
        moe.gate = gate


def set_layer_taus(model: nn.Module, taus: list[float]) -> None:
    """Give MoE layer i (module order) the dynamic-k gate of taus[i] (calibrate.py chooses them)."""
    layers = moe_layers(model)
    if len(taus) != len(layers):
        raise ValueError(f"{len(taus)} taus for {len(layers)} MoE layers")
    for moe, tau in zip(layers, taus):
        moe.gate = DynamicKGate(float(tau))


def fused_unavailable() -> str | None:
    """None when `impl=fused` can run here, else why not."""
    try:
        from .fused import available
    except ImportError:
        return "experts.impl=fused needs triton (it comes with torch's Linux CUDA wheels)"
    return available()
