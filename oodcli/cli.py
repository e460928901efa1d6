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

app = typer.Typer(
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


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="Backbone name (see 'oodcli extract --list-models')."),
    store: Path = typer.Option(..., "--store", "-s", help="Store path: *.zarr (default format) or *.h5."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Benchmark name, e.g. digits, cifar10."),
    data: Optional[str] = typer.Option(
        None, "--data", help="A data source instead of a benchmark: folder:DIR, imglist:FILE[@IMAGEDIR], torchvision:NAME:SPLIT."
    ),
    split: Optional[list[str]] = typer.Option(
        None, "--split", help="Split name(s) to extract; default: every split of the benchmark."
    ),
    role: Optional[str] = typer.Option(
        None, "--role", help="With --data: id, ood-near or ood-far (default: from the split name, ood/near/... or ood/far/...)."
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
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a backbone over a data set once and write its layers into the store.

    Re-running the same command is a cache hit; an interrupted run resumes where it stopped.

    Examples:

      oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr

      oodcli extract --model resnet50 --benchmark imagenet --split test --store stores/imagenet.zarr --device cuda --workers 8
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
    parsed: dict[str, dict] = {}
    for item in params or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--param '{item}' is not KEY=VALUE (e.g. energy.temperature=2)")
        method, dot, name = key.rpartition(".")
        targets = [method] if dot else methods
        for m in targets:
            parsed.setdefault(m, {})[name] = _literal(value)
    return parsed


def _literal(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


@app.command()
def score(
    methods: str = typer.Argument(..., help="Method name(s), comma-separated, or 'all'."),
    store: Path = typer.Option(..., "--store", "-s", help="Store to read features from and write scores to."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Which backbone's features (default: the only one)."),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID evaluation split (default: test)."),
    ood: Optional[list[str]] = typer.Option(None, "--ood", help="OOD split(s) to score (default: every OOD split)."),
    train_split: str = typer.Option("train", "--train", help="ID split that fitted methods learn from."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Hyperparameter METHOD.NAME=VALUE (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Score the ID test split and every OOD split; writes scores/<method>/<split>.

    Examples:

      oodcli score msp,energy --store stores/digits.zarr

      oodcli score energy --store stores/digits.zarr -p energy.temperature=2 --json
    """
    from oodcli.store import open_store
    from oodcli.scoring import parse_methods, score_store

    names = parse_methods(methods)
    hparams = _parse_params(param, names)
    bar = _progress()

    def start(total: int):  # the bar appears only once every input has been checked
        bar.start()
        task = bar.add_task("scoring", total=total)
        return lambda: bar.advance(task)

    try:
        with open_store(store, "r+") as st:
            results = score_store(
                st, names, backbone=backbone, id_split=id_split, ood=ood, train_split=train_split,
                hparams=hparams, progress=start,
            )
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in results]))
        return
    from rich.table import Table

    table = Table(title=f"scores written to {store}")
    for col in ("method", "splits", "rows", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == m]
        table.add_row(m, str(len(rs)), str(sum(r.rows for r in rs)), f"{sum(r.seconds for r in rs):.3f}")
    out.print(table)


@app.command()
def report(
    store: Path = typer.Option(..., "--store", "-s", help="Store holding scores."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: all scored)."),
    id_split: Optional[str] = typer.Option(None, "--id", help="ID evaluation split (default: test)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json, csv or markdown."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
) -> None:
    """OOD metrics per OOD set and near/far averages (FPR@95, AUROC, AUPR-In/Out), ID accuracy.

    Examples:

      oodcli report --store stores/digits.zarr

      oodcli report --store stores/digits.zarr --format csv > digits.csv
    """
    from oodcli import report as rep
    from oodcli.store import open_store

    fmt = "json" if as_json else fmt
    if fmt not in rep.FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; use one of {', '.join(rep.FORMATS)}")
    with open_store(store, "r") as st:
        data = rep.build_report(st, _split_list(methods), id_split)
    if fmt == "table":
        out.print(rep.render_table(data))
    elif fmt == "json":
        print(rep.render_json(data))
    elif fmt == "csv":
        sys.stdout.write(rep.render_csv(data))
    else:
        sys.stdout.write(rep.render_markdown(data))


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


# ---- planned commands -------------------------------------------------------------------

PLANNED = {
    "select-k": "pick per-class prototype counts (GMM + BIC)",
    "synthesize": "synthesize OOD prototypes or images (GROOD mixup, SynOOD inpainting)",
    "index": "build faiss indexes over features or gradients",
}
PLANNED_TRAINERS = ("apex", "palm", "coop", "negprompt", "iim", "synood", "clip")


def _not_built(name: str):
    def command(args: Optional[list[str]] = typer.Argument(None, hidden=True)) -> None:
        raise UsageError(f"'{name}' is not built yet in oodcli {__version__}")

    return command


for _name, _help in PLANNED.items():
    app.command(
        _name, help=f"(not built yet) {_help}.",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(_not_built(_name))
for _name in PLANNED_TRAINERS:
    train_app.command(
        _name, hidden=True, context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
    )(_not_built(f"train {_name}"))


# ---- entry point ------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI and return its exit code; user errors become one line on stderr."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="oodcli", standalone_mode=False)
    except OodError as exc:
        err.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; finished chunks are kept: re-run the same command to resume", markup=False)
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
