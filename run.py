"""Hydra entry point: compose conf/, run the pipeline, write and report the points.

    python run.py                                   # built-in default: MiniLM on BBC News
    python run.py -m sparsity.alpha=0,1e-3,1e-2     # a sweep; shared phases train once
    python run.py routing=topk routing.ks=[1,2,4,8]
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from d2dmoe.job import run_job, sweep_failures


@hydra.main(version_base="1.3", config_path="pkg://d2dmoe.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    sys.exit(1 if sweep_failures else 0)  # a sweep with failed jobs (listed above) fails as a whole
