"""The ``oodcli`` command line: thin commands that parse, call the library and print.

Results go to stdout (a rich table, or JSON with ``--json``); progress and logs go
to stderr. Exit codes: 0 success, 1 the work failed, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from oodcli import __version__
from oodcli.errors import OodError, UsageError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

INTERRUPTED = ("interrupted: the store keeps only whole results; run the same command again to finish "
               "(an extraction resumes where it stopped)")


class _Commands(typer.core.TyperGroup):
    """Turns a user error raised anywhere below into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OodError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # typer would turn it into a silent exit 130
            err.print(INTERRUPTED, markup=False)
            raise typer.Exit(130) from None
        except OSError as exc:  # the file system said no (permissions, disk full, a path that is a folder)
            if exc.filename is None:
                raise
            err.print(f"error: {exc.strerror or type(exc).__name__}: {exc.filename}", markup=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    name="oodcli",
    help=(
        "Out-of-distribution detection from a feature store: extract a backbone's features once, "
        "then score, train and report from the store.\n\n"
        "Example:  oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors "
        "--benchmark digits --store stores/digits.zarr && oodcli score all --store stores/digits.zarr "
        "&& oodcli report --store stores/digits.zarr"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
store_app = typer.Typer(help="Inspect and check stores.", no_args_is_help=True)
train_app = typer.Typer(help="Train classifiers, heads and prompts from data or the store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(train_app, name="train")

STATE = {"quiet": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"oodcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or logs on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["quiet"] = quiet


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=STATE["quiet"],
        transient=False,
    )


def _split_list(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


# ---- extract ------------------------------------------------------------------------


def _list_models(value: bool) -> None:
    if not value:
        return
    from rich.table import Table

    from oodcli.backbones import all_specs

    table = Table(title="backbones (the -tiny twins are random-initialised test models)")
    for col in ("model", "family", "layers (default first)", "default weights"):
        table.add_column(col)
    for name, spec in sorted(all_specs().items()):
        rest = [layer for layer in spec.layers if layer not in spec.default_layers]
        layers = ", ".join(spec.default_layers) + (f" (+ {', '.join(rest)})" if rest else "")
        weights = "--weights PATH" if spec.needs_weights_file else str(spec.default_weights)
        table.add_row(name, spec.family, layers, weights)
    _print_wide(table)
    raise typer.Exit()


def _list_benchmarks(value: bool) -> None:
    if not value:
        return
    from rich.table import Table

    from oodcli.data.benchmarks import get_benchmark, list_benchmarks

    table = Table(title="benchmarks")
    for col in ("benchmark", "classes", "splits"):
        table.add_column(col)
    for name in list_benchmarks():
        bench = get_benchmark(name)
        table.add_row(name, str(bench.num_classes), ", ".join(s.name for s in bench.splits))
    _print_wide(table)
    raise typer.Exit()


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="Backbone name (see --list-models)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store path: *.zarr (default format) or *.h5."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Benchmark name, e.g. digits, cifar10."),
    data: Optional[str] = typer.Option(
        None, "--data", help="A data source instead of a benchmark: folder:DIR, imglist:FILE[@IMAGEDIR], torchvision:NAME:SPLIT."
    ),
    split: Optional[list[str]] = typer.Option(
        None, "--split", help="Split name(s) to extract; default: every split of the benchmark."
    ),
    role: Optional[str] = typer.Option(
        None, "--role", help="With --data: id, ood-near, ood-far, ood, ood-val (held out for sweep) or synthetic "
        "(generated OOD images for training); neither of the last two is ever a test set. Default: from the split "
        "name: ood/near/..., ood/far/..., ood/val/..., synthetic/..., else id."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Checkpoint file or weights name (default: the model's)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers (default: the model's default layers)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 for the stored features."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes (0 = load in the main process)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace features made with another model, weights or layers."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1, help="Rows per stored chunk (default: ~8 MiB chunks)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: compute shard I (0..N-1) of N, whole chunks each, into one Zarr store shared by "
        "N processes (default under torchrun: RANK/WORLD_SIZE)."
    ),
    featmap_pool: Optional[int] = typer.Option(
        None, "--featmap-pool", min=1, help="With --layers ...,featmap: average-pool the feature map to G x G "
        "(default: the network's own H x W)."
    ),
    perturb: Optional[list[str]] = typer.Option(
        None, "--perturb", help="Also store the output on a perturbed input (repeatable): "
        "odin[:temperature=1000,epsilon=0.0014] -> logits@odin; mahalanobis[:epsilon=0.0014,train=train] -> "
        "penultimate@mahalanobis (needs the train split's penultimate features)."
    ),
    preprocess: Optional[str] = typer.Option(
        None, "--preprocess", help="Override the model's preprocessing: KEY=VALUE,... with keys resize, crop "
        "(pixels), mean, std (three numbers separated by '/') and interpolation (bilinear|bicubic), e.g. "
        "mean=0.507/0.487/0.441,std=0.267/0.256/0.276,crop=32. Default: the model's; cifar_resnet* models take "
        "the mean/std of the benchmark they were trained on (cifar10, cifar100). Recorded in the fingerprint."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    list_models: bool = typer.Option(
        False, "--list-models", callback=_list_models, is_eager=True, help="List the backbones and exit."
    ),
    list_benchmarks: bool = typer.Option(
        False, "--list-benchmarks", callback=_list_benchmarks, is_eager=True, help="List the benchmarks and exit."
    ),
) -> None:
    """Run a backbone over a data set once and write its layers into the store.

    Re-running the same command is a cache hit; an interrupted run resumes where it stopped.

    Examples:

      oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr

      oodcli extract --model resnet50 --benchmark imagenet --split test --store stores/imagenet.zarr --device cuda --workers 8

      for i in 0 1 2 3; do oodcli extract --model resnet50 --benchmark imagenet --store stores/imagenet.zarr --shard $i/4 & done; wait

      oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr --layers logits,penultimate,featmap --perturb odin --perturb mahalanobis
    """
    from oodcli.api import extract_splits

    results = extract_splits(
        model=model,
        store=store,
        benchmark=benchmark,
        data=data,
        splits=split,
        role=role,
        weights=weights,
        layers=_split_list(layers),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        workers=workers,
        data_root=data_root,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
        progress=_progress(),
        shard=shard,
        featmap_pool=featmap_pool,
        perturb=perturb,
        preprocess=preprocess,
    )
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in results]))
        return
    for r in results:
        rate = f", {r.rows_computed / r.seconds:.0f} img/s" if r.rows_computed and r.seconds > 0 else ""
        out.print(f"{r.split}: {r.status} {r.rows} rows [{r.backbone}: {', '.join(r.layers)}] in {r.seconds:.2f} s{rate}", markup=False)


# ---- score and report -----------------------------------------------------------------


def _parse_params(params: Optional[list[str]], methods: list[str]) -> dict[str, dict]:
    """'--param energy.temperature=2' -> {'energy': {'temperature': 2.0}}; 'key=v' applies to every method."""
    from oodcli.scorers.base import param_value

    parsed: dict[str, dict] = {}
    for item in params or []:
        key, eq, value = item.partition("=")
        method, dot, name = key.rpartition(".")
        if not eq or not name or (dot and not method):
            raise UsageError(f"--param '{item}' is not KEY=VALUE (METHOD.NAME=VALUE, e.g. energy.temperature=2)")
        if dot and method not in methods:  # a value that would be ignored reads like one that was used
            raise UsageError(f"--param '{item}' is for '{method}', which is not being scored here "
                             f"({', '.join(methods)})")
        for m in [method] if dot else methods:
            if name in parsed.get(m, {}):
                raise UsageError(f"--param {m}.{name} is given twice; give it once")
            parsed.setdefault(m, {})[name] = param_value(value)
    return parsed


def _print_wide(table) -> None:
    """Print a rich table; a pipe or file gets it whole rather than wrapped to 80 columns."""
    if out.is_terminal:
        out.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    Console(highlight=False, width=max(out.width, width)).print(table)


def _row_progress(bar):
    """``progress(description, total)`` for the library: one bar per pass, removed when done."""

    def task(description: str, total: int):
        if not bar.live.is_started:  # the bar appears only once every input has been checked
            bar.start()
        task_id = bar.add_task(description, total=total)
        done = [0]

        def advance(rows: int) -> None:
            done[0] += rows
            bar.advance(task_id, rows)
            if done[0] >= total and description != "methods":
                bar.remove_task(task_id)

        return advance

    return task


def _print_scorer_list(as_json: bool) -> None:
    from oodcli.scorers import describe_scorers

    rows = describe_scorers()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="scorers (higher score = more in-distribution); set a parameter with -p METHOD.NAME=VALUE")
    for col in ("method", "parameters (defaults)", "needs", "what"):
        table.add_column(col)
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        table.add_row(r["method"], params, r["needs"], r["summary"])
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


@app.command()
def score(
    methods: Optional[str] = typer.Argument(None, help="Method name(s), comma-separated, or 'all' (see --list)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Store to read features from and write scores to."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Which backbone's features (default: per method, the one that has what it needs)."
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
    that makes it.

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


@app.command()
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

    The best value of every column is marked (bold) in the table, Markdown and HTML.
    """
    from oodcli import report as rep
    from oodcli.store import open_store

    fmt = "json" if as_json else fmt
    if fmt not in rep.FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; use one of {', '.join(rep.FORMATS)}")
    from oodcli.outputs import atomic_write, check_output_file, check_output_folder

    if plots is not None:
        check_output_folder(plots, "--plots")
    if html is not None:
        check_output_file(html, "--html")
    images = {}
    with open_store(store, "r") as st:
        data = rep.build_report(st, _split_list(methods), id_split, average_runs, fpr=fpr)
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
        sys.stdout.write(rep.render_csv(data))
    else:
        sys.stdout.write(rep.render_markdown(data))


@app.command()
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
    from oodcli.sweep import parse_grid, run_sweep
    from oodcli.scorers.base import scorer_names

    if method not in scorer_names():
        raise UsageError(f"unknown method '{method}'; choose from: {', '.join(scorer_names())}")
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


# ---- store ----------------------------------------------------------------------------


@store_app.command("info")
def store_info(
    path: Path = typer.Argument(..., help="Store path."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show splits, arrays, shapes, dtypes, sizes, completeness and what made them.

    Example:  oodcli store info stores/digits.zarr
    """
    from oodcli.store_info import describe_store, render_tree
    from oodcli.store import open_store

    with open_store(path, "r") as st:
        info = describe_store(st)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out.print(render_tree(info))


@store_app.command("verify")
def store_verify(
    path: Path = typer.Argument(..., help="Store path."),
    as_json: bool = typer.Option(False, "--json", help="Print the problems as JSON."),
) -> None:
    """Check a store: every array readable, row counts agree, extractions complete, values finite.

    Example:  oodcli store verify stores/digits.zarr
    """
    from oodcli.store_info import verify_store
    from oodcli.store import open_store

    with open_store(path, "r") as st:
        problems, checked = verify_store(st)
    if as_json:
        print(json.dumps({"store": str(path), "arrays_checked": checked, "problems": problems}, indent=2))
    else:
        for p in problems:
            out.print(f"problem: {p}")
        out.print(f"{path}: {checked} arrays checked, {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@store_app.command("rm")
def store_rm(
    path: Path = typer.Argument(..., help="Store path."),
    targets: list[str] = typer.Argument(..., help="Split(s), method(s) or node path(s) to remove."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only print what would be removed."),
    as_json: bool = typer.Option(False, "--json", help="Print the removed nodes as JSON."),
) -> None:
    """Remove splits, methods or nodes, all in one step (a crash leaves all of them or none).

    A split goes with its scores and gradients; a method with its scores, fitted state and
    gradients; anything else is named by its path in the store ('store info' shows them).

    Examples:

      oodcli store rm stores/digits.zarr ood/far/noise

      oodcli store rm stores/digits.zarr knn energy-t10

      oodcli store rm stores/digits.zarr index/grads/grood/train --dry-run
    """
    from oodcli.store import open_store, remove_nodes, resolve_removal

    with open_store(path, "r" if dry_run else "r+") as st:
        if dry_run:
            nodes = list(dict.fromkeys(n for t in targets for n in resolve_removal(st, t)))
        else:
            nodes = remove_nodes(st, targets)
    if as_json:
        print(json.dumps({"store": str(path), "removed": nodes, "dry_run": dry_run}, indent=2))
        return
    for node in nodes:
        out.print(f"{'would remove' if dry_run else 'removed'} {node}", markup=False)


# ---- train ----------------------------------------------------------------------------


@train_app.command("classifier")
def train_classifier(
    out_path: Path = typer.Option(Path("stores/digits_cnn.safetensors"), "--out", "-o", help="Where to save the weights."),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train split is used."),
    model: str = typer.Option("digits_cnn", "--model", "-m", help="Architecture to train (digits_cnn)."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train a small classifier from scratch (the demo's backbone).

    Example:  oodcli train classifier --out stores/digits_cnn.safetensors
    """
    from oodcli.train.classifier import train_classifier as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, benchmark=benchmark, model=model, epochs=epochs, lr=lr, seed=seed,
                 data_root_dir=data_root, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", test accuracy {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: train accuracy {100 * result.train_accuracy:.1f}%{test} "
        f"({result.epochs} epochs, {result.seconds:.1f} s)"
    )


@train_app.command("clip")
def train_clip(
    out_path: Path = typer.Option(Path("stores/clip_tiny.safetensors"), "--out", "-o", help="Where to save the weights."),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train split and class names are used."),
    model: str = typer.Option("clip-tiny", "--model", "-m", help="CLIP configuration to train (clip-tiny)."),
    epochs: int = typer.Option(40, "--epochs", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train the tiny CLIP of the offline demo contrastively on images and class-name captions.

    Example:  oodcli train clip --out stores/clip_tiny.safetensors && oodcli extract --model clip-tiny
    --weights stores/clip_tiny.safetensors --benchmark digits --layers image_embeds,patch_values --store stores/digits_clip.zarr
    """
    from oodcli.train.clip import train_clip as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, benchmark=benchmark, model=model, epochs=epochs, lr=lr, seed=seed,
                 data_root_dir=data_root, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", test {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: zero-shot accuracy train {100 * result.train_accuracy:.1f}%{test} "
        f"({result.epochs} epochs, {result.seconds:.1f} s)"
    )


@train_app.command("diffusion")
def train_diffusion(
    out_path: Path = typer.Option(Path("stores/digits_inpaint"), "--out", "-o", help="Pipeline folder to write (save_pretrained, safetensors)."),
    steps: Optional[int] = typer.Option(150, "--steps", min=1, help="Optimiser steps per stage (VAE, then U-Net + text encoder); the same steps give the same pipeline on any machine."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Or also: a time budget (a third VAE, the rest U-Net), whichever ends first."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train images are used."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Also save OUT-samples.png: source, inpainting, text-to-image per class."),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train the tiny Stable-Diffusion inpainting pipeline of the offline demo on digits (SynOOD's generator).

    Example:  oodcli train diffusion --out stores/digits_inpaint && oodcli synthesize synood --pipeline stores/digits_inpaint ...
    """
    from oodcli.synth.tiny_diffusion import train_tiny_inpainting as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, seconds=seconds or None, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 benchmark=benchmark, data_root_dir=data_root, preview="auto" if preview else None, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    shown = f"; samples {result.preview}" if result.preview else ""
    out.print(f"saved {result.path}: VAE {result.vae_steps} steps (loss {result.vae_loss:.4f}), U-Net "
              f"{result.unet_steps} steps (loss {result.unet_loss:.4f}), {result.seconds:.1f} s{shown}", markup=False)


def _print_prompt_result(result, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", ID test {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: {result.method} on {result.classes} classes x {result.shots} shots, "
        f"loss {result.loss:.4f}, few-shot accuracy {100 * result.accuracy_before:.1f}% -> "
        f"{100 * result.accuracy:.1f}%{test} ({result.epochs} epochs, {result.seconds:.1f} s)",
        markup=False,
    )


def _prompt_trainer(method: str):
    """`train coop` / `train locoop`: stage-one prompt learning on the store's cached CLIP features."""

    def command(
        store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the ID train split."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (safetensors)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
        split: str = typer.Option("train", "--split", help="ID split to draw the few shots from."),
        shots: int = typer.Option(16, "--shots", min=1, help="Images per class (1, 2, 4, 8, 16 in the papers)."),
        epochs: int = typer.Option(50, "--epochs", min=1),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        lr: float = typer.Option(0.002, "--lr", min=0.0),
        n_ctx: int = typer.Option(16, "--n-ctx", min=1, help="Learnable context vectors."),
        ctx_init: Optional[str] = typer.Option(None, "--ctx-init", help="Start from this phrase (e.g. 'a photo of a') instead of N(0, 0.02)."),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="tau of cos/tau (default: the CLIP's own, 0.01 for OpenAI)."),
        train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Train on classes FIRST-LAST only (open vocabulary)."),
        fraction: Optional[float] = typer.Option(None, "--train-class-fraction", help="Train on the first share of classes, e.g. 0.1."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
        seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw and the initialisation."),
        lam: float = typer.Option(0.25, "--lambda", help="LoCoOp: weight of the entropy term.", hidden=method != "locoop"),
        top_k: int = typer.Option(200, "--top-k", help="LoCoOp: a patch is ID-irrelevant when its label is not in its top-K classes.",
                                   hidden=method != "locoop"),
        local_layer: str = typer.Option("patch_values", "--local-layer",
                                        help="LoCoOp: the patch features, 'patch_values' (the last block's value path, as "
                                             "LoCoOp's code) or 'patch_tokens' (final-layer tokens).",
                                        hidden=method != "locoop"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        from oodcli.train.prompts import train_prompts

        log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
        result = train_prompts(
            method, store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs,
            batch_size=batch_size, lr=lr, n_ctx=n_ctx, ctx_init=ctx_init, temperature=temperature,
            train_classes=train_classes, train_class_fraction=fraction, labels=labels, seed=seed,
            locoop_lambda=lam, locoop_top_k=top_k, local_layer=local_layer, log=log,
        )
        _print_prompt_result(result, as_json)

    return command


train_app.command(
    "coop",
    help="Learn CoOp prompts few-shot on the store's cached CLIP features (the image encoder never runs).\n\n"
    "Example:  oodcli train coop --store stores/digits_clip.zarr --shots 16 --epochs 50 --out coop.safetensors "
    "&& oodcli score coop --store stores/digits_clip.zarr --param coop.prompts=coop.safetensors",
)(_prompt_trainer("coop"))
train_app.command(
    "locoop",
    help="Learn LoCoOp prompts: CoOp plus entropy maximisation on ID-irrelevant patches (needs patch_values).\n\n"
    "Example:  oodcli train locoop --store stores/digits_clip.zarr --shots 16 --top-k 2 --out locoop.safetensors",
)(_prompt_trainer("locoop"))


@train_app.command("negprompt")
def train_negprompt(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the ID train split."),
    positive: Path = typer.Option(..., "--positive", "-p", help="Positive prompts from 'oodcli train coop' (kept frozen)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (positive + negative prompts)."),
    backbone: Optional[str] = typer.Option(None, "--backbone"),
    split: str = typer.Option("train", "--split"),
    neg_prompts: int = typer.Option(2, "--neg-prompts", min=1, help="p: negative prompts shared by all classes."),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="Default: the positive file's."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(0.002, "--lr", min=0.0),
    beta: float = typer.Option(0.1, "--beta", help="Weight of L_NPD (negative-positive distance)."),
    gamma: float = typer.Option(0.05, "--gamma", help="Weight of L_NND (negative-negative distance)."),
    nis_softmax: str = typer.Option("all", "--nis-softmax",
                                    help="L_NIS's softmax: 'all' positive and negative logits (the authors' code, default) "
                                         "or 'negatives' only (eq. 4 as printed)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="tau (default: the CLIP's own)."),
    train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Default: the positive file's classes."),
    fraction: Optional[float] = typer.Option(None, "--train-class-fraction"),
    labels: Optional[str] = typer.Option(None, "--labels"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Default: the positive file's (same few shots)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Learn NegPrompt's negative prompts against frozen positive prompts (stage two).

    Example:  oodcli train negprompt --store stores/digits_clip.zarr --positive coop.safetensors
    --neg-prompts 2 --epochs 10 --out negprompt.safetensors && oodcli score negprompt
    --store stores/digits_clip.zarr --param negprompt.prompts=negprompt.safetensors
    """
    from oodcli.train.prompts import train_prompts

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    result = train_prompts(
        "negprompt", store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs,
        batch_size=batch_size, lr=lr, temperature=temperature, train_classes=train_classes,
        train_class_fraction=fraction, labels=labels, seed=seed, positive=positive, neg_prompts=neg_prompts,
        beta=beta, gamma=gamma, nis_softmax=nis_softmax, log=log,
    )
    _print_prompt_result(result, as_json)


@train_app.command("iim")
def train_iim(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP patch_values of the ID train split."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (local + OOD prototype prompts)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
    split: str = typer.Option("train", "--split", help="ID split to draw the few shots from."),
    shots: int = typer.Option(16, "--shots", min=1, help="Images per class."),
    epochs: int = typer.Option(50, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2.5e-4, "--lr", min=0.0),
    n_ctx: int = typer.Option(16, "--n-ctx", min=1, help="L: learnable context vectors per prompt."),
    ctx_init: Optional[str] = typer.Option(None, "--ctx-init", help="Start the local prompts from this phrase instead of N(0, 0.02)."),
    k: int = typer.Option(50, "--k", min=1, help="Top-k positive patches per image; the next k are ID-like OOD patches (2k <= patches)."),
    ood_prompts: int = typer.Option(300, "--ood-prompts", min=1, help="C_n: OOD prototype prompts."),
    lambda_neg: float = typer.Option(5.0, "--lambda-neg", min=0.0, help="Weight of L_neg (eq. 9)."),
    lambda_div: float = typer.Option(0.5, "--lambda-div", min=0.0, help="Weight of L_div (eq. 10)."),
    temperature: float = typer.Option(1.0, "--temperature",
                                      help="T of s = exp(logit_scale * cos / T): tau = T / the CLIP's logit scale (0.01 for OpenAI)."),
    csc: bool = typer.Option(True, "--csc/--no-csc",
                             help="Class-specific local contexts (C x n-ctx vectors, the official default) or one shared context."),
    denominators: str = typer.Option("official", "--denominators",
                                     help="L_pos/L_neg denominators: 'official' (the authors' code, their published numbers) "
                                          "or 'paper' (eq. 8-9 as printed)."),
    local_layer: str = typer.Option("patch_values", "--local-layer",
                                    help="The patch features: 'patch_values' (the last block's value path, as the official "
                                         "code) or 'patch_tokens' (final-layer tokens)."),
    train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Train on classes FIRST-LAST only."),
    fraction: Optional[float] = typer.Option(None, "--train-class-fraction", help="Train on the first share of classes."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw and the initialisation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Learn IIM's local prompts and OOD prototype prompts from mined patches (needs patch_values).

    Example:  oodcli train iim --store stores/digits_clip.zarr --shots 16 --k 4 --out iim.safetensors
    && oodcli score s-mcm,s-mcm-star --store stores/digits_clip.zarr -p s-mcm.prompts=iim.safetensors
    -p s-mcm-star.prompts=iim.safetensors
    """
    from oodcli.train.iim import train_iim as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    result = run(
        store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs, batch_size=batch_size,
        lr=lr, n_ctx=n_ctx, ctx_init=ctx_init, k=k, ood_prompts=ood_prompts, lambda_neg=lambda_neg,
        lambda_div=lambda_div, temperature=temperature, csc=csc, denominators=denominators, local_layer=local_layer,
        train_classes=train_classes,
        train_class_fraction=fraction, labels=labels, seed=seed, log=log,
    )
    _print_prompt_result(result, as_json)


@train_app.command("synood")
def train_synood(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the train and synthetic splits "
                                    "(penultimate for the authors' projection, image_embeds for the linear one)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="File to write (safetensors): projection + negative label features."),
    synthetic: Optional[list[str]] = typer.Option(
        None, "--synthetic", help="Synthetic split(s) (role synthetic) to learn from; default: every one in the store. "
        "Table 4's 'Neg Image' vs 'Grad Image' is which one you name."
    ),
    train: str = typer.Option("train", "--train", help="ID split D_in* is drawn from (most complex images per class)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
    num_negatives: int = typer.Option(10000, "--num-negatives", min=1, help="M: NegLabel's negative labels."),
    percentile: float = typer.Option(0.95, "--percentile", help="NegMining's percentile."),
    wordnet: Optional[str] = typer.Option(None, "--wordnet", help="Folder with WordNet's data.noun and data.adj (default: found)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    projection: str = typer.Option(
        "authors", "--projection", help="delta of eq. 11: 'authors' (their code: f + ReLU(LayerNorm(Linear(f))) on the "
        "unnormalised feature, random init) or 'linear' (a linear map of the unit feature, starting at the identity)."
    ),
    proj_epochs: int = typer.Option(3, "--proj-epochs", min=0, help="Epochs of the projection (eq. 12); 0 keeps it untrained."),
    proj_lr: float = typer.Option(1e-3, "--proj-lr", help="Adam learning rate of the projection."),
    proj_schedule: str = typer.Option("cosine", "--proj-schedule", help="'cosine' (the authors': per epoch, down to 1e-5) or 'constant'."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="Adam weight decay of the projection."),
    label_epochs: int = typer.Option(5, "--label-epochs", min=0, help="Epochs of the negative label features (eq. 14); 0 keeps CLIP's."),
    label_lr: float = typer.Option(2e-3, "--label-lr", help="SGD learning rate of the negative label features."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="tau (default: the CLIP's own, 0.01 for OpenAI)."),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the train images live (read for their JPEG bytes per pixel)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train SynOOD's image projection and negative label features on cached CLIP features (no image encoder runs).

    The synthetic images enter the store like any data, with role synthetic (penultimate is the
    unnormalised CLIP feature the authors' projection reads):

      oodcli extract --model clip-tiny --weights W --data folder:DIR --split synthetic/synood --role synthetic --layers image_embeds,penultimate --store S

    Examples:

      oodcli train synood --store stores/digits_clip.zarr --out synood.safetensors

      oodcli score synood,neglabel --store stores/digits_clip.zarr -p synood.prompts=synood.safetensors

      oodcli score synood --store stores/digits_clip.zarr -p synood.prompts=synood.safetensors -p synood.projection=false
    """
    from oodcli.train.synood import train_synood as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    bar = _progress()
    try:
        result = run(
            store_path, out_path, synthetic=synthetic, train_split=train, backbone=backbone,
            num_negatives=num_negatives, percentile=percentile, wordnet=wordnet, labels=labels,
            projection=projection, proj_epochs=proj_epochs, proj_lr=proj_lr, proj_schedule=proj_schedule,
            weight_decay=weight_decay, label_epochs=label_epochs,
            label_lr=label_lr, batch_size=batch_size, temperature=temperature, seed=seed, data_root_dir=data_root,
            log=log, progress=_row_progress(bar),
        )
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    out.print(
        f"saved {result.path}: projection loss {result.projection_loss:.4f}, label loss {result.label_loss:.4f}, "
        f"{result.synthetic} synthetic + {result.in_star} ID images, {result.learned} of {result.negatives} negative "
        f"labels learned, pairing accuracy {100 * result.pairing_before:.1f}% -> {100 * result.pairing_after:.1f}% "
        f"({result.seconds:.1f} s)",
        markup=False,
    )


# ---- synthesize and index -----------------------------------------------------------------

synth_app = typer.Typer(help="Synthesize OOD data: GROOD's prototypes and gradients, SynOOD's context labels and near-boundary images.", no_args_is_help=True)
app.add_typer(synth_app, name="synthesize")


@synth_app.command("grood")
def synthesize_grood(
    store: Path = typer.Option(..., "--store", "-s", help="Store with the ID train split's penultimate features."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", "--backbone", help="Backbone whose features to use (default: the only one)."
    ),
    weights: Optional[str] = typer.Option(
        None, "--weights", "-w", help="Its checkpoint (default: where the store says the weights came from); must match."
    ),
    ood_prototype: str = typer.Option(
        "mixup", "--ood-prototype", help="mixup (eq. 9), noise (uniform-noise images), val (--val-split rows) or mean (of class prototypes)."
    ),
    quantile: float = typer.Option(
        0.5, "--quantile", "-q", help="Proximity filter: drop candidates nearer to a class prototype than this quantile (0 keeps all)."
    ),
    mixup_lambda: float = typer.Option(0.5, "--lambda", help="Mixup weight of the image's own early map (eq. 9)."),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="With --ood-prototype val: an auxiliary OOD split of the store."),
    samples: int = typer.Option(100, "--samples", help="noise/val: candidate OOD samples before the filter."),
    seed: int = typer.Option(0, "--seed", help="noise/val: random seed."),
    train_split: str = typer.Option("train", "--train", help="ID train split the prototypes come from."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """GROOD's class prototypes and OOD prototype (fitted/grood), then the gradients of every split (grads/grood/<split>).

    mixup runs the backbone over the train images again (their early maps are not stored).
    The same command again reuses the prototypes and only writes missing gradients.

    Examples:

      oodcli synthesize grood --store stores/digits.zarr

      oodcli synthesize grood --store stores/cifar10.zarr --ood-prototype val --val-split ood/val/tin
    """
    from oodcli.store import open_store
    from oodcli.synth.grood import synthesize_grood as run

    bar = _progress()
    try:
        with open_store(store, "r+") as st:
            result = run(
                st, backbone=model, weights=weights, train_split=train_split, ood_prototype=ood_prototype,
                quantile=quantile, mixup_lambda=mixup_lambda, val_split=val_split, samples=samples, seed=seed,
                device=device, batch_size=batch_size, workers=workers, data_root_dir=data_root,
                progress=_row_progress(bar),
            )
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result))
        return
    kept = (f" ({result['kept']} of {result['candidates']} candidates kept at q={result['quantile']}, "
            f"tau {result['tau']:.4g})" if "kept" in result else "")
    early = f", early maps {'x'.join(map(str, result['early_shape']))}" if result.get("early_shape") else ""
    out.print(f"fitted/grood: {result['status']}: {result['ood_prototype']} OOD prototype{kept}, "
              f"{result['classes']} class prototypes, penultimate {result['dim']}-d{early}, "
              f"in {result['seconds']:.2f} s", markup=False)
    for g in result["gradients"]:
        out.print(f"grads/grood/{g['split']}: {g['status']} {g['rows']} rows", markup=False)


@synth_app.command("context-labels")
def synthesize_context_labels(
    store: Path = typer.Option(..., "--store", "-s", help="Store with the ID split (and its CLIP image_embeds for --source clip)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="JSON-lines file to write: a header line, then {id, labels} per image."),
    source: str = typer.Option("clip", "--source", help="clip (zero-shot over WordNet nouns), llava (an MLLM, as the paper) or a JSON-lines FILE."),
    split: str = typer.Option("train", "--split", help="ID split whose images get labels."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="clip: CLIP backbone in the store (default: the only one)."),
    top_k: int = typer.Option(5, "--top-k", help="clip: labels per image."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="N images per class, picked by --pick (default: all)."),
    pick: str = typer.Option("complex", "--pick", help="complex: the most complex by JPEG bytes per pixel, as D_in* and 'synthesize synood' (reads the images); random: drawn with --seed."),
    seed: int = typer.Option(0, "--seed"),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    model: str = typer.Option("llava-hf/llava-1.5-7b-hf", "--model", help="llava: Hugging Face id or local folder."),
    device: str = typer.Option("auto", "--device", help="llava: auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="llava: images per generate call."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="llava: where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """SynOOD's context labels (eq. 3): per ID image, labels of its elements other than the main object.

    Examples:

      oodcli synthesize context-labels --store stores/digits_clip.zarr --split train --per-class 10 --out context.jsonl

      oodcli synthesize context-labels --store stores/imagenet_clip.zarr --source llava --device cuda --per-class 50 --out context.jsonl

      oodcli synthesize context-labels --store stores/imagenet_clip.zarr --source mllm_answers.jsonl --out context.jsonl
    """
    from oodcli.outputs import check_output_file
    from oodcli.store import open_store
    from oodcli.synth.context import context_labels

    check_output_file(out_path)
    bar = _progress()
    try:
        with open_store(store, "r+" if source == "clip" else "r") as st:  # clip caches the nouns' text features
            result = context_labels(
                st, split=split, source=source, backbone=backbone, top_k=top_k, per_class=per_class, seed=seed,
                labels_file=labels, model=model, device=device, batch_size=batch_size, data_root_dir=data_root,
                progress=_row_progress(bar), pick=pick,
            )
    finally:
        if bar.live.is_started:
            bar.stop()
    result.write_jsonl(out_path)
    summary = {**result.summary(), "out": str(out_path)}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"{out_path}: context labels of {summary['images']} images of '{split}' "
              f"({summary['labels_per_image']:.1f} per image) by {summary['provider']}", markup=False)


@synth_app.command("synood")
def synthesize_synood(
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for the PNG images, manifest.jsonl and the run record."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Store whose split's images are inpainted (its recorded data source is read)."),
    from_split: str = typer.Option("train", "--from-split", help="ID split to pick the images from."),
    per_class: int = typer.Option(1, "--per-class", "-n", help="Images per class, the most complex by JPEG bytes per pixel (D_in*'s rule, so each pairs with its D_in* image); with neg-image: per word."),
    pipeline: str = typer.Option(
        "stabilityai/stable-diffusion-2-inpainting", "--pipeline",
        help="Inpainting pipeline: a hub id or a folder saved with save_pretrained (e.g. from 'train diffusion').",
    ),
    classifier: str = typer.Option("resnet50", "--classifier", help="Backbone g with logits whose energy guides the noise (see extract --list-models)."),
    classifier_weights: Optional[str] = typer.Option(None, "--classifier-weights", help="Its checkpoint (default: the backbone's default weights)."),
    context_labels: Optional[Path] = typer.Option(
        None, "--context-labels", help='JSON lines {"id": <split image id>, "labels": [...]} from \'oodcli synthesize context-labels\': the prompts; '
        "only listed images are picked (without it: empty prompts, i.e. unconditional inpainting)."
    ),
    strength: float = typer.Option(0.6, "--strength", help="Inpainting strength (eq. 4)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the full schedule."),
    iterations: int = typer.Option(3, "--iterations", help="Inpainting passes in total (the paper's 3), the noise refined (eq. 10) between them; 1 = plain inpainting."),
    step_size: float = typer.Option(10.0, "--step-size", help="r * rho of eq. 10 (gradient w.r.t. the decoder's latent z_0 / scaling_factor, as the authors)."),
    loss: str = typer.Option("authors", "--loss", help="authors: (m_out - (mean g - logsumexp g))^2, m_out -5; energy-hinge: Liu et al.'s max(0, m_out - E)^2, m_out -7. Both push towards OOD."),
    m_out: Optional[float] = typer.Option(None, "--m-out", help="OOD threshold m_out of eq. 7 (default: the --loss's)."),
    tau: float = typer.Option(1.0, "--tau", help="Temperature of eq. 7."),
    guidance: float = typer.Option(8.0, "--guidance", help="Classifier-free guidance scale (the authors' 8)."),
    prompt_template: str = typer.Option("A photo only remain {labels}.", "--prompt-template", help="Inpainting prompt around the context labels (the authors'); '{labels}' = the labels alone."),
    mode: str = typer.Option("inpaint", "--mode", help="inpaint (SynOOD) or neg-image (text-to-image from --prompt-words, no refinement)."),
    prompt_words: Optional[Path] = typer.Option(None, "--prompt-words", help="neg-image: one word per line."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """SynOOD's near-boundary OOD images: inpaint ID images with their context labels as prompts,
    the initial noise refined by a classifier's energy loss (eq. 4-10). The same command again
    resumes; then extract the folder into the store.

    Example:  oodcli synthesize synood --store stores/digits.zarr --per-class 4 --out-dir stores/synood
    --pipeline stores/digits_inpaint --classifier digits_cnn --classifier-weights stores/digits_cnn.safetensors
    --context-labels stores/digits-context.jsonl && oodcli extract --model clip-tiny --weights stores/clip_tiny.safetensors
    --data folder:stores/synood --split synthetic/synood --role synthetic --store stores/digits.zarr
    """
    from oodcli.synth.synood import Settings
    from oodcli.synth.synood import synthesize_synood as run

    settings = Settings(mode=mode, from_split=from_split, per_class=per_class, strength=strength, steps=steps,
                        guidance=guidance, iterations=iterations, step_size=step_size, loss=loss, m_out=m_out, tau=tau,
                        prompt_template=prompt_template, seed=seed)
    bar = _progress()
    task = []

    def progress(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("synood images", total=total))
        bar.update(task[0], completed=done)

    try:
        result = run(out_dir, store=store, settings=settings, pipeline=pipeline, classifier=classifier,
                     classifier_weights=classifier_weights, context_labels=context_labels, prompt_words=prompt_words,
                     device=device, data_root_dir=data_root, progress=progress)
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result))
        return
    loss = (f"; energy loss mean {result['energy_loss_before_mean']:.3f} -> {result['energy_loss_after_mean']:.3f} "
            f"(lower for {result['lowered']} of {result['manifest_rows']})" if "manifest_rows" in result else "")
    if "energy_before_mean" in result:
        loss += f", energy E {result['energy_before_mean']:.3f} -> {result['energy_after_mean']:.3f}"
    out.print(f"{result['out_dir']}: {result['written']} images written, {result['skipped']} already there, "
              f"{result['images']} in all{loss} ({result['seconds']:.1f} s)", markup=False)


@app.command("index")
def index_command(
    store: Path = typer.Option(..., "--store", "-s", help="Store holding the vectors."),
    source: str = typer.Option(
        ..., "--source", help="2-D array to index, e.g. grads/grood/train or splits/train/<backbone>/penultimate."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Saved as index/<name> (default: the source's name)."),
    kind: str = typer.Option("auto", "--kind", help="ivf (IndexIVFFlat), flat (exact) or auto (flat below 20k rows)."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="IVF cells (default: about sqrt(rows))."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF cells visited per query (default: nlist/16, at least 8)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build a faiss index over an array of the store and save it there (on a GPU when faiss sees one).

    Examples:

      oodcli index --store stores/digits.zarr --source grads/grood/train

      oodcli index --store stores/cifar10.zarr --source grads/grood/train --kind ivf --nlist 256 --nprobe 16
    """
    from oodcli.index import build_in_store
    from oodcli.store import open_store

    bar = _progress()
    try:
        with open_store(store, "r+") as st:
            info = build_in_store(st, source, name=name, kind=kind, nlist=nlist, nprobe=nprobe,
                                  progress=_row_progress(bar))
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(info))
        return
    how = f"ivf, nlist {info['nlist']}, nprobe {info['nprobe']}" if info["kind"] == "ivf" else "flat (exact)"
    out.print(f"index/{info['name']}: {how}, {info['rows']} x {info['dim']} from {info['source']} "
              f"in {info['seconds']:.2f} s", markup=False)


# ---- APEX / PALM: select-k, train apex|palm, analyze collisions ----------------------------

analyze_app = typer.Typer(help="Analyses of what a store holds besides scores.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


def _class_names(st) -> Optional[list[str]]:
    """The ID class names of the benchmark a store was extracted from, if it is a known one."""
    from oodcli.data.benchmarks import get_benchmark

    try:
        return get_benchmark(st.attrs["benchmark"]).resolve_class_names()
    except (KeyError, OodError):
        return None


@app.command("select-k")
def select_k_command(
    store: Path = typer.Option(..., "--store", "-s", help="Store with the ID train split's features (the paper: DINOv2)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", "--backbone", help="Whose features (default: the only backbone)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer (default: cls if extracted, else penultimate)."),
    split: str = typer.Option("train", "--split", help="ID split to fit on."),
    k_range: str = typer.Option("1..10", "--k-range", help="Candidate numbers of prototypes, MIN..MAX."),
    covariance: str = typer.Option("diag", "--covariance", help="GMM covariance: diag, full, tied or spherical."),
    pca_dim: int = typer.Option(8, "--pca-dim", min=0, help="Per-class PCA dimensions before the GMM (0 = none)."),
    n_init: int = typer.Option(3, "--n-init", min=1, help="EM restarts per GMM."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print K and the BIC curve of every class as JSON."),
) -> None:
    """Per ID class, the number of prototypes K_c* by GMM + BIC (APEX eq. 1); writes fitted/select_k.

    Features are reduced per class by PCA first: in 768-d with ~500 images a class, a GMM's
    parameter count would swamp BIC (see oodcli/select_k.py).

    Example:  oodcli select-k --store stores/cifar100-dinov2.zarr --model dinov2-base
    """
    from oodcli.select_k import parse_k_range, select_k
    from oodcli.store import open_store

    k_min_max = parse_k_range(k_range)
    bar = _progress()

    def start(total: int):
        bar.start()
        task = bar.add_task("select-k: classes", total=total)
        return lambda n: bar.advance(task, n)

    try:
        with open_store(store, "r+") as st:
            result = select_k(st, model, layer, split, k_min_max, covariance, pca_dim, n_init, seed, progress=start)
            data = result.as_dict(_class_names(st))
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    s = data["settings"]
    table = Table(title=f"K per class by BIC, {s['backbone']}/{s['layer']}")
    for col in ("class", "name", "n", "K*", "BIC(K*)", "next best"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for row in data["classes"]:
        curve = {k: b for k, b in row["bic"].items() if b is not None}
        others = sorted((b, k) for k, b in curve.items() if k != row["k"])
        runner = f"K={others[0][1]} (+{others[0][0] - curve[row['k']]:.1f})" if others else "-"
        table.add_row(str(row["class"]), row["name"] or "", str(row["n"]), str(row["k"]), f"{curve[row['k']]:.1f}", runner)
    _print_wide(table)
    out.print(f"{len(data['classes'])} classes, {data['total_prototypes']} prototypes (mean K {data['mean_k']:.2f}) "
              f"from {s['covariance']} GMMs on {s['pca_dim'] or 'all'} PCA dims, K in {k_range}, in {data['seconds']:.1f} s; "
              f"written to {store}:fitted/select_k", markup=False)


def _prototype_trainer(method: str):
    palm = method == "palm"

    def command(
        store: Optional[Path] = typer.Option(None, "--store", "-s", help="With --head-only: store with the frozen backbone's train features."),
        head_only: bool = typer.Option(False, "--head-only", help="Train only the head, on cached features from --store (fast)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="Head-only: whose features (default: the only backbone)."),
        layer: Optional[str] = typer.Option(None, "--layer", help="Head-only: which layer (default: cls if stored, else penultimate)."),
        split: str = typer.Option("train", "--split", help="Head-only: the ID split to train on."),
        benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="End to end: benchmark whose ID train images are used."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="End to end: the encoder, e.g. cifar_resnet34 (paper), digits_cnn."),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help="End to end: start from this checkpoint (default: random init)."),
        k: Optional[int] = typer.Option(6 if palm else None, "--k", min=1, hidden=not palm, help="Prototypes per class (PALM: 6)."),
        k_from: Optional[Path] = typer.Option(
            None, "--k-from", hidden=palm, help="Store with 'oodcli select-k' results (default: --store)."
        ),
        out_path: Optional[Path] = typer.Option(
            None, "--out", "-o", help=f"Model file (default: <store>-{method}.safetensors, or stores/<benchmark>-{method}.safetensors)."
        ),
        epochs: int = typer.Option(500, "--epochs", min=1),
        batch_size: int = typer.Option(512, "--batch-size", min=1),
        lr: float = typer.Option(0.5, "--lr", help="SGD learning rate, cosine-decayed per step."),
        momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
        weight_decay: float = typer.Option(1e-6, "--weight-decay"),
        tau: float = typer.Option(0.1, "--tau", help="Temperature of the mixture posterior, eq. (3)."),
        tau_p: float = typer.Option(0.1, "--tau-p", help="Temperature of the prototype contrastive loss, eq. (5)."),
        lambda_pc: float = typer.Option(1.0, "--lambda-pc", help="Weight of L_PC, eq. (6)."),
        epsilon: float = typer.Option(0.05, "--epsilon", help="Sinkhorn entropic regularisation, eq. (14)."),
        sinkhorn_iters: int = typer.Option(3, "--sinkhorn-iters", min=1),
        proto_momentum: float = typer.Option(0.999, "--proto-momentum", help="EMA momentum of the prototypes and qualities (1 - beta_p, eq. 15)."),
        embed_dim: int = typer.Option(128, "--embed-dim", min=1, help="Dimension of the hypersphere."),
        seed: int = typer.Option(0, "--seed"),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="End to end: random horizontal flips (off for digits)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
        workers: int = typer.Option(0, "--workers", min=0, help="End to end: DataLoader worker processes."),
        data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        from oodcli.scoring import default_backbone
        from oodcli.select_k import read_k
        from oodcli.store import open_store
        from oodcli.train.apex import ApexConfig, train_end_to_end, train_head_only

        cfg = ApexConfig(embed_dim=embed_dim, tau=tau, tau_p=tau_p, lambda_pc=lambda_pc, epsilon=epsilon,
                         sinkhorn_iters=sinkhorn_iters, proto_momentum=proto_momentum, epochs=epochs,
                         batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)
        cfg.check()
        if palm and k_from is not None:
            raise UsageError("--k-from is for 'train apex'; 'train palm' uses the same --k for every class")
        if not palm and k is not None:
            raise UsageError("'train apex' takes K per class from select-k; use 'train palm --k N' for a fixed K")
        if head_only and store is None:
            raise UsageError("--head-only trains on cached features: pass --store PATH")
        if head_only and (benchmark or model or weights):
            raise UsageError("--benchmark, --model and --weights are for end-to-end training; drop them with --head-only")
        if not head_only and store is not None:
            raise UsageError("--store goes with --head-only; for select-k results from a store use --k-from")
        if not head_only and not (benchmark and model):
            raise UsageError("end-to-end training needs --benchmark and --model (or: --head-only --store PATH)")
        select = None
        source = k_from or store
        if not palm:
            if source is None:
                raise UsageError("'train apex' needs K per class from select-k: pass --k-from STORE")
            with open_store(source, "r") as ks:
                select = read_k(ks)
        log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
        if head_only:
            target = out_path or store.with_name(f"{store.stem}-{method}.safetensors")
            with open_store(store, "r") as st:
                result = train_head_only(st, backbone or default_backbone(st, split), method, layer, split,
                                         None if not palm else k, select, cfg, target, device, log)
        else:
            target = out_path or Path("stores") / f"{benchmark}-{method}.safetensors"
            result = train_end_to_end(benchmark, model, method, weights, None if not palm else k, select, cfg,
                                      target, device, workers, data_root, flip, log)
        if as_json:
            out.print_json(json.dumps(result.as_dict()))
            return
        ks = result.k_per_class
        out.print(
            f"saved {result.path}: {method} {result.mode}, {result.prototypes} prototypes (K {min(ks)}..{max(ks)}), "
            f"{result.epochs} epochs in {result.seconds:.1f} s; loss {result.first_loss:.3f} -> {result.final_loss:.3f}, "
            f"train accuracy {100 * result.train_accuracy:.1f}%, min Q_S {result.min_q_s:.3f}, "
            f"{result.colliding_prototypes} colliding prototypes", markup=False,
        )

    return command


_TRAIN_HELP = (
    "{title} (APEX paper sec. 3; PALM, ICLR 2024): projection head onto the 128-d unit sphere, {k}, "
    "L_MLE + lambda L_PC, Sinkhorn soft assignments, EMA prototypes, prototype qualities. Writes one "
    "safetensors file that 'oodcli extract --model {method} --weights FILE' runs as a backbone.\n\n"
    "Examples:\n\n"
    "  oodcli train {method} --head-only --store stores/digits.zarr --backbone digits_cnn{example}\n\n"
    "  oodcli train {method} --benchmark cifar100 --model cifar_resnet34{e2e} --device cuda --workers 8"
)
train_app.command("apex", help=_TRAIN_HELP.format(
    title="Train APM, the adaptive mixture of prototypes", k="K_c* prototypes per class from 'oodcli select-k'",
    method="apex", example="", e2e=" --k-from stores/cifar100-dinov2.zarr"))(_prototype_trainer("apex"))
train_app.command("palm", help=_TRAIN_HELP.format(
    title="Train PALM, the fixed-K mixture of prototypes", k="the same K (6) prototypes for every class",
    method="palm", example=" --k 6", e2e=""))(_prototype_trainer("palm"))


@analyze_app.command("collisions")
def analyze_collisions(
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Store whose backbones carry prototypes (apex, palm)."),
    weights: Optional[list[Path]] = typer.Option(None, "--weights", "-w", help="Model files from 'train apex|palm' (repeatable)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Only this backbone of the store."),
    threshold: float = typer.Option(1e-2, "--threshold", help="Q_S (cosine distance) below which prototypes collide."),
    top: int = typer.Option(10, "--top", min=0, help="Closest colliding pairs to list per model."),
    as_json: bool = typer.Option(False, "--json", help="Print everything (every pair) as JSON."),
) -> None:
    """Inter-class prototype collisions (APEX Table 1): prototypes with Q_S below the threshold, their share, min Q_S.

    Examples:

      oodcli analyze collisions --store stores/digits.zarr

      oodcli analyze collisions --weights stores/cifar100-palm.safetensors --weights stores/cifar100-apex.safetensors
    """
    from oodcli.collisions import find_collisions, store_prototypes
    from oodcli.store import open_store

    if not 0.0 <= threshold <= 2.0:  # a cosine distance; NaN fails this too
        raise UsageError(f"--threshold {threshold} is no cosine distance; give a value in [0, 2] (default 0.01)")
    if store is None and not weights:
        raise UsageError("say where the prototypes are: --store PATH and/or --weights FILE")
    found, names = {}, None
    if store is not None:
        with open_store(store, "r") as st:
            found = store_prototypes(st)
            names = _class_names(st)
        if backbone is not None:
            if backbone not in found:
                raise OodError(f"backbone '{backbone}' in {store} has no prototypes; it has: {', '.join(found) or 'none'}")
            found = {backbone: found[backbone]}
    for path in weights or []:
        from oodcli.train.apex import read_model

        _, tensors = read_model(path)
        found[str(path)] = {"vectors": tensors["prototypes"].numpy(), "classes": tensors["proto_class"].numpy()}
    if not found:
        raise OodError(f"store {store} holds no prototypes; extract a trained model with --model apex|palm first")
    results = {name: find_collisions(p["vectors"], p["classes"], threshold, names) for name, p in found.items()}
    if as_json:
        print(json.dumps(results, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"inter-class prototype collisions (Q_S < {threshold:g})")
    for col in ("model", "K min/mean/max", "prototypes", "colliding prototypes", "% of total", "pairs", "min Q_S"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['k_min']}/{r['k_mean']:.2f}/{r['k_max']}", str(r["prototypes"]),
                      str(r["colliding_prototypes"]), f"{100 * r['share']:.2f}", str(r["colliding_pairs"]),
                      f"{r['min_q_s']:.3f}")
    _print_wide(table)
    for name, r in results.items():
        for p in r["pairs"][:top]:
            out.print(f"{name}: {p['class_a']} #{p['a']} <-> {p['class_b']} #{p['b']}  (Q_S {p['distance']:.4f})", markup=False)


# ---- entry point ------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI and return its exit code; usage errors become one line on stderr too."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="oodcli", standalone_mode=False)
    except KeyboardInterrupt:
        err.print(INTERRUPTED, markup=False)
        return 130
    except Exception as exc:
        # click's exceptions (typer may vendor its own click): matched by shape, not by class
        kind = type(exc).__name__
        ctx = getattr(exc, "ctx", None)
        if kind == "NoArgsIsHelpError":
            out.print(ctx.get_help() if ctx else str(exc), markup=False)
            return 0
        if kind == "Abort":
            err.print("interrupted", markup=False)
            return 130
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None and exc.exit_code == 2 else ""
        err.print(f"error: {exc.format_message()}{hint}", markup=False)
        return exc.exit_code
    return rv if isinstance(rv, int) else 0


def run() -> None:
    sys.exit(main())
