"""``oodcli select-k`` (APEX's prototypes per class by GMM + BIC) and ``oodcli analyze collisions``
(inter-class prototype collisions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import _print_wide, _progress, out
from oodcli.errors import OodError, UsageError

analyze_app = typer.Typer(help="Analyses of what a store holds besides scores.", no_args_is_help=True)


def _class_names(st) -> Optional[list[str]]:
    """The ID class names of the benchmark a store was extracted from, if it is a known one."""
    from oodcli.data.benchmarks import get_benchmark

    try:
        return get_benchmark(st.attrs["benchmark"]).resolve_class_names()
    except (KeyError, OodError):
        return None


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
