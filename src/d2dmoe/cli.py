"""One Hydra job: checks, W&B run, pipeline, results files, printed table."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .validate import check_config

log = logging.getLogger(__name__)


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


def run_job(cfg: DictConfig) -> list[dict]:
    from hydra.core.hydra_config import HydraConfig

    from . import pipeline
    from .results import log_wandb, plot_pareto, table, write_points, write_stats

    if cfg.offline:  # before anything imports huggingface_hub: no 25 s DNS retries per hub call
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    check_config(cfg)
    # tokenised data collate in microseconds: worker processes would only add start-up time
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the routers phase freezes the base
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run = start_wandb(cfg, out_dir) if cfg.logger.enabled else None
    try:
        results = pipeline.run(cfg, run)
        points = results.points
        write_stats(results, out_dir)
        write_points(points, out_dir)  # last: a run directory with points.jsonl is complete
        png = plot_pareto(points, out_dir / "pareto.png")
        if run is not None:
            log_wandb(run, points, png, results.stats)
        print(f"\n{cfg.model.name} on {cfg.data.name}: results in {out_dir}\n{table(points)}\n", flush=True)
        return points
    finally:
        if run is not None:
            run.finish()
