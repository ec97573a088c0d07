"""experiments/wandb_report.py builds the W&B report offline: right runs, right panels, nothing
published unless asked."""
import importlib.util
import json
import socket
from pathlib import Path

import pytest
import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr
from wandb_workspaces.reports.v2 import interface

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "wandb_report.py"


@pytest.fixture(scope="module")
def script():
    # experiments/ is not a package: load the script from its path
    spec = importlib.util.spec_from_file_location("wandb_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_api(monkeypatch):
    """Offline, and any contact with the W&B API fails the test."""
    monkeypatch.setenv("WANDB_MODE", "offline")

    def refuse(*args, **kwargs):
        raise AssertionError("the W&B API (or the network) was contacted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(interface, "_get_api", refuse)
    monkeypatch.setattr(interface, "execute_graphql", refuse)
    monkeypatch.setattr(wr.Report, "save", refuse)


def grids(report):
    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


def panels(report, kind):
    return [p for g in grids(report) for p in g.panels if isinstance(p, kind)]


def test_report_header(script):
    report = script.build_report("me", "d2dmoe", "bert-bbc-sweep1")
    assert isinstance(report, wr.Report)
    assert (report.entity, report.project, report.id) == ("me", "d2dmoe", "")  # no id: never saved
    assert "bert-bbc-sweep1" in report.title
    assert script.build_report("me", "d2dmoe", "g", title="My title").title == "My title"
    intro = next(b for b in report.blocks if isinstance(b, wr.MarkdownBlock)).text
    assert "bert-bbc-sweep1" in intro and "MACs" in intro and "tau * max_j r_j" in intro


def test_every_runset_is_the_group(script):
    report = script.build_report("me", "d2dmoe", "bert-bbc-sweep1")
    runsets = [rs for g in grids(report) for rs in g.runsets]
    assert len(grids(report)) >= 2 and len(runsets) == len(grids(report))
    for rs in runsets:
        assert (rs.entity, rs.project) == ("me", "d2dmoe")
        leaves = {(f.key.section, f.key.name, f.op, f.value) for f in expr.expr_to_filters(rs.filters).filters}
        assert leaves == {("run", "group", "=", "bert-bbc-sweep1"), ("run", "jobType", "=", "convert")}
    assert len({rs._id for rs in runsets}) == len(runsets)  # one runset object per grid


def test_panels_read_the_logged_tables(script):
    report = script.build_report("me", "d2dmoe", "g")
    charts = {c.query["summaryTable"]["tableKey"]: c for c in panels(report, wr.CustomChart)}
    assert set(charts) == {"points", "expert_use", "activation_sparsity"}
    pareto = charts["points"]
    assert pareto.chart_name in ("wandb/line/v0", "wandb/scatter/v0")
    assert (pareto.chart_fields["x"], pareto.chart_fields["y"]) == ("rel_cost", "value")
    assert pareto.chart_fields.get("stroke") == "name"  # one color per run
    assert (charts["expert_use"].chart_fields["x"], charts["expert_use"].chart_fields["y"]) == (
        "layer", "experts_per_token")
    assert charts["activation_sparsity"].chart_fields["y"] == "zero_fraction"

    tables = {p.table_name for p in panels(report, wr.WeavePanelSummaryTable)}
    assert tables == {"points", "expert_use", "activation_sparsity"}

    (pc,) = panels(report, wr.ParallelCoordinatesPlot)
    assert [c.metric for c in pc.columns] == [wr.Config(k) for k in
                                               ("method.name", "sparsity.alpha", "experts.num_experts", "routing.rule")]


def test_saved_spec(script, monkeypatch):
    """The spec save() would send: the filters, the runs-table columns (nested config) and the
    panels' references survive serialization. The one lookup (the project's id) is faked."""
    calls = []

    def fake_graphql(api, query, variables):
        calls.append(variables)
        return {"project": {"internalId": "UHJvamVjdDox"}}
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", fake_graphql)

    report = script.build_report("me", "d2dmoe", "g")
    spec = report._to_model().spec.model_dump(by_alias=True, exclude_none=True)
    assert calls and all(v == {"entityName": "me", "projectName": "d2dmoe"} for v in calls)
    blocks = [b for b in spec["blocks"] if b["type"] == "panel-grid"]
    for b in blocks:
        (rs,) = b["metadata"]["runSets"]
        assert {(f["key"]["name"], f["value"]) for f in rs["filters"]["filters"]} == {
            ("group", "g"), ("jobType", "convert")}
        assert "config:method.value.name" in rs["runFeed"]["columnPinned"]
    text = json.dumps(blocks)
    for ref in ('"points"', '"expert_use"', '"activation_sparsity"', '"rel_cost"', '"pareto_png"',
                '"config:sparsity.value.alpha"'):
        assert ref in text, ref


def test_main_previews_without_publishing(script, capsys):
    script.main(["--entity", "me", "--group", "g"])  # save() raises (no_api): it is not called
    out = capsys.readouterr().out
    assert "nothing was published" in out
    assert "points" in out and "expert_use" in out and "activation_sparsity" in out


def test_main_needs_no_entity_to_preview(script, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    script.main(["--group", "g"])  # a missing entity must not make Report ask the API
    assert "nothing was published" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--group", "g", "--publish"])


def test_main_publishes_only_with_flag(script, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/report"))
    script.main(["--entity", "me", "--group", "g"])
    assert saved == []
    script.main(["--entity", "me", "--group", "g", "--publish"])
    assert len(saved) == 1 and saved[0].entity == "me"
    assert "https://wandb.example/report" in capsys.readouterr().out
