"""Fully sharded data-parallel training (FSDP2, torch's `fully_shard`) through Lightning: `trainer=fsdp`.

Lightning's ModelParallelStrategy shards what the LightningModule's `configure_model` hook shards.
Here it runs in spawned workers, as `trainer=ddp` (ddp_spawn) does: only the training phases run
in several processes, and the full trained weights come back to the launching process, which
saves the artifacts and evaluates. Each rank holds 1/N of the sharded parameters, their gradients
and optimizer state; batches are split across ranks as under DDP.

Both launchers here end each worker with os._exit once its results are handed over, as
multiprocessing ends forked children. Through the interpreter's shutdown, a worker aborted now and
then (SIGABRT, "terminate called without an active exception"): its gloo process groups are still
alive there (Lightning destroys only NCCL's; destroy_process_group leaves FSDP's, which its meshes
hold), and a gloo thread releasing its last collective's tensors takes the GIL during the shutdown,
which ends that thread inside a noexcept destructor (pytorch/pytorch#190489).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn


class ClosingLauncher(_MultiProcessingLauncher):
    """ddp_spawn's launcher; each worker leaves without the interpreter's shutdown (see above)."""

    def _wrapping_function(self, *args, **kwargs) -> None:
        super()._wrapping_function(*args, **kwargs)  # rank 0's results are in the pipe when it returns
        logging.shutdown()  # flush what the worker logged and printed: os._exit flushes nothing
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class SpawnedDDP(DDPStrategy):
    """`trainer=ddp`: Lightning's ddp_spawn, with the launcher above."""

    def __init__(self, **kwargs):
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = ClosingLauncher(self, start_method="spawn")


class SpawnedFSDP(ModelParallelStrategy):
    """FSDP2 over `data_parallel_size` spawned processes (GPUs, or CPU processes with gloo)."""

    def __init__(self, data_parallel_size: int, process_group_backend: str | None = None):
        # full (not per-rank) checkpoints: the resume checkpoints and the returned weights are one file
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=False, process_group_backend=process_group_backend)

    def _configure_launcher(self) -> None:
        self._launcher = FullWeightsLauncher(self, start_method="spawn")


class FullWeightsLauncher(ClosingLauncher):
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
