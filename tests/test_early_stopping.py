"""KeepBest: training stops once validation has not improved for `patience` epochs, and the best
epoch's weights come back; ties of the metric go to the lower validation loss."""
import lightning as L
import pytest
import torch

from d2dmoe.early_stopping import KeepBest


class Scripted(L.LightningModule):
    """Each epoch sets the weight to the epoch's number; validation reports scripted numbers."""

    def __init__(self, metric: list[float], loss: list[float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.metric, self.loss = metric, loss

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.w.fill_(self.current_epoch)
        return (self.w * 0).sum() + batch[0].sum() * 0 + torch.zeros((), requires_grad=True)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.passes = getattr(self, "passes", 0) + 1
        self.log("val/accuracy", self.metric[self.current_epoch])
        self.log("val/loss", self.loss[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), batch_size=1)

    val_dataloader = train_dataloader


def fit(metric, loss, patience, epochs=10):
    module, keep = Scripted(metric, loss), KeepBest("accuracy", patience)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[keep], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module)
    return trainer, module, keep


@pytest.mark.parametrize("patience, epochs_run, best", [(1, 4, 2), (2, 5, 2), (3, 9, 5)])
def test_stops_after_patience_epochs_without_improvement_and_keeps_the_best(patience, epochs_run, best):
    # with patience 3, epochs 3 and 4 do not stop it, and epoch 5 is better than 2
    metric = [0.5, 0.6, 0.8, 0.7, 0.75, 0.9, 0.7, 0.1, 0.1, 0.1]
    trainer, module, keep = fit(metric, [1.0] * 10, patience)
    assert module.passes == epochs_run
    assert module.w.item() == best and keep.summary == {
        "best_epoch": best, "best_val_accuracy": pytest.approx(metric[best]), "epochs_run": epochs_run,
        "val_history": pytest.approx(metric[:epochs_run]), "stopped_by": "patience"}


def test_the_record_says_when_the_cap_stopped_training():
    """A best epoch that is the last one allowed: the cap stopped it, and it might have gone on improving."""
    _, _, keep = fit([0.5, 0.6, 0.7], [1.0] * 3, patience=2, epochs=3)
    assert keep.summary["stopped_by"] == "cap" and keep.summary["epochs_run"] == 3 and keep.best_epoch == 2


def test_a_tie_in_the_metric_goes_to_the_lower_loss():
    _, module, keep = fit([0.8, 0.8, 0.8, 0.8], [0.5, 0.4, 0.45, 0.6], patience=2, epochs=4)
    assert module.w.item() == 1 and keep.best_epoch == 1
