"""One Hydra job: checks, W&B run, pipeline, results files, printed table. In a sweep a failing job
leaves `failed.txt` (the error and its traceback) in its directory instead of stopping the sweep,
and `SweepReport` lists the failed jobs when the sweep ends."""
from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .validate import check_config

log = logging.getLogger(__name__)
FAILED = "failed.txt"
sweep_failures: list[str] = []  # the last sweep's failed jobs, for run.py's exit status


def wandb_group(cfg: DictConfig) -> str:
    """Jobs of one sweep share a group (the sweep directory); a single run is its own group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.group:
        return cfg.logger.group
    hc = HydraConfig.get()
    base = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir
    return f"{cfg.model.name}-{cfg.data.name}-{Path(base).name}"


def start_wandb(cfg: DictConfig, out_dir: Path):
    import wandb

    from hydra.core.hydra_config import HydraConfig

    return wandb.init(mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.entity,
                      group=wandb_group(cfg),
                      name=f"{Path(out_dir).name}-{HydraConfig.get().job.override_dirname or 'default'}"[:120],
                      job_type="convert", dir=str(out_dir), reinit="finish_previous",
                      config=OmegaConf.to_container(cfg, resolve=True))


def run_job(cfg: DictConfig) -> list[dict] | None:
    """One job. A single run raises its errors; a sweep's job records them (FAILED) and returns None,
    so that the other jobs run and keep their results."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / FAILED).unlink(missing_ok=True)  # from an earlier attempt of this job
    try:
        return convert_and_report(cfg, out_dir)
    except Exception as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        (out_dir / FAILED).write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        log.error("job failed (%s): %s: %s", out_dir, type(err).__name__, err)
        return None


def convert_and_report(cfg: DictConfig, out_dir: Path) -> list[dict]:
    from . import pipeline
    from .results import log_wandb, plot_pareto, table, write_examples, write_points, write_stats

    if cfg.offline:  # before anything imports huggingface_hub: no 25 s DNS retries per hub call
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    check_config(cfg)
    quiet_libraries()
    run = start_wandb(cfg, out_dir) if cfg.logger.enabled else None
    try:
        results = pipeline.run(cfg, run)
        points = results.points
        write_stats(results, out_dir)
        write_examples(results.examples, out_dir)
        write_points(points, out_dir)  # last: a run directory with points.jsonl is complete
        png = plot_pareto(points, out_dir / "pareto.png")
        if run is not None:
            log_wandb(run, points, png, results.stats)
        print(f"\n{cfg.model.name} on {cfg.data.name}: results in {out_dir}\n{table(points)}\n", flush=True)
        return points
    finally:
        if run is not None:
            run.finish()


def quiet_libraries() -> None:
    """Lightning's banners ("GPU available", a litlogger tip, ...) come once per Trainer: one per
    training phase and one per evaluated tau. The run logs its own line per phase and per point."""
    from datasets.utils.logging import disable_progress_bar

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    disable_progress_bar()  # datasets' bars while tokenising and caching, once per split
    # tokenised data collate in microseconds: worker processes would only add start-up time
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the routers phase freezes the base
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")  # inside Lightning


class SweepReport(Callback):
    """At the end of a sweep, print which jobs failed and why (each job's FAILED file, whatever the
    launcher: local, joblib or SLURM jobs all write into the sweep directory)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", 0.0)
        failed = sorted(p for p in sweep.rglob(FAILED) if p.stat().st_mtime >= started)
        sweep_failures[:] = [str(p.parent) for p in failed]
        if not failed:
            return
        lines = [f"{len(failed)} job(s) of the sweep in {sweep} failed:"]
        for path in failed:
            overrides = path.parent / ".hydra" / "overrides.yaml"
            what = " ".join(line.lstrip("- ").strip() for line in overrides.read_text().splitlines()) \
                if overrides.exists() else ""
            lines.append(f"  {path.parent.name} [{what}]: {path.read_text().splitlines()[0]}")
        lines.append(f"(tracebacks in each job's {FAILED}; the other jobs' results are complete)")
        print("\n".join(lines), flush=True)
