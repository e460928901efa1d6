"""``oodcli report``: OOD metrics of the stored scores as a table, JSON, CSV or Markdown, plots
and an HTML page."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import STATE, _print_wide, _progress, _row_progress, _split_list, err
from oodcli.errors import UsageError


def report(
    store: Path = typer.Option(..., "--store", "-s", help="Store holding scores."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: all scored)."),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID evaluation split (default: test)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json, csv or markdown."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write score histograms and ROC curves (PNG) into this folder."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write one self-contained HTML report (table + plots) to this file."),
    average_runs: bool = typer.Option(False, "--average-runs", help="One row per NAME for methods scored as NAME@RUN (score --as), metrics averaged."),
    sort: Optional[str] = typer.Option(
        None, "--sort", help="Order methods best first by COLUMN[:METRIC]: a column ('near avg', 'far avg', a set, "
        "'rank'), METRIC auroc (default), fpr95, fpr95_openood, aupr_in, aupr_out (or their _openood forms)."
    ),
    rank: bool = typer.Option(False, "--rank", help="Add each method's mean rank (by AUROC) over the OOD sets."),
    fsood: bool = typer.Option(
        False, "--fsood", help="Full-spectrum OOD (OpenOOD v1.5): count the cs-ID splits (role csid) as ID in every "
        "metric and report their accuracy; without it they count nowhere, as in OpenOOD's plain OOD evaluation."
    ),
    csv_style: str = typer.Option(
        "oodcli", "--csv-style", help="With --format csv: 'oodcli' (every metric, fractions) or 'openood' (OpenOOD's "
        "table per method: dataset,FPR@95,AUROC,AUPR_IN,AUPR_OUT,ACC in %, nearood/farood averages)."
    ),
    fpr: str = typer.Option(
        "id", "--fpr", help="FPR@95 convention of the tables: 'id' (ID positive: share of OOD kept at 95% ID "
        "recall; MCM, NegLabel) or 'openood' (OOD positive: share of ID flagged at 95% OOD recall; OpenOOD v1.5). "
        "JSON and CSV always carry both (fpr95, fpr95_openood)."
    ),
) -> None:
    """OOD metrics per OOD set and near/far averages (FPR@95, AUROC, AUPR-In/Out), ID accuracy.

    Examples:

      oodcli report --store stores/digits.zarr

      oodcli report --store stores/digits.zarr --format csv > digits.csv

      oodcli report --store stores/digits.zarr --plots stores/plots --html stores/digits.html

      oodcli report --store stores/imagenet_clip.zarr --average-runs   # negprompt@seed1..3 -> negprompt

      oodcli report --store stores/digits.zarr --rank --sort rank

      oodcli report --store stores/digits.zarr --sort 'near avg:fpr95' --format markdown

      oodcli report --store stores/cifar10.zarr --fpr openood   # FPR@95 as OpenOOD v1.5 tables print it

      oodcli report --store stores/digits.zarr --fsood   # cs-ID splits (csid/...) counted as ID

      oodcli report --store stores/digits.zarr --format csv --csv-style openood > digits-openood.csv

    The best value of every column is marked (bold) in the table, Markdown and HTML. --plots and
    --html include a summary heatmap of every method (AUROC and FPR@95 by OOD set, by mean rank).
    """
    from oodcli import reporting as rep
    from oodcli.store import open_store

    fmt = "json" if as_json else fmt
    if fmt not in rep.FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; use one of {', '.join(rep.FORMATS)}")
    if csv_style not in rep.CSV_STYLES:
        raise UsageError(f"unknown --csv-style '{csv_style}'; use one of {', '.join(rep.CSV_STYLES)}")
    if csv_style != "oodcli" and fmt != "csv":
        raise UsageError(f"--csv-style {csv_style} goes with --format csv")
    from oodcli.outputs import atomic_write, check_output_file, check_output_folder

    if plots is not None:
        check_output_folder(plots, "--plots")
    if html is not None:
        check_output_file(html, "--html")
    images = {}
    with open_store(store, "r") as st:
        data = rep.build_report(st, _split_list(methods), id_split, average_runs, fpr=fpr, fsood=fsood)
        if rank:
            rep.add_ranks(data)
        if sort is not None:
            rep.sort_methods(data, sort)
        if plots is not None or html is not None:
            bar = _progress()
            with bar:
                images = rep.make_plots(st, data, progress=_row_progress(bar))
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        for name, png in images.items():
            (plots / name).write_bytes(png)
        if not STATE["quiet"]:
            err.print(f"wrote {len(images)} plots to {plots}", markup=False)
    if html is not None:
        page = rep.render_html(data, images).encode("utf-8")
        atomic_write(html, lambda tmp: tmp.write_bytes(page))
        if not STATE["quiet"]:
            err.print(f"wrote {html}", markup=False)
    if fmt == "table":
        _print_wide(rep.render_table(data))
    elif fmt == "json":
        print(rep.render_json(data))
    elif fmt == "csv":
        sys.stdout.write(rep.render_csv(data, csv_style))
    else:
        sys.stdout.write(rep.render_markdown(data))
