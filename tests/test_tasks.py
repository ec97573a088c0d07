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


def test_fidelity_to_the_dense_reference_per_example():
    """Classifiers: whether each prediction is the reference's. Language models: KL(reference ||
    model) summed over the targets that count (padding excluded), checked against a direct sum."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    cls = TASKS["accuracy"]
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    agree, count = cls.fidelity_per_example(torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]]), ref, None)
    assert agree.tolist() == [1.0, 0.0, 1.0] and count.tolist() == [1.0, 1.0, 1.0]

    lm = TASKS["loss"]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ref, out = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    kl, n = lm.fidelity_per_example(out, ref, mask)
    assert n.tolist() == [3.0, 1.0]  # targets whose position and next token are real
    p, q = ref.log_softmax(-1), out.log_softmax(-1)
    direct = [sum(F.kl_div(q[b, t], p[b, t], log_target=True, reduction="sum") for t in range(int(n[b])))
              for b in range(2)]
    assert kl.tolist() == pytest.approx([float(d) for d in direct], rel=1e-5)
    assert lm.fidelity_per_example(ref, ref, mask)[0].abs().max() < 1e-6  # the reference against itself
