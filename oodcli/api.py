"""Library entry points behind the CLI commands that touch several modules."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from oodcli.backbones.base import get_spec
from oodcli.data.base import SplitDef, data_root as resolve_root, open_source
from oodcli.data.benchmarks import get_benchmark
from oodcli.errors import OodError, UsageError
from oodcli.extract import DTYPES, ExtractResult, LazyModel, check_layers, extract_split, resolve_device
from oodcli.store import check_name, features_node, open_store, remove_store

ROLES = ("id", "ood-near", "ood-far", "ood")


def _role_from_name(split: str) -> str:
    parts = split.split("/")
    if parts[0] != "ood":
        return "id"
    return {"near": "ood-near", "far": "ood-far"}.get(parts[1] if len(parts) > 2 else "", "ood")


def resolve_splits(
    benchmark: str | None, data: str | None, splits: list[str] | None, role: str | None
) -> list[SplitDef]:
    if benchmark and data:
        raise UsageError("give either --benchmark or --data, not both")
    for split in splits or []:
        check_name(split, "--split")
    if benchmark:
        if role:
            raise UsageError("--role goes with --data; a benchmark defines its splits' roles")
        bench = get_benchmark(benchmark)
        return [bench.split(s) for s in splits] if splits else list(bench.splits)
    if data:
        if not splits or len(splits) != 1:
            raise UsageError("--data needs exactly one --split NAME (e.g. --split ood/far/mydata)")
        role = role or _role_from_name(splits[0])
        if role not in ROLES:
            raise UsageError(f"unknown --role '{role}'; use one of {', '.join(ROLES)}")
        return [SplitDef(splits[0], role, data)]
    raise UsageError("say what to extract: --benchmark NAME or --data SOURCE")


def extract_splits(
    model: str,
    store: str | Path,
    benchmark: str | None = None,
    data: str | None = None,
    splits: list[str] | None = None,
    role: str | None = None,
    weights: str | None = None,
    layers: list[str] | None = None,
    batch_size: int = 128,
    device: str = "auto",
    dtype: str = "float16",
    workers: int = 0,
    data_root: str | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    progress=None,
) -> list[ExtractResult]:
    """Extract several splits with one lazily built backbone.

    Everything that can be checked without running the backbone (model, weights,
    layers, device, data sets) is checked before the store is touched; a store
    created by this call is removed again if it fails before its first chunk.
    """
    spec = get_spec(model)
    spec.weights_identity(weights)
    spec = spec.for_weights(weights)
    layer_names = check_layers(spec, layers)
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'; use float16 or float32")
    defs = resolve_splits(benchmark, data, splits, role)
    root = resolve_root(data_root)
    datasets = [(d, open_source(d.source, root, d.is_ood)) for d in defs]
    for d, ds in datasets:
        if len(ds) == 0:
            raise OodError(f"split '{d.name}' ({d.source}) has no samples; check the data source")

    store = Path(store)
    created = not store.exists()
    st = open_store(store, "a")
    results: list[ExtractResult] = []
    try:
        old = st.attrs.get("benchmark")
        if benchmark and old and old != benchmark:
            raise OodError(f"store {store} holds benchmark '{old}', not '{benchmark}'; use another --store")
        if benchmark and not old:
            st.set_attrs("", benchmark=benchmark)
        lazy = LazyModel(spec, weights, dev)

        def advance_for(split: str, total: int, done: int):
            task = progress.add_task(f"{spec.name} {split}", total=total, completed=done)
            return lambda k: progress.advance(task, k)

        with progress if progress is not None else nullcontext():
            for d, ds in datasets:
                results.append(
                    extract_split(
                        st, spec, weights, ds, d.name, d.role, d.source, lazy, layer_names,
                        batch_size=batch_size, dtype=dtype, workers=workers, overwrite=overwrite,
                        chunk_rows=chunk_rows, progress=advance_for if progress is not None else None,
                    )
                )
    except BaseException:
        nothing_kept = created and not any(
            st.node_attrs(features_node(d.name, spec.name)).get("rows_done", 0)
            for d, _ in datasets
            if st.exists(features_node(d.name, spec.name))
        )
        st.close()
        if nothing_kept:
            remove_store(store)
        raise
    st.close()
    return results
