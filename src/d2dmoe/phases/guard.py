"""Stop a training phase at the first non-finite loss, naming the phase, the step and every loss term:
a NaN would otherwise train on silently and be saved as an artifact that every later run reuses."""
from __future__ import annotations

import math

import torch


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(phase: str, step: int, loss: torch.Tensor, **terms) -> None:
    """Raise NonFiniteLoss if `loss` is NaN or infinite; `terms` are the parts it was made of."""
    if math.isfinite(float(loss)):
        return
    parts = ", ".join(f"{k}={float(v):.6g}" for k, v in {"loss": loss, **terms}.items())
    raise NonFiniteLoss(f"{phase}: non-finite loss at step {step} ({parts}); lower the phase's lr "
                        f"(or alpha), or check the data and the upstream artifact")
