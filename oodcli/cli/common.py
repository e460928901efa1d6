"""What the command modules share: the stdout/stderr consoles, the global ``--quiet`` state,
progress bars, and the small parsers and table printers several commands use."""

from __future__ import annotations

from typing import Optional

from rich.console import Console

from oodcli.errors import UsageError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

INTERRUPTED = ("interrupted: the store keeps only whole results; run the same command again to finish "
               "(an extraction resumes where it stopped)")

STATE = {"quiet": False}


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
