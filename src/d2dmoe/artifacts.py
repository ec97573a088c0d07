"""Where a phase's output lives: `<root>/<phase>-<hash>/`, the hash taken over exactly the config
the phase depends on (its own settings plus its upstream phase's key). Writes are atomic: the
directory is filled under a temporary name and renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

WEIGHTS = "model.safetensors"
SPEC = "spec.json"
INFO = "info.json"


def canonical(value):
    """Whole floats as ints: `alpha=0` on the command line and `alpha: 0.0` in a file name one artifact."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(canonical(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


class Artifact:
    def __init__(self, root: str | Path, phase: str, spec: dict):
        self.phase, self.spec = phase, spec
        self.key = f"{phase}-{config_key(spec)}"
        self.dir = Path(root) / self.key

    def exists(self) -> bool:
        return (self.dir / WEIGHTS).is_file()

    def save(self, model: torch.nn.Module, info: dict | None = None) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.with_name(f".tmp-{self.key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS))
        (tmp / SPEC).write_text(json.dumps(self.spec, indent=2, sort_keys=True, default=str))
        (tmp / INFO).write_text(json.dumps(info or {}, indent=2))
        try:
            os.rename(tmp, self.dir)
        except OSError:  # another job wrote the same artifact first; both are equal, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        load_model(model, str(self.dir / WEIGHTS))
        return model
