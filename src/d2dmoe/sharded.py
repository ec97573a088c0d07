"""Fully sharded data-parallel training (FSDP2, torch's `fully_shard`) through Lightning: `trainer=fsdp`.

Lightning's ModelParallelStrategy shards what the LightningModule's `configure_model` hook shards.
Here it runs in spawned workers, as `trainer=ddp` (ddp_spawn) does: only the training phases run
in several processes, and the full trained weights come back to the launching process, which
saves the artifacts and evaluates. Each rank holds 1/N of the sharded parameters, their gradients
and optimizer state; batches are split across ranks as under DDP.
"""
from __future__ import annotations

import os
import tempfile

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn


class SpawnedFSDP(ModelParallelStrategy):
    """FSDP2 over `data_parallel_size` spawned processes (GPUs, or CPU processes with gloo)."""

    def __init__(self, data_parallel_size: int, process_group_backend: str | None = None):
        # full (not per-rank) checkpoints: the resume checkpoints and the returned weights are one file
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=False, process_group_backend=process_group_backend)

    def _configure_launcher(self) -> None:
        self._launcher = FullWeightsLauncher(self, start_method="spawn")


class FullWeightsLauncher(_MultiProcessingLauncher):
    """ddp_spawn's launcher, returning the gathered full weights instead of rank 0's shards."""

    def _collect_rank_zero_results(self, trainer: L.Trainer, results) -> _WorkerOutput | None:
        weights = self._strategy.lightning_module_state_dict()  # every rank takes part; full on rank 0
        if self._strategy.local_rank != 0:
            return None
        path = None
        if trainer.state.fn == TrainerFn.FITTING:
            path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(weights, path)
        return _WorkerOutput(None, path, trainer.state, results, self.get_extra_results(trainer))


def shard(module: L.LightningModule, units: list[nn.Module]) -> None:
    """In `configure_model`: under `trainer=fsdp`, shard each of `units` (and then the rest of the
    model, when the units are its blocks) over the data-parallel ranks; nothing otherwise."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, mesh=mesh["data_parallel"])


def shard_blocks(module: L.LightningModule) -> None:
    """Whole-model training (dense, attention, sparsify): each Transformer block, then the rest."""
    shard(module, [*module.adapter.blocks(module.model), module.model])
