"""Build a W&B report for one experiment group: the metric against relative cost for every run of
the group, experts executed per token, activation sparsity, and the runs' configs. Needs a W&B
account only to publish (the runs must be synced first: `wandb sync <run dir>/wandb/offline-run-*`);
without --publish it only prints what the report would contain.

    python experiments/wandb_report.py --entity ENTITY --group GROUP [--project d2dmoe] [--title T] [--publish]
"""
from __future__ import annotations

import argparse
import os

import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

# config keys of the resolved Hydra config (logged as a nested dict) that tell runs apart
CONFIG_KEYS = ("method.name", "sparsity.alpha", "experts.num_experts", "routing.rule")

INTRO = """\
Every run of the experiment group **{group}** is one `python run.py ...` job (W&B `job_type`
`convert`): a dense model converted to a Mixture-of-Experts and evaluated at several operating points.

How to read the curves:
- **relative cost** (`rel_cost`) = MACs per sample / MACs per sample of the dense model; the dense
  model sits at 1.
- **value** is the metric: accuracy (higher is better) or, for language models, loss (lower is better).
- **dynamic-k** (D2DMoE): expert *e* runs iff r_e >= tau * max_j r_j, with r_e the router's score
  for expert e; tau = 0 runs all experts, a larger tau fewer. **top-k** (MoEfication) runs the k
  highest-scoring experts.
"""


def _runset(entity: str, project: str, group: str) -> wr.Runset:
    # A fresh Runset per panel grid: each carries its own id in the saved spec.
    return wr.Runset(
        entity=entity, project=project, name=group,
        filters=expr.And(expr.Metric("Group") == group, expr.Metric("JobType") == "convert"),
        # The config is logged nested ({"method": {"name": ...}}), so W&B stores it as method.value.name.
        pinned_columns=[f"config:{k.replace('.', '.value.', 1)}" for k in CONFIG_KEYS],
    )


def _table_chart(table: str, spec: str, x: str, y: str, title: str, **fields) -> wr.CustomChart:
    # A custom chart over a summary table queries that table in every run of the runset;
    # `name` (the run's name, part of the chart query) as stroke gives one color per run.
    chart = wr.CustomChart.from_table(table, chart_fields={"x": x, "y": y, **fields},
                                      chart_strings={"title": title})
    chart.chart_name = spec  # the Vega preset the SDK's wandb.plot.* use
    chart.layout = wr.Layout(w=12, h=8)
    return chart


def _table(name: str) -> wr.WeavePanelSummaryTable:
    # the run tables of all runs, concatenated, each row tagged with its run
    return wr.WeavePanelSummaryTable(table_name=name, layout=wr.Layout(w=12, h=8))


def build_report(entity: str, project: str, group: str, title: str | None = None) -> wr.Report:
    """The report for `group`, not saved. Building it contacts no server (the entity is given)."""
    def grid(*panels):
        return wr.PanelGrid(runsets=[_runset(entity, project, group)], panels=list(panels))

    return wr.Report(
        entity=entity, project=project, title=title or f"D2DMoE: {group}",
        description=f"Quality against relative cost for the experiment group {group}.",
        width="fluid",
        blocks=[
            wr.MarkdownBlock(text=INTRO.format(group=group)),
            wr.H2(text="Metric vs relative cost"),
            grid(_table_chart("points", "wandb/line/v0", "rel_cost", "value", "value vs relative cost",
                              stroke="name"),
                 _table("points"),
                 wr.MediaBrowser(media_keys=["pareto_png"], gallery_axis="run", layout=wr.Layout(w=24, h=10))),
            wr.H2(text="Experts executed per token"),
            wr.MarkdownBlock(text="Mean number of experts run per token in each layer, at each operating "
                                  "point (`tau` for dynamic-k, `k` for top-k)."),
            grid(_table_chart("expert_use", "wandb/scatter/v0", "layer", "experts_per_token",
                              "experts per token by layer"),
                 _table("expert_use")),
            wr.H2(text="Activation sparsity"),
            wr.MarkdownBlock(text="Fraction of zero FFN activations per token in each layer (`zero_fraction`, "
                                  "its spread across tokens `zero_fraction_std`), independent of any gate."),
            grid(_table_chart("activation_sparsity", "wandb/line/v0", "layer", "zero_fraction",
                              "zero fraction by layer", stroke="name"),
                 _table("activation_sparsity")),
            wr.H2(text="Runs"),
            grid(wr.ParallelCoordinatesPlot(columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k))
                                                     for k in CONFIG_KEYS],
                                            title="configurations", layout=wr.Layout(w=24, h=8))),
        ],
    )


def _reads(panel) -> str:
    """What a panel shows, for the summary."""
    if isinstance(panel, wr.CustomChart):
        return f"{panel.query['summaryTable']['tableKey']} ({panel.chart_name}: {panel.chart_fields})"
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return panel.table_name
    if isinstance(panel, wr.MediaBrowser):
        return ", ".join(panel.media_keys)
    return ", ".join(c.metric.name for c in panel.columns)  # ParallelCoordinatesPlot


def describe(report: wr.Report) -> str:
    lines = [f"report {report.title!r} for {report.entity}/{report.project}, not saved"]
    for block in report.blocks:
        lines.append(f"- {type(block).__name__}" + (f": {block.text}" if isinstance(block, wr.H2) else ""))
        if isinstance(block, wr.PanelGrid):
            lines += [f"    runs: {rs.filters}" for rs in block.runsets]
            lines += [f"    {type(p).__name__}: {_reads(p)}" for p in block.panels]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"),
                        help="W&B entity (user or team); default $WANDB_ENTITY; required to publish")
    parser.add_argument("--project", default="d2dmoe")
    parser.add_argument("--group", required=True, help="the experiment group (one per sweep)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--publish", action="store_true", help="save the report to W&B and print its URL")
    args = parser.parse_args(argv)
    if args.publish and not args.entity:
        parser.error("--publish needs --entity (or WANDB_ENTITY)")

    # Without an entity the Report would ask the W&B API for the default one; a preview needs none.
    report = build_report(args.entity or "ENTITY", args.project, args.group, args.title)
    if args.publish:
        report.save()
        print(report.url)
    else:
        print(describe(report))
        print("nothing was published (pass --publish to save the report to W&B)")


if __name__ == "__main__":
    main()
