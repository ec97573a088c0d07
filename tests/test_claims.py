"""The claims table: verdicts worded to what the intervals support, read from the figure JSON."""
import json

from d2dmoe.claims import (CLAIMS, INCONCLUSIVE, NOT_REPRODUCED, PENDING, REPRODUCED, findings, main_margins,
                           overall, saving, steps, verdict)


def margin(mean, lo, hi, cost=0.5):
    return {"rel_cost": cost, "mean": mean, "lo": lo, "hi": hi}


def test_a_verdict_follows_where_the_interval_lies():
    assert verdict(margin(0.02, 0.005, 0.04)) == REPRODUCED
    assert verdict(margin(0.02, -0.005, 0.04)) == INCONCLUSIVE
    assert verdict(margin(-0.02, -0.04, -0.005)) == NOT_REPRODUCED
    assert verdict(margin(-0.02, -0.04, -0.005), flip=True) == REPRODUCED  # the claim: the margin is negative
    assert verdict(margin(0.02, None, None)) == INCONCLUSIVE  # one seed: no interval, no verdict
    assert overall([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert overall([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert overall([REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE]) == NOT_REPRODUCED
    assert overall([]) == PENDING


def panel(at_half, at_three_quarters, lead=None, cost=(0.45, 0.42, 0.48)):
    return {"metric": "accuracy", "seeds": [0, 1, 2],
            "d2dmoe_minus_moefication": {"at": {"0.5": at_half, "0.75": at_three_quarters},
                                         "moefication_leads_excluding_0": lead},
            "cheapest_within": {"rel_cost": {"mean": cost[0], "lo": cost[1], "hi": cost[2]},
                                "minus_dense": {"mean": -0.004, "lo": -0.01, "hi": 0.002}}}


def test_every_budget_needs_every_checked_cost_and_no_moefication_lead():
    found = main_margins({"a/x": panel(margin(0.03, 0.01, 0.05), margin(0.01, 0.002, 0.02)),
                          "b/y": panel(margin(0.03, 0.01, 0.05), margin(0.0, -0.01, 0.01)),
                          "c/z": panel(margin(0.03, 0.01, 0.05), margin(0.01, 0.002, 0.02), lead=[0.9, 1.0])})
    assert [f.verdict for f in found] == [REPRODUCED, INCONCLUSIVE, NOT_REPRODUCED]
    assert "at rel_cost 0.5: +3.00 points [+1.00, +5.00]" in found[0].measured
    assert "MoEfication ahead with an interval excluding 0: 0.900 to 1.000" in found[2].measured


def test_sixty_percent_saved_is_read_from_the_cheapest_points_interval():
    # saved 0.55 [0.52, 0.58]: below 60% with its whole interval
    assert saving({"a/x": panel(None, None)})[0].verdict == NOT_REPRODUCED
    assert saving({"a/x": panel(None, None, cost=(0.38, 0.36, 0.395))})[0].verdict == REPRODUCED
    assert saving({"a/x": panel(None, None, cost=(0.39, 0.37, 0.42))})[0].verdict == INCONCLUSIVE


def test_ablation_steps_each_against_the_previous_arm():
    arms = {"MoEfication": {"seeds": [0, 1], "metric": "accuracy"},
            "+ sparsity penalty": {"metric": "accuracy", "minus_previous": {
                "previous": "MoEfication", "seeds": [0, 1], "at": {"0.5": margin(0.02, 0.01, 0.03)}}},
            "+ regression router": {"metric": "accuracy", "minus_previous": {
                "previous": "+ sparsity penalty", "seeds": [0, 1], "at": {"0.5": margin(-0.01, -0.02, 0.01)}}}}
    assert [f.verdict for f in steps()(arms)] == [REPRODUCED, INCONCLUSIVE]
    only = steps(["+ regression router"])(arms)
    assert len(only) == 1 and only[0].where.startswith("+ regression router minus + sparsity penalty")


def test_a_claim_is_pending_until_its_figure_is_made(tmp_path):
    claim = next(c for c in CLAIMS if c.figure == "fig_main_default.json" and c.read is main_margins)
    assert findings(claim, tmp_path) is None
    (tmp_path / claim.figure).write_text(json.dumps({"a/x": panel(margin(0.03, 0.01, 0.05), None)}))
    assert [f.verdict for f in findings(claim, tmp_path)] == [REPRODUCED]
