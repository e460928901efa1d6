"""The ``oodcli`` command line: thin commands that parse, call the library and print.

Results go to stdout (a rich table, or JSON with ``--json``); progress and logs go
to stderr. Exit codes: 0 success, 1 the work failed, 2 bad usage, 130 interrupted.

The root ``app`` and the entry points live here; each command group in its own module
(``extract``, ``score`` with ``sweep``, ``report``, ``deploy`` with ``threshold`` and ``predict``,
``store`` with ``index``, ``train``,
``synthesize``, ``analyze`` with ``select-k``), what they share in ``common``.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from oodcli import __version__
from oodcli.cli import analyze, deploy, extract, report, score, store, synthesize, train
from oodcli.cli.common import INTERRUPTED, STATE, err, out
from oodcli.errors import OodError

__all__ = ["INTERRUPTED", "STATE", "app", "err", "main", "out", "run"]


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


# the order here is the order of `oodcli --help`: the commands, then the groups
app.command()(extract.extract)
app.command()(score.score)
app.command()(report.report)
app.command()(deploy.threshold)
app.command()(deploy.predict)
app.command()(score.sweep)
app.command("index")(store.index_command)
app.command("select-k")(analyze.select_k_command)
app.add_typer(store.store_app, name="store")
app.add_typer(train.train_app, name="train")
app.add_typer(synthesize.synth_app, name="synthesize")
app.add_typer(analyze.analyze_app, name="analyze")


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
