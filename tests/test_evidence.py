"""The statistics behind the figures' claims, on hand-made numbers whose answer is known: intervals
that cover a known difference, a paired comparison that finds a planted one, costs resampled with
their examples, and choices that test numbers cannot move."""
import numpy as np
import pytest
from scipy import stats

from d2dmoe.evidence import Curve, frontier_at, paired_margins, summarise, t_interval, validation_score
from d2dmoe.results import cheapest_within

rng = np.random.default_rng(0)


def curve(correct: np.ndarray, costs) -> Curve:
    """correct [P, N] (0/1) at one rel_cost per point (every example alike)."""
    n = correct.shape[1]
    return Curve("accuracy", correct.astype(float), np.ones(correct.shape), np.outer(costs, np.ones(n)), np.ones(n))


def test_t_interval_is_the_student_t_interval():
    ci = t_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sd 1
    assert ci["mean"] == 2.0 and ci["lo"] == pytest.approx(2 - half) and ci["hi"] == pytest.approx(2 + half)
    assert half == pytest.approx(2.484, abs=1e-3)
    assert t_interval([0.5]) == {"mean": 0.5, "lo": None, "hi": None, "n": 1}  # one seed: no interval


def test_frontier_interpolates_the_best_points_and_is_nan_outside():
    at = np.array([0.1, 0.2, 0.5, 0.7, 1.0, 1.1])
    out = frontier_at(np.array([0.2, 0.4, 0.6, 1.0]), np.array([0.5, 0.8, 0.7, 0.9]), "accuracy", at)
    assert np.isnan(out[[0, 5]]).all()
    assert out[1:5] == pytest.approx([0.5, 0.8 + 0.1 * 0.1 / 0.6, 0.8 + 0.1 * 0.3 / 0.6, 0.9])  # 0.6 dominated


def test_resampling_recomputes_value_and_cost_from_the_examples():
    sums, counts = rng.random((3, 50)), rng.integers(1, 5, (3, 50)).astype(float)
    macs, dense = rng.random((3, 50)) + 1, rng.random(50) + 2
    c = Curve("loss", sums, counts, macs, dense)
    w = rng.integers(0, 3, (4, 50)).astype(float)
    costs, values = c.resampled(w)
    for b in range(4):
        idx = np.repeat(np.arange(50), w[b].astype(int))  # the resample as a list of drawn examples
        assert values[b] == pytest.approx(sums[:, idx].sum(1) / counts[:, idx].sum(1))
        assert costs[b] == pytest.approx(macs[:, idx].sum(1) / dense[idx].sum())


def test_bootstrap_interval_covers_a_known_difference():
    """Accuracy 0.80 against 0.72 at every cost, fresh examples each time: the 95% interval of the
    difference covers the true 0.08 in most of 40 draws (a percentile bootstrap: about 95%)."""
    covered = 0
    for _ in range(40):
        a = (rng.random((2, 400)) < 0.80)
        b = (rng.random((2, 400)) < 0.72)
        r = paired_margins([(curve(a, [0.5, 1.0]), curve(b, [0.5, 1.0]))], np.array([0.75]), resamples=400,
                           seed=int(rng.integers(1 << 30)))
        covered += r["lo"][0] <= 0.08 <= r["hi"][0]
    assert covered >= 34


def test_paired_comparison_finds_a_planted_difference_that_unpaired_data_hide():
    """B is A with 1% of the examples A gets right turned wrong: a 1-point difference. Paired on the
    same examples, the interval excludes 0; the same two accuracies on independent examples do not
    (their spread is about six times the paired one)."""
    n = 3000
    a = rng.random(n) < 0.8
    flip = np.flatnonzero(a)[: int(0.01 * n)]
    b = a.copy()
    b[flip] = False
    paired = paired_margins([(curve(a[None], [1.0]), curve(b[None], [1.0]))], np.array([1.0]), resamples=1000)
    assert paired["mean"][0] == pytest.approx(0.01)
    assert 0.004 < paired["lo"][0] < 0.01 < paired["hi"][0] < 0.016
    independent = rng.permutation(b)  # same accuracy, examples no longer matched to A's
    unpaired = paired_margins([(curve(a[None], [1.0]), curve(independent[None], [1.0]))], np.array([1.0]),
                              resamples=1000)
    assert unpaired["lo"][0] < 0 < unpaired["hi"][0]


def test_seeds_enter_the_interval():
    """Three seeds whose margins are +0.06, 0 and -0.06 on the same examples: the mean is 0, each
    seed's margin is kept, and the interval is at least the Student-t interval of those three."""
    n = 2000
    base = rng.random(n) < 0.7
    pairs = []
    for shift in (0.06, 0.0, -0.06):
        a = base.copy()
        idx = np.flatnonzero(~a if shift > 0 else a)[: int(abs(shift) * n)]
        a[idx] = shift > 0
        pairs.append((curve(a[None], [1.0]), curve(base[None], [1.0])))
    r = paired_margins(pairs, np.array([1.0]), resamples=1000)
    assert r["mean"][0] == pytest.approx(0.0, abs=1e-12)
    assert r["per_seed"][:, 0] == pytest.approx([0.06, 0.0, -0.06], abs=1e-12)
    seeds_only = t_interval([0.06, 0.0, -0.06])
    assert r["lo"][0] <= seeds_only["lo"] and r["hi"][0] >= seeds_only["hi"]
    # the examples add little here (their mean margin is 0 under every resample but for noise)
    assert r["hi"][0] == pytest.approx(seeds_only["hi"], rel=0.05)


def test_summary_names_the_worst_cost_and_where_b_leads():
    comparison = {"at": np.array([0.2, 0.5, 0.75, 1.0]), "mean": np.array([np.nan, -0.05, 0.02, 0.01]),
                  "lo": np.array([np.nan, -0.08, -0.01, 0.0]), "hi": np.array([np.nan, -0.02, 0.05, 0.02]),
                  "valid": np.array([0.0, 1.0, 1.0, 1.0]),
                  "per_seed": np.array([[np.nan, -0.04, 0.03, 0.01], [np.nan, -0.06, 0.01, 0.01]])}
    s = summarise(comparison, (0.5, 0.75))
    assert s["shared_range"] == [0.5, 1.0]
    assert s["worst"]["rel_cost"] == 0.5 and s["worst"]["mean"] == -0.05
    assert s["b_leads_excluding_0"] == [0.5, 0.5]
    assert s["at"]["0.75"]["mean"] == 0.02 and s["at"]["0.75"]["per_seed"] == [0.03, 0.01]


def points(test: list[tuple], val: list[tuple]) -> list[dict]:
    """Dense first: (rel_cost, value) per point on test and on validation."""
    return [{"method": "dense" if i == 0 else "d2dmoe", "metric": "accuracy", "rel_cost": c, "value": v,
             "val_rel_cost": vc, "val_value": vv} for i, ((c, v), (vc, vv)) in enumerate(zip(test, val))]


def test_cheapest_within_chooses_on_validation_only():
    """On test the cheap point is within 1 point of dense; on validation it is not: validation decides,
    and no change of test numbers moves the choice."""
    val = [(1.0, 0.90), (0.4, 0.85), (0.6, 0.895)]
    test = [(1.0, 0.90), (0.4, 0.899), (0.6, 0.85)]
    assert cheapest_within(points(test, val))["val_rel_cost"] == 0.6
    for _ in range(5):
        shuffled = [(c, v) for c, v in zip([1.0, 0.4, 0.6], rng.random(3))]
        assert cheapest_within(points(shuffled, val))["val_rel_cost"] == 0.6
    with pytest.raises(ValueError, match="val_value"):
        cheapest_within([{k: v for k, v in p.items() if not k.startswith("val_")} for p in points(test, val)])


def test_validation_score_ranks_candidates_on_their_shared_cost_range():
    good = (np.array([0.3, 0.6, 1.0]), np.array([0.80, 0.88, 0.90]))
    bad = (np.array([0.2, 0.6, 1.0]), np.array([0.50, 0.84, 0.90]))
    scores = validation_score([good, bad], "accuracy")
    assert scores[0] > scores[1]
    loss = validation_score([(good[0], 1 - good[1]), (bad[0], 1 - bad[1])], "loss")  # lower loss is better
    assert loss[0] > loss[1]
