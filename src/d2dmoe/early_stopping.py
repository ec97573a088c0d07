"""Train while validation improves, keep the best weights: how the dense reference converges.

`KeepBest` reads the validation metric the phase logs after each validation pass (`val/<metric>`,
with `val/loss` to break ties: accuracy on a few hundred examples ties often), stops training after
`patience` passes without a better one, and at the end of training puts the best pass's weights
back. Its state (best score, weights, passes since) goes into the resume checkpoints, so a killed
phase resumes to the same choice.
"""
from __future__ import annotations

import copy
import logging

import lightning as L
from lightning.pytorch.callbacks import Callback

from .tasks import sign

log = logging.getLogger(__name__)


class KeepBest(Callback):
    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, int(patience)
        self.best: tuple[float, float] | None = None  # (sign * metric, -loss): larger is better
        self.best_weights: dict | None = None
        self.best_epoch = -1
        self.since_best = 0
        self.history: list[float] = []  # the validation metric after each epoch

    def score(self, trainer: L.Trainer) -> tuple[float, float]:
        logged = trainer.callback_metrics
        value = float(logged[f"val/{self.metric}"])
        loss = float(logged.get("val/loss", value if self.metric == "loss" else 0.0))
        return sign(self.metric) * value, -loss

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = self.score(trainer)
        self.history.append(sign(self.metric) * score[0])
        if self.best is None or score > self.best:
            self.best, self.best_epoch, self.since_best = score, trainer.current_epoch, 0
            self.best_weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            self.since_best += 1
        stop = self.since_best >= self.patience
        trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            log.info("validation %s has not improved for %d epochs: stopping, best at epoch %d",
                     self.metric, self.since_best, self.best_epoch)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.best_weights is not None:
            module.load_state_dict(self.best_weights)

    @property
    def summary(self) -> dict:
        """What the phase's artifact records about the choice: the epoch kept, how many ran, and
        whether the patience stopped training or the cap (dense.epochs / max_steps) did, in which
        case it might have improved further."""
        if self.best is None:
            return {}
        return {"best_epoch": self.best_epoch, f"best_val_{self.metric}": sign(self.metric) * self.best[0],
                "epochs_run": len(self.history), "val_history": self.history,
                "stopped_by": "patience" if self.since_best >= self.patience else "cap"}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_weights": self.best_weights, "best_epoch": self.best_epoch,
                "since_best": self.since_best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.since_best = state["best"], state["best_epoch"], state["since_best"]
        self.history = list(state.get("history", []))
        self.best_weights = copy.copy(state["best_weights"])
