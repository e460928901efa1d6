"""``oodcli score`` (methods over the stored features, written to scores/) and ``oodcli sweep``
(a method's hyperparameters chosen on the validation splits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import STATE, _parse_params, _print_wide, _progress, _row_progress, err, out
from oodcli.errors import UsageError


def _print_scorer_list(as_json: bool) -> None:
    from oodcli.scorers import describe_scorers

    rows = describe_scorers()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="scorers (higher score = more in-distribution); set a parameter with -p METHOD.NAME=VALUE")
    for col in ("method", "parameters (defaults)", "needs", "what", "from"):
        table.add_column(col)
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        table.add_row(r["method"], params, r["needs"], r["summary"], r["origin"])
    _print_wide(table)


def _score_progress(bar):
    """``_row_progress`` plus ``clear(all_tasks)``: drops the bars a skipped method left half-drawn."""
    task = _row_progress(bar)

    def clear(everything: bool = False) -> None:
        for t in list(bar.tasks):
            if everything or (t.description != "methods" and not t.finished):
                bar.remove_task(t.id)

    return task, clear


def _score_failed(outcomes, named: bool) -> bool:
    """Exit 1: a method named on the command line was skipped, or 'all' wrote nothing."""
    skipped = any(o.status == "skipped" for o in outcomes)
    return skipped and (named or not any(o.status == "written" for o in outcomes))


def _score_table(outcomes, store) -> None:
    from rich.table import Table

    table = Table(title=f"scores written to {store}")
    for col in ("method", "fit", "fit s", "splits", "rows", "score s", "backbone", "status", "note"):
        table.add_column(col, justify="left" if col in ("method", "fit", "backbone", "status", "note") else "right")
    for o in outcomes:
        fit_s = f"{o.fit_seconds:.3f}" if o.fit != "-" else "-"
        note = o.reason if o.status == "skipped" else "; ".join(o.notes)
        if o.status == "written":
            table.add_row(o.method, o.fit, fit_s, str(len(o.splits)), str(sum(r.rows for r in o.splits)),
                          f"{sum(r.seconds for r in o.splits):.3f}", o.backbone or "-", o.status, note or "")
        else:
            table.add_row(o.method, "-", "-", "0", "0", "-", o.backbone or "-", o.status, note or "")
    _print_wide(table)


def score(
    methods: Optional[str] = typer.Argument(None, help="Method name(s), comma-separated, or 'all' (see --list)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Store to read features from and write scores to."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Which backbone's features (default: per method, the one that has what it needs); "
        "for ensemble, its members A,B,C."
    ),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID evaluation split (default: test)."),
    ood: Optional[list[str]] = typer.Option(None, "--ood", help="OOD split(s) to score (default: every OOD split)."),
    train_split: str = typer.Option("train", "--train", help="ID split that fitted methods learn from."),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", help="Hyperparameter METHOD.NAME=VALUE (repeatable); --list shows them with defaults."
    ),
    save_as: Optional[str] = typer.Option(
        None, "--as", help="Write one method's scores as scores/NAME/... (ablations, a second backbone)."
    ),
    list_methods: bool = typer.Option(False, "--list", help="List every method with its parameters and defaults, then exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or --list) as JSON."),
    from_sweep: bool = typer.Option(
        False, "--from-sweep", help="Use the hyperparameters 'oodcli sweep METHOD' chose (fitted/sweeps/METHOD)."
    ),
) -> None:
    """Score the ID test split and every OOD split; writes scores/<method>/<split>.

    Each method stands on its own: its scores on every split and its fitted state are
    written together (one transaction per method) or not at all. A method that cannot run
    (a missing layer, head, split or fitted input, NaN features, an ambiguous backbone) is
    skipped with its reason and the others are still written; the summary says, per
    method, written or skipped and why. Exit 1 if a method named on the command line was
    skipped (a method named alone: its error as one line). 'all' runs every method some
    backbone of the store serves and leaves the others out: a skip there does not change
    the exit code, unless nothing could be written. Unknown methods, bad -p values and a
    missing store or split fail the whole command before any work.

    Without --backbone each method uses the backbone that has what it needs (its layers on
    the ID, OOD and train splits, and the head if it reads one), and says which on stderr;
    a backbone named after the method (apex, palm) comes first; several that qualify ask for
    --backbone. When a method's backbone lacks a split, the reason names the extract command
    that makes it. 'ensemble' combines several backbones of the store, named with --backbone
    A,B,C (e.g. one architecture trained from three seeds); its scores record the members.

    Methods that learn from the ID train split (mahalanobis, rmds, knn, vim, residual,
    react) keep what they learned under fitted/<method>; the next run with the same
    parameters and train features loads it ("cached" in the summary). GROOD writes the
    gradients of a split that has none yet (e.g. an OOD set extracted after 'synthesize
    grood') from its stored features; its index stays the one over the train gradients.

    Examples:

      oodcli score --list

      oodcli score all --store stores/digits.zarr

      oodcli score knn,vim --store stores/digits.zarr -p knn.k=10 -p vim.dim=32 --json

      oodcli score energy --store stores/digits.zarr -p energy.temperature=10 --as energy-t10

      oodcli score apex,palm --store stores/digits.zarr --backbone apex -p apex.layer=embedding

      oodcli score knn,react --store stores/digits.zarr --from-sweep   # after 'oodcli sweep knn' and 'sweep react'

      oodcli score ensemble --store stores/seeds.zarr --backbone python:nets.py:seed0,python:nets.py:seed1
    """
    if list_methods:
        _print_scorer_list(as_json)
        return
    if methods is None or store is None:
        raise UsageError("score needs METHODS and --store (e.g. 'oodcli score all --store stores/digits.zarr'); "
                         "see 'oodcli score --list'")
    from oodcli.scoring import failure_line, parse_methods, score_methods
    from oodcli.store import open_store

    names = parse_methods(methods)
    named = methods.strip() != "all"
    hparams = _parse_params(param, names)
    bar = _progress()
    progress, clear = _score_progress(bar)

    def log(message: str) -> None:
        if not STATE["quiet"]:
            err.print(message, markup=False)

    outcomes = None
    try:
        with open_store(store, "r+") as st:
            outcomes = score_methods(
                st, names, backbone=backbone, id_split=id_split, ood=ood, train_split=train_split,
                hparams=hparams, progress=progress, only_applicable=not named, save_as=save_as, log=log,
                on_outcome=lambda o: clear() if o.status == "skipped" else None, from_sweep=from_sweep,
            )
    except BaseException:
        clear(everything=True)  # the error line alone, no half-drawn bars
        raise
    finally:
        if bar.live.is_started:
            if outcomes is not None and _score_failed(outcomes, named):
                clear(everything=True)  # the error line ends the output, no finished bars above it
            bar.stop()
    failed = [o for o in outcomes if o.status == "skipped"]
    if failed and len(outcomes) == 1 and named:
        raise failed[0].error  # a method named alone: its error, one line, its exit code
    if as_json:
        out.print_json(json.dumps([r.as_dict() for o in outcomes for r in o.rows()]))
    else:
        _score_table(outcomes, store)
    if _score_failed(outcomes, named):
        err.print(f"error: {failure_line(failed)}", markup=False)
        raise typer.Exit(1)


def sweep(
    method: str = typer.Argument(..., help="One method (see 'oodcli score --list')."),
    store: Path = typer.Option(..., "--store", "-s", help="Store with the train and validation splits' features."),
    grid: Optional[str] = typer.Option(
        None, "--grid", help="Settings to try, 'NAME=V1,V2;NAME=V1,...' (cartesian product); default: OpenOOD's sweep."
    ),
    val_id: str = typer.Option("val", "--val-id", help="ID validation split."),
    val_ood: Optional[list[str]] = typer.Option(
        None, "--val-ood", help="OOD validation split(s) (default: every split with role ood-val)."
    ),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Which backbone's features (default: as score)."),
    train_split: str = typer.Option("train", "--train", help="ID split that the method is fitted on."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole grid and the choice as JSON."),
) -> None:
    """Choose a method's hyperparameters on the validation splits, from stored features.

    Every setting of the grid is fitted on the train split and scored on the ID validation
    split and the OOD validation splits (role ood-val); the setting with the highest AUROC
    (mean over OOD validation sets; ties: the first in grid order) is chosen, OpenOOD's rule.
    The whole grid and the choice are written to fitted/sweeps/METHOD in one transaction; no
    test split is read. 'oodcli score METHOD --from-sweep' then scores with the choice. A
    setting that cannot run on this data (knn.k above the train rows) is listed as skipped.

    Examples:

      oodcli sweep knn --store stores/digits.zarr --grid 'k=1,10,50,100'

      oodcli sweep react --store stores/digits.zarr && oodcli score react --store stores/digits.zarr --from-sweep

      oodcli sweep gen --store stores/digits.zarr --grid 'gamma=0.01,0.1,1;top_m=3,6' --json
    """
    from oodcli.store import open_store
    from oodcli.sweeping import parse_grid, run_sweep
    from oodcli.scorers.base import is_scorer, unknown_method

    if not is_scorer(method):
        raise unknown_method(method)
    parsed = parse_grid(grid, method) if grid is not None else None
    bar = _progress()

    def log(message: str) -> None:
        if not STATE["quiet"]:
            err.print(message, markup=False)

    with open_store(store, "r+") as st:
        try:
            record = run_sweep(st, method, parsed, backbone=backbone, val_id=val_id, val_ood=val_ood,
                               train_split=train_split, progress=_row_progress(bar), log=log)
        finally:
            if bar.live.is_started:
                bar.stop()
    if as_json:
        out.print_json(json.dumps(record))
        return
    from rich.table import Table
    from rich.text import Text

    keys = list(record["grid"])
    ood = record["val_ood"]
    table = Table(title=f"sweep of {method} on {record['backbone']}: ID {record['val_id']} vs {', '.join(ood)} "
                        f"(written to fitted/sweeps/{method})")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("AUROC %", justify="right")
    table.add_column("FPR@95 % (ID positive)", justify="right")
    if len(ood) > 1:
        for s in ood:
            table.add_column(f"{s.split('/')[-1]} AUROC", justify="right")
    table.add_column("s", justify="right")
    table.add_column("note")
    for i, row in enumerate(record["settings"]):
        chosen = i == record["best"]
        style = "bold green" if chosen else None
        cells = [str(row["hparams"][k]) for k in keys]
        if row["status"] == "done":
            cells += [f"{100 * row['auroc']:.2f}", f"{100 * row['fpr95']:.2f}"]
            if len(ood) > 1:
                cells += [f"{100 * row['sets'][s]['auroc']:.2f}" for s in ood]
        else:
            cells += ["-", "-"] + (["-"] * len(ood) if len(ood) > 1 else [])
        cells += [f"{row['seconds']:.3f}", "chosen" if chosen else (row["reason"] or "")]
        table.add_row(*(Text(c, style=style) if style else Text(c) for c in cells))
    table.caption = "chosen: highest AUROC; ties go to the first setting in grid order"
    _print_wide(table)
