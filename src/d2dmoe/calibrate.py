"""A dynamic-k threshold per MoE layer, calibrated to a cost budget (`d2dmoe convert convert.per_layer=true`).

One global tau treats every layer alike, but layers differ in how much the model's output depends
on their low-scored experts. Per-layer calibration, in three steps:

1. `LayerProfile` (one pass over validation): for each MoE layer l and each tau of a grid, with
   only layer l gated at tau and every other layer running all experts: n_l(tau), the mean experts
   layer l executes per real token, and D_l(tau), the mean KL divergence of the model's output
   distribution from the all-experts model's (per sample, or per real token for language models).
2. `allocate`: the per-layer taus minimising sum_l D_l subject to sum_l n_l m_l <= C (m_l: MACs of
   one expert of layer l; the divergences taken as additive), by Lagrangian relaxation: for a price
   lambda, each layer independently takes argmin_tau D_l(tau) + lambda n_l(tau) m_l / M (M: every
   expert of every layer). Sweeping lambda gives the least-divergence allocation at each cost the
   relaxation reaches.
3. The caller measures allocations on validation for real (the profile gates one layer at a time,
   so it predicts the joint effect, it does not measure it).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from .cost import expert_macs
from .moe import AllExperts, DynamicKGate, moe_layers, set_gate, set_layer_taus
from .tasks import kl_divergence


def output_divergence(reference: torch.Tensor, logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Summed KL(softmax(reference) || softmax(logits)) over samples ([B, C] logits) or over real
    tokens ([B, T, V] logits, real [B, T])."""
    kl = kl_divergence(reference, logits)  # [B] or [B, T]
    return kl[real.bool()].sum() if kl.dim() == 2 else kl.sum()


class LayerProfile(L.LightningModule):
    """Run with `trainer.test` on validation; afterwards `experts[l, j]` = n_l(taus[j]) and
    `divergence[l, j]` = D_l(taus[j]) (numpy [L, J]), and `expert_macs[l]` = m_l."""

    def __init__(self, model: nn.Module, adapter, taus: list[float]):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.taus = [float(t) for t in taus]
        self.layers = moe_layers(model)
        self.expert_macs = np.array([expert_macs(m) for m in self.layers], dtype=float)

    def on_test_epoch_start(self) -> None:
        shape = (len(self.layers), len(self.taus))
        self.kept = torch.zeros(shape, dtype=torch.float64)  # (token, expert) pairs layer l executed
        self.kl = torch.zeros(shape, dtype=torch.float64)
        self.tokens = self.outputs = 0.0  # real tokens; outputs the KL averages over

    def test_step(self, batch: dict, batch_idx: int) -> None:
        real = self.adapter.token_mask(batch)  # [B, T]
        set_gate(self.model, AllExperts())
        reference = self.adapter.forward(self.model, batch)
        for l, moe in enumerate(self.layers):
            for j, tau in enumerate(self.taus):
                moe.gate = DynamicKGate(tau)
                logits = reference if tau == 0 else self.adapter.forward(self.model, batch)  # tau 0 runs all
                self.kl[l, j] += float(output_divergence(reference, logits, real))
                self.kept[l, j] += float((moe.last_mask.sum(-1) * real).sum())
            moe.gate = AllExperts()
        self.tokens += float(real.sum())
        self.outputs += float(real.sum()) if reference.dim() == 3 else len(reference)

    @property
    def experts(self) -> np.ndarray:
        return (self.kept / self.tokens).numpy()

    @property
    def divergence(self) -> np.ndarray:
        return (self.kl / self.outputs).numpy()


def allocate(error: np.ndarray, cost: np.ndarray, prices: np.ndarray | None = None) -> list[np.ndarray]:
    """The distinct allocations (index of the chosen tau per layer, [L]) on the Lagrangian path of
    min sum_l error[l, j_l] s.t. sum_l cost[l, j_l] <= C, from the dearest (price 0) to the cheapest.
    error, cost: [L, J]; cost in any unit (normalised here by its largest total)."""
    scale = cost.max(axis=1).sum()
    prices = np.concatenate([[0.0], np.geomspace(1e-5, 1e5, 801)]) if prices is None else prices
    path, seen = [], set()
    for price in prices:
        objective = error + price * cost / scale  # [L, J]
        # argmin with ties to the cheaper tau: sort candidates by (objective, cost)
        choice = np.array([np.lexsort((cost[l], objective[l]))[0] for l in range(len(error))])
        key = tuple(choice)
        if key not in seen:
            seen.add(key)
            path.append(choice)
    cheapest = np.array([int(np.argmin(c)) for c in cost])  # the path's end (infinite price)
    if tuple(cheapest) not in seen:
        path.append(cheapest)
    return path


def allocation_for(path: list[np.ndarray], error: np.ndarray, cost: np.ndarray, limit: float) -> np.ndarray:
    """The allocation on the path of least total error whose total cost is at most `limit` (the
    path's cheapest when none is)."""
    totals = [(cost[np.arange(len(c)), c].sum(), error[np.arange(len(c)), c].sum()) for c in path]
    fits = [i for i, (c, _) in enumerate(totals) if c <= limit + 1e-9]
    if not fits:
        return path[int(np.argmin([c for c, _ in totals]))]
    return path[min(fits, key=lambda i: (totals[i][1], totals[i][0]))]


def measure(ctx, model: nn.Module, split: str = "test") -> dict:
    """rel_cost, metric value and FFN experts per token of `model` at its current gates, on a split."""
    from .phases.evaluate import Evaluation

    ev = ctx.test(Evaluation(model.eval(), ctx.adapter, ctx.dims, split=split), split=split)
    return {"rel_cost": ev.rel_cost, "value": ev.value, "experts_per_token": ev.experts_per_token}


def layer_calibration(ctx, moe: nn.Module, grid: list[float], global_rows: list[dict],
                      profile_batches: int | None = None) -> list[dict]:
    """For each global-tau validation row, the per-layer taus of least predicted divergence whose
    predicted cost is at most that tau's, measured on validation: rows {tau (the global tau it is
    matched to), taus, rel_cost, value}. The profile (L x J forward passes per batch) reads the
    first `profile_batches` validation batches (all when None); the measurements read them all."""
    grid = sorted({float(t) for t in grid} | {float(r["tau"]) for r in global_rows})
    profile = ctx.test(LayerProfile(moe.eval(), ctx.adapter, grid), split="validation", batches=profile_batches)
    error, cost = profile.divergence, profile.experts * profile.expert_macs[:, None]  # [L, J] each
    path = allocate(error, cost)
    rows, measured = [], {}
    for row in global_rows:
        limit = cost[:, grid.index(float(row["tau"]))].sum()  # what the global tau is predicted to cost
        taus = tuple(grid[j] for j in allocation_for(path, error, cost, limit))
        if taus not in measured:
            set_layer_taus(moe, list(taus))
            measured[taus] = measure(ctx, moe, "validation")
        rows.append({"tau": float(row["tau"]), "taus": list(taus), **measured[taus]})
    return rows
