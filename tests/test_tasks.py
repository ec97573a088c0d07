"""Which way a metric is better comes from the task that reports it, for every reader of points."""
import pytest

from d2dmoe.export import choose_tau
from d2dmoe.figures import frontier
from d2dmoe.tasks import TASKS, higher_is_better, within


def test_every_task_names_its_metric_and_direction():
    assert {m: higher_is_better(m) for m in TASKS} == {"accuracy": True, "loss": False}
    with pytest.raises(KeyError):
        higher_is_better("bleu")  # a metric no task reports


def test_within_tolerance_follows_the_direction():
    assert within("accuracy", 0.905, 0.91, 0.01) and not within("accuracy", 0.895, 0.91, 0.01)
    assert within("loss", 1.019, 1.0, 0.02) and not within("loss", 1.021, 1.0, 0.02)


def test_choices_and_frontiers_follow_the_direction():
    rows = [{"tau": 0.1, "rel_cost": 0.4, "value": 2.0}, {"tau": 0.2, "rel_cost": 0.3, "value": 3.0}]
    assert choose_tau(rows, 0.5, "loss")["tau"] == 0.1
    assert choose_tau(rows, 0.5, "accuracy")["tau"] == 0.2
    points = [{"rel_cost": 0.3, "value": 3.0}, {"rel_cost": 0.4, "value": 2.0}]
    assert list(frontier(points, "loss")[1]) == [3.0, 2.0]
    assert list(frontier(points, "accuracy")[1]) == [3.0]
