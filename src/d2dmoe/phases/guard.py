"""Failing with a message that says what to do: a non-finite loss stops its phase at once (naming
the phase, the step and every loss term: a NaN would otherwise train on silently and be saved as an
artifact every later run reuses), and running out of memory names the batch sizes to lower."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(phase: str, step: int, loss: torch.Tensor, **terms) -> None:
    """Raise NonFiniteLoss if `loss` is NaN or infinite; `terms` are the parts it was made of."""
    value = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    if math.isfinite(value(loss)):
        return
    parts = ", ".join(f"{k}={value(v):.6g}" for k, v in {"loss": loss, **terms}.items())
    raise NonFiniteLoss(f"{phase}: non-finite loss at step {step} ({parts}); lower the phase's lr "
                        f"(or alpha), or check the data and the upstream artifact")


class BatchTooLarge(RuntimeError):
    pass


OOM_MESSAGES = ("out of memory", "can't allocate memory")  # CUDA, and the CPU allocator


@contextmanager
def out_of_memory_hint(phase: str, data) -> Iterator[None]:
    """Re-raise running out of memory (GPU or CPU) as BatchTooLarge, naming the settings to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError) \
                and not any(m in str(err) for m in OOM_MESSAGES):
            raise
        sizes = ", ".join(f"data.{k}={getattr(data, k)}" for k in ("batch_size", "eval_batch_size", "max_length")
                          if getattr(data, k, None) is not None)
        raise BatchTooLarge(f"{phase}: out of memory with {sizes}; lower them and run again "
                            f"(finished phases are reused) [{type(err).__name__}: {str(err)[:200]}]") from err
