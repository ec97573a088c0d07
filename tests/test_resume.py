"""A run interrupted part-way through any training phase (dense, attention, sparsify, routers),
started again with the same config, resumes that phase from its last checkpoint, reuses what is
upstream of it, and saves the very weights a run that was never interrupted saves."""
import logging
import shutil

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from d2dmoe import pipeline
from d2dmoe.resume import LAST
from tests.conftest import compose_config

# every phase in one chain: the converted attention projections add the attention phase
OVERRIDES = ["experiment=smoke", "attention.convert=true", "attention.num_experts=4", "attention.router_hidden=8",
             "checkpoint_every=2"]
STOP = 3  # interrupted after step 3 of 4: the step-2 checkpoint is the one to resume from, step 3 is redone


class Interrupted(Exception):
    pass


class InterruptAt(Callback):
    """Raises after step `step` of `phase`, as a kill would end it: nothing saved beyond the checkpoints."""

    def __init__(self, phase: str, step: int):
        self.phase, self.step = phase, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # before ModelCheckpoint's own hook (Lightning runs checkpoint callbacks last)
        if pl_module.phase == self.phase and trainer.global_step == self.step:
            raise Interrupted(f"{self.phase} at step {self.step}")


class PhaseSaved(Exception):
    pass


class StopAfter(Callback):
    """Ends the run when a later phase starts training: `phase` is saved by then, and what comes after
    it is not under test."""

    def __init__(self, phase: str):
        self.phase = phase

    def on_train_start(self, trainer, pl_module):
        if pl_module.phase != self.phase:
            raise PhaseSaved(self.phase)


def config(root, cache):
    return compose_config([*OVERRIDES, f"data.cache_dir={cache}"], artifacts_dir=root)


def weights(art) -> dict[str, torch.Tensor]:
    return load_file(art.dir / "model.safetensors")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Every phase trained without interruption (checkpoints on, as in the interrupted runs), and the
    tokenised data cache, shared by every case."""
    root = tmp_path_factory.mktemp("resume")
    cfg = config(root / "whole", root / "cache")
    pipeline.convert(cfg)
    return root, pipeline.artifacts(cfg)


def interruptible(phase: str, whole, tmp_path, monkeypatch):
    """(the phase's artifact, run_with(callback)): its upstream copied from the uninterrupted run, so
    that only this phase trains; run_with runs the config with one more Trainer callback."""
    root, done = whole
    cfg = config(tmp_path / "artifacts", root / "cache")
    art = pipeline.artifacts(cfg)[phase]
    for up in art.ancestors():
        shutil.copytree(done[up.phase].dir, up.dir)
    make_callbacks = pipeline.resume_callbacks

    def run_with(callback: Callback) -> None:
        monkeypatch.setattr(pipeline, "resume_callbacks", lambda work_dir, every: [*make_callbacks(work_dir, every),
                                                                                   callback])
        pipeline.convert(cfg)

    return art, run_with


@pytest.mark.parametrize("phase", ["dense", "attention", "sparsify", "routers"])
def test_a_run_interrupted_in_a_phase_resumes_it_to_the_same_weights(phase, whole, tmp_path, monkeypatch, caplog):
    done = whole[1]
    art, run_with = interruptible(phase, whole, tmp_path, monkeypatch)
    upstream = art.ancestors()
    with pytest.raises(Interrupted):
        run_with(InterruptAt(phase, STOP))
    assert (art.work_dir / LAST).is_file() and not art.exists()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="d2dmoe")
    try:  # the same config again, this time to the end of the phase
        run_with(StopAfter(phase))
    except PhaseSaved:
        pass
    assert f"resuming {phase} from {art.work_dir / LAST}" in caplog.text
    assert art.exists() and not art.work_dir.exists()
    if upstream:
        assert f"reusing {upstream[0].dir}" in caplog.text
    assert not [up.phase for up in upstream if f"training {up.phase}" in caplog.text]
    # made from the very upstream artifacts the uninterrupted run made (their ids), none made again
    assert art.lineage()["made_from"] == done[phase].lineage()["made_from"]
    assert all(up.lineage() == done[up.phase].lineage() for up in upstream)
    resumed, expected = weights(art), weights(done[phase])
    assert resumed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), f"{phase}: {k} differs from the uninterrupted run's"


@pytest.mark.parametrize("damage", ["cut short", "a pickle"])
def test_an_unreadable_checkpoint_is_moved_aside_and_the_phase_starts_again(damage, whole, tmp_path, monkeypatch,
                                                                           caplog):
    """sparsify's resume checkpoint cut short (a full disk) or replaced by a pickle weights_only
    refuses: the run says which file, moves it aside, and trains the phase from its start, to the
    weights of the uninterrupted run."""
    done = whole[1]
    art, run_with = interruptible("sparsify", whole, tmp_path, monkeypatch)
    with pytest.raises(Interrupted):
        run_with(InterruptAt("sparsify", STOP))
    checkpoint = art.work_dir / LAST
    if damage == "cut short":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    else:
        import pickle

        checkpoint.write_bytes(pickle.dumps(Interrupted("not a checkpoint")))
    caplog.set_level(logging.INFO, logger="d2dmoe")
    try:
        run_with(StopAfter("sparsify"))
    except PhaseSaved:
        pass
    assert f"{checkpoint} cannot be read" in caplog.text and "the phase starts again from its beginning" in caplog.text
    assert "resuming sparsify" not in caplog.text and art.exists()
    assert [p.name for p in (tmp_path / "artifacts" / ".stale").iterdir()][0].startswith(f"{art.key}-{LAST}")
    resumed, expected = weights(art), weights(done["sparsify"])
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


class Killed(BaseException):
    """What a kill leaves: the process stops where it is, nothing after runs."""


def test_a_kill_during_a_checkpoint_write_keeps_the_last_checkpoint(whole, tmp_path, monkeypatch, caplog):
    """Killed while sparsify writes its second checkpoint, between the temporary file (written in
    full) and the rename over last.ckpt: the first checkpoint is still whole, the same command again
    resumes from it, and the phase ends with the weights of the uninterrupted run."""
    import os

    done = whole[1]
    art, run_with = interruptible("sparsify", whole, tmp_path, monkeypatch)
    replace, writes = os.replace, []

    def killed_at_second_write(src, dst):
        if str(dst).endswith(LAST):
            writes.append(dst)
            if len(writes) == 2:
                raise Killed(dst)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_second_write)
    with pytest.raises(Killed):
        run_with(StopAfter("sparsify"))
    monkeypatch.setattr(os, "replace", replace)
    assert (art.work_dir / LAST).is_file() and list(art.work_dir.glob(f".tmp-{LAST}-*")) and not art.exists()
    caplog.set_level(logging.INFO, logger="d2dmoe")
    try:
        run_with(StopAfter("sparsify"))
    except PhaseSaved:
        pass
    assert f"resuming sparsify from {art.work_dir / LAST}" in caplog.text and "cannot be read" not in caplog.text
    resumed, expected = weights(art), weights(done["sparsify"])
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
