"""Failing loudly and reproducibly: non-finite losses stop the phase, the same config and seed give
the same points."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2dmoe import pipeline
from d2dmoe.job import FAILED
from d2dmoe.phases import finetune
from d2dmoe.phases.guard import NonFiniteLoss, check_finite
from d2dmoe.results import read_points
from tests.conftest import ROOT, compose_config


def test_check_finite_names_phase_step_and_terms():
    check_finite("sparsify", 3, torch.tensor(1.5), task=torch.tensor(1.0))
    with pytest.raises(NonFiniteLoss, match=r"sparsify: non-finite loss at step 7 \(loss=nan, task=1, penalty=inf\)"):
        check_finite("sparsify", 7, torch.tensor(float("nan")), task=torch.tensor(1.0), penalty=float("inf"))


def test_a_nan_penalty_stops_sparsify_and_saves_nothing(smoke_cfg, monkeypatch):
    monkeypatch.setattr(finetune, "grouped_penalty", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLoss, match=r"sparsify: non-finite loss at step 0 \(loss=nan, task=[0-9.]+, "
                                            r"penalty=nan, alpha=0\)"):
        pipeline.run(smoke_cfg)
    arts = pipeline.artifacts(smoke_cfg)
    assert arts["dense"].exists() and not arts["sparsify"].exists()


def test_same_config_and_seed_give_identical_points(tmp_path):
    """Every phase trained twice from nothing, in separate artifact folders: the same points, bit for bit."""
    runs = [pipeline.run(compose_config(["experiment=smoke"], artifacts_dir=tmp_path / str(i))).points
            for i in range(2)]
    assert runs[0] == runs[1]


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    """Job 0 fails (alpha < 0), job 1 runs to the end; the sweep names the failure and exits 1."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "experiment=smoke", "sparsity.alpha=-1,0",
         f"artifacts_dir={tmp_path / 'artifacts'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ConfigError: sparsity.alpha: must be a number >= 0, got -1" in (sweep / "0" / FAILED).read_text()
    assert not (sweep / "0" / "points.jsonl").exists()
    assert len(read_points(sweep / "1" / "points.jsonl")) == 4 and not (sweep / "1" / FAILED).exists()
    assert "1 job(s) of the sweep" in result.stdout
    assert "  0 [experiment=smoke sparsity.alpha=-1 " in result.stdout and "ConfigError: sparsity.alpha" in result.stdout


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_runs_only_when_the_config_asks(trust, monkeypatch):
    """Every hub call of an adapter passes trust_remote_code=True exactly when model.trust_remote_code is set."""
    import transformers

    from d2dmoe.models import BertAdapter

    seen = []

    def record(kind):
        def from_pretrained(*args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", False)))
            raise RuntimeError("recorded")
        return from_pretrained

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", record(cls.__name__))
    adapter = BertAdapter("m", path="/nowhere", trust_remote_code=trust)
    for call in (lambda: adapter.tokenizer(), lambda: adapter.dims(2)):
        with pytest.raises(RuntimeError, match="recorded"):
            call()
    assert seen == [("AutoTokenizer", trust), ("AutoConfig", trust)]


def make_shared_artifact(root: str, log: str, out: str) -> None:
    """One sweep job's view: obtain an artifact that takes a while to make, note whether it made it."""
    import time

    from safetensors.torch import save_file

    from d2dmoe.artifacts import Artifact

    def make():
        with open(log, "a") as f:
            f.write("made\n")
        time.sleep(1.0)  # long enough that the other job finds the lock taken
        torch.manual_seed(time.time_ns() % 1000)  # each maker would make different weights
        return torch.nn.Linear(4, 4), {}

    model = Artifact(root, "shared", {"x": 1}).obtain(lambda: Artifact(root, "shared", {"x": 1}).load_into(
        torch.nn.Linear(4, 4)), make)
    save_file(dict(model.state_dict()), out)


def test_concurrent_jobs_make_a_shared_artifact_once(tmp_path):
    import multiprocessing as mp

    from safetensors.torch import load_file

    ctx = mp.get_context("spawn")
    jobs = [ctx.Process(target=make_shared_artifact, args=(str(tmp_path / "a"), str(tmp_path / "log"),
                                                           str(tmp_path / f"out{i}"))) for i in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    assert (tmp_path / "log").read_text() == "made\n"
    outs = [load_file(tmp_path / f"out{i}") for i in range(3)]
    assert all(torch.equal(o["weight"], outs[0]["weight"]) for o in outs)


# Known bug: under FSDP the resumed sparsify weights differ from an uninterrupted run's by up to 1.7e-4
# (two uninterrupted FSDP runs are identical; DDP and one process resume exactly); the full optimizer
# state's save and load through Lightning's ModelParallelStrategy is the suspect. strict: it fails
# once fixed, so that the mark goes with the bug.
FSDP_RESUME_BUG = pytest.mark.xfail(strict=True, reason="FSDP resume is not exact yet (docs/reliability.md)")


@pytest.mark.parametrize("trainer", ["default", pytest.param("fsdp", marks=[pytest.mark.slow, FSDP_RESUME_BUG])])
def test_a_run_killed_during_sparsify_resumes_to_the_same_points(tmp_path, trainer):
    """SIGKILL after sparsify's third checkpoint (second epoch), run the same command again: it
    continues from that checkpoint (dense is not retrained) and ends with the points of a run that
    was never interrupted. With trainer=fsdp (2 spawned CPU processes) the whole process group is
    killed, and the checkpoint holds the gathered full state."""
    import os
    import signal
    import time

    def command(name: str) -> list[str]:
        return [sys.executable, str(ROOT / "run.py"), "experiment=smoke", "data.limit_train=160",
                "sparsity.max_steps=-1", "sparsity.epochs=3", f"checkpoint_every={4 if trainer == 'default' else 2}",
                f"trainer={trainer}", f"artifacts_dir={tmp_path / name / 'artifacts'}",
                f"hydra.run.dir={tmp_path / name / 'run'}"]

    work = tmp_path / "killed" / "artifacts" / ".work"
    job = subprocess.Popen(command("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # its own process group: spawned workers die with it
    saves, last_mtime, deadline = 0, None, time.time() + 300
    while saves < 3 and time.time() < deadline and job.poll() is None:
        ckpts = list(work.glob("sparsify-*/last.ckpt"))
        mtime = ckpts[0].stat().st_mtime_ns if ckpts else None
        if mtime is not None and mtime != last_mtime:
            saves, last_mtime = saves + 1, mtime
        time.sleep(0.002)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert saves == 3, "the run ended before its third sparsify checkpoint"
    arts = tmp_path / "killed" / "artifacts"
    assert list(arts.glob("dense-*/model.safetensors")) and not list(arts.glob("sparsify-*/model.safetensors"))

    resumed = subprocess.run(command("killed"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = resumed.stdout + resumed.stderr
    assert "resuming sparsify from" in logs and f"reusing {arts}/dense-" in logs
    assert not list(work.glob("sparsify-*"))  # checkpoints go once the artifact is saved
    whole = subprocess.run(command("whole"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    points = [read_points(tmp_path / name / "run" / "points.jsonl") for name in ("killed", "whole")]
    assert points[0] == points[1]


def test_out_of_memory_names_the_batch_sizes(smoke_cfg, monkeypatch):
    from d2dmoe.models import BertAdapter
    from d2dmoe.phases.guard import BatchTooLarge

    forward = BertAdapter.forward

    def too_big(self, model, batch):  # the one-sample check of the layout still fits
        if len(batch["input_ids"]) == 1:
            return forward(self, model, batch)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(BertAdapter, "forward", too_big)
    with pytest.raises(BatchTooLarge, match=r"dense: out of memory with data.batch_size=16, data.eval_batch_size=64, "
                                            r"data.max_length=32; lower them"):
        pipeline.run(smoke_cfg)


class Killed(BaseException):
    """What a kill leaves: the process stops where it is, nothing after runs."""


def test_a_kill_during_an_artifacts_write_loses_only_that_phase(tmp_path, monkeypatch):
    """Killed between writing sparsify's folder under its temporary name and the rename into place: the
    same command again reuses dense, makes sparsify again and gives the points of an uninterrupted run."""
    import os

    clean = pipeline.run(compose_config(["experiment=smoke"], artifacts_dir=tmp_path / "clean")).points
    cfg = compose_config(["experiment=smoke"], artifacts_dir=tmp_path / "killed")
    rename = os.rename

    def killed_at_sparsify(src, dst):
        if "sparsify-" in str(dst):
            raise Killed(dst)
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_at_sparsify)
    with pytest.raises(Killed):
        pipeline.run(cfg)
    monkeypatch.undo()
    arts = pipeline.artifacts(cfg)
    assert arts["dense"].exists() and not arts["sparsify"].exists()
    assert pipeline.run(cfg).points == clean


def test_a_mismatched_artifact_is_named(tmp_path):
    from d2dmoe.artifacts import Artifact, CorruptArtifact

    art = Artifact(tmp_path, "sparsify", {"x": 1})
    art.save(torch.nn.Linear(4, 4))
    with pytest.raises(CorruptArtifact, match=f"{art.dir}: cannot be loaded"):
        art.load_into(torch.nn.Linear(5, 5))  # another shape than the one saved


def random_bytes(path):
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("phase, name, damage", [
    ("routers", "model.safetensors", random_bytes),  # the same size: only the checksum can tell
    ("sparsify", "model.safetensors", cut_short),
    ("split", "lineage.json", cut_short),
    ("dense", "info.json", cut_short),
])
def test_a_damaged_artifact_is_set_aside_and_made_again(phase, name, damage, tmp_path, caplog):
    """Files the pipeline wrote, damaged as a full disk or a stray write would: the next run that
    reads the artifact moves it to .stale/ with a warning naming the file, makes it again, and gives
    the points of the first run."""
    cfg = compose_config(["experiment=smoke"], artifacts_dir=tmp_path)
    first = pipeline.run(cfg).points
    arts = list(pipeline.artifacts(cfg).values())
    damaged = next(i for i, art in enumerate(arts) if art.phase == phase)
    path = arts[damaged].dir / name
    damage(path)
    for art in arts[damaged + 1:]:  # what comes after it goes, so that the run reads the damaged one
        shutil.rmtree(art.dir)
    with caplog.at_level(logging.WARNING):
        again = pipeline.run(cfg).points
    assert f"{path.parent} cannot be used" in caplog.text and str(path.name) in caplog.text
    assert any((tmp_path / ".stale").iterdir())
    assert again == first


def test_an_artifact_made_from_a_since_remade_upstream_is_made_again(tmp_path):
    """Names come from configs: a dense model deleted and retrained keeps its name, so what was made
    from the old one must not be reused with it."""
    from d2dmoe.artifacts import Artifact

    def chain():
        dense = Artifact(tmp_path, "dense", {"x": 1})
        return dense, Artifact(tmp_path, "sparsify", {}, dense)

    made = []

    def obtain(art):
        return art.obtain(lambda: art.load_into(torch.nn.Linear(2, 2)),
                          lambda: (made.append(art.phase) or torch.nn.Linear(2, 2), {}))

    for art in chain():
        obtain(art)
    for art in chain():  # the same chain on disk: reused
        obtain(art)
    assert made == ["dense", "sparsify"]
    dense, sparse = chain()
    assert sparse.lineage()["made_from"] == {dense.key: dense.lineage()["id"]}

    import shutil
    shutil.rmtree(dense.dir)
    for art in chain():
        obtain(art)
    assert made == ["dense", "sparsify"] * 2
    assert [d.name.split("-")[0] for d in (tmp_path / ".stale").iterdir()] == ["sparsify"]
    assert chain()[1].stale_reason() is None

    # saved before lineage was recorded: stale once its upstream carries an id, reusable beside an
    # upstream that has none either (nothing to check)
    (sparse.dir / "lineage.json").unlink()
    assert "dense" in chain()[1].stale_reason()
    (dense.dir / "lineage.json").unlink()
    assert chain()[1].stale_reason() is None


@pytest.mark.parametrize("data", ["bbc_news", "carer", "fashion_mnist"])
def test_a_missing_data_path_is_named(data, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config([f"data={data}", f"data.path={tmp_path}/nowhere"], artifacts_dir=tmp_path).data
    text = {} if data == "fashion_mnist" else {"tokenizer": instantiate(compose_config(["model=tiny_bert"]).model).tokenizer()}
    with pytest.raises(FileNotFoundError, match=f"data.path={tmp_path}/nowhere: no such"):
        instantiate(cfg, **text).setup()


def test_joblib_sweep_jobs_share_upstream_artifacts(tmp_path):
    """Two jobs at once (hydra/launcher=joblib) need the same dense, sparsify and split: each is made
    once and both jobs' routers are made from those very ones; each job trains its own routers.
    Whether one job waited for the other depends on timing: test_a_job_waits_for_an_artifact_being_made."""
    sweep, arts = tmp_path / "sweep", tmp_path / "artifacts"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "experiment=smoke", "routing.router.lr=1e-3,2e-3", f"artifacts_dir={arts}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    made = sorted(p.name.rsplit("-", 1)[0] for p in arts.glob("*-*") if p.is_dir())
    assert made == ["dense", "routers", "routers", "sparsify", "split"]
    lineages = [json.loads(p.read_text()) for p in arts.glob("routers-*/lineage.json")]
    assert lineages[0]["made_from"] == lineages[1]["made_from"] and len(lineages[0]["made_from"]) == 3
    assert all(len(read_points(sweep / j / "points.jsonl")) == 4 for j in "01")


def wait_for_artifact(root: str, log: str, out: str) -> None:
    """A sweep job's view of an artifact another job is making: obtain it, logging to `log`; a file
    `out`.made if this job made it; the weights it ends with in `out`."""
    import logging

    from safetensors.torch import save_file

    from d2dmoe.artifacts import Artifact

    logging.basicConfig(filename=log, level=logging.INFO, force=True)
    art = Artifact(root, "shared", {"x": 1})

    def make():
        open(f"{out}.made", "w").close()
        return torch.nn.Linear(4, 4), {}

    model = art.obtain(lambda: art.load_into(torch.nn.Linear(4, 4)), make)
    save_file(dict(model.state_dict()), out)


def test_a_job_waits_for_an_artifact_being_made(tmp_path):
    """This test holds the artifact's lock, as a job making it would: the job started meanwhile
    waits (makes nothing) until the artifact is saved and the lock released, then loads it.
    Every step waits for the one before it, so no outcome depends on which process is faster."""
    import multiprocessing as mp
    import time

    from filelock import FileLock
    from safetensors.torch import load_file

    from d2dmoe.artifacts import Artifact

    art = Artifact(tmp_path, "shared", {"x": 1})
    log, out = tmp_path / "job.log", tmp_path / "out"
    lock = FileLock(art.dir.with_name(f".{art.key}.lock"))
    lock.acquire()
    try:
        job = mp.get_context("spawn").Process(target=wait_for_artifact, args=(str(tmp_path), str(log), str(out)))
        job.start()
        deadline = time.time() + 120
        while "waiting for" not in (log.read_text() if log.exists() else "") and job.is_alive():
            assert time.time() < deadline, "the job never reported waiting"
            time.sleep(0.05)
        assert job.is_alive() and not art.exists() and not Path(f"{out}.made").exists()
        saved = torch.nn.Linear(4, 4)
        with torch.no_grad():
            saved.weight.fill_(7.0)  # unlike anything a job would make
        art.save(saved)
    finally:
        lock.release()
    job.join(120)
    assert job.exitcode == 0
    assert f"reusing {art.dir}" in log.read_text() and not Path(f"{out}.made").exists()
    assert torch.equal(load_file(out)["weight"], saved.weight.detach())


def test_ddp_and_fsdp_train_sparsify_and_routers_on_two_cpu_processes(tmp_path):
    """trainer=ddp (Lightning's ddp_spawn) and trainer=fsdp (FSDP2 through Lightning's
    ModelParallelStrategy, spawned) with 2 gloo processes on the CPU; the trained weights come back
    to this process, which saves the artifacts and evaluates. Both average the same gradients over
    the same batches, so FSDP's gathered weights equal DDP's: without the sharding's gradient
    reduction each rank would train on its own half of the data and rank 0's weights would differ."""
    from safetensors.torch import load_file

    weights = {}
    for trainer in ("ddp", "fsdp"):
        cfg = compose_config(["experiment=smoke", f"trainer={trainer}", "dense.max_steps=0"],
                             artifacts_dir=tmp_path / trainer)
        points = pipeline.run(cfg).points
        assert len(points) == 4
        arts = pipeline.artifacts(cfg)
        for phase in ("sparsify", "routers"):
            assert json.loads((arts[phase].dir / "info.json").read_text())["world_size"] == 2
        weights[trainer] = {p: load_file(arts[p].dir / "model.safetensors") for p in ("dense", "sparsify", "routers")}
    ddp, fsdp = weights["ddp"], weights["fsdp"]
    assert any(not torch.equal(ddp["dense"][k], ddp["sparsify"][k]) for k in ddp["dense"] if k in ddp["sparsify"])
    for phase in ("sparsify", "routers"):
        assert ddp[phase].keys() == fsdp[phase].keys()
        for k in ddp[phase]:
            torch.testing.assert_close(fsdp[phase][k], ddp[phase][k], rtol=1e-4, atol=1e-5, msg=f"{phase}: {k}")


@pytest.mark.parametrize("shuffle, per_rank", [(True, [4, 4, 4]), (False, [5, 5, 4])])
def test_batches_shard_across_ranks(shuffle, per_rank, monkeypatch):
    """Under data parallelism each rank gets its own batches: in training as many as every other rank
    (the remainder left out), in evaluation every example once (their sums are reduced afterwards)."""
    from d2dmoe import data

    seen = []
    for rank in range(3):
        monkeypatch.setattr(data, "rank_and_world", lambda rank=rank: (3, rank))
        sampler = data.LengthGroupedBatches(list(range(50)), batch_size=4, shuffle=shuffle)  # 13 batches; 17, 17, 16 examples
        batches = list(sampler)
        assert len(batches) == len(sampler) == per_rank[rank]
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and (shuffle or sorted(seen) == list(range(50)))


def validate(cfg, strategy: str | None) -> dict:
    """The dense phase's module validated on the smoke data: one process, or two CPU processes under
    trainer=ddp's or trainer=fsdp's strategy."""
    import lightning as L

    from d2dmoe.phases.finetune import TaskTraining
    from d2dmoe.sharded import SpawnedDDP, SpawnedFSDP

    ctx = pipeline.build_context(cfg)
    module = TaskTraining(ctx.adapter.build(ctx.dims.num_labels), ctx.adapter, lr=1e-3)
    made = {None: lambda: "auto", "ddp": SpawnedDDP, "fsdp": lambda: SpawnedFSDP(data_parallel_size=2)}[strategy]()
    trainer = L.Trainer(accelerator="cpu", devices=1 if strategy is None else 2, strategy=made,
                        use_distributed_sampler=False,  # the batch samplers shard themselves (conf/trainer/ddp.yaml)
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=ctx.data, verbose=False)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_validation_under_ddp_and_fsdp_is_what_one_process_measures(strategy, tmp_path):
    """Two gloo processes, each validating its share of the batches: the logged metric and loss (what
    early stopping reads) equal one process's on the whole split."""
    cfg = compose_config(["experiment=smoke", "data.limit_eval=37", "data.eval_batch_size=8"],
                         artifacts_dir=tmp_path)
    one, two = validate(cfg, None), validate(cfg, strategy)
    assert two["val/accuracy"] == pytest.approx(one["val/accuracy"], abs=1e-6)
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher"),
                                              ("submitit_local", "LocalLauncher")])
def test_cluster_launchers_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
