"""``oodcli store info|verify|rm`` (inspect, check and prune a store) and ``oodcli index`` (a faiss
index over an array of the store, saved into it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import _progress, _row_progress, out

store_app = typer.Typer(help="Inspect and check stores.", no_args_is_help=True)


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
