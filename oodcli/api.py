"""Library entry points behind the CLI commands that touch several modules."""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path

from oodcli.backbones.base import get_spec
from oodcli.backbones.spec import parse_preprocess
from oodcli.data.base import SplitDef, data_root as resolve_root, open_source, role_from_name
from oodcli.data.benchmarks import ROLES, get_benchmark
from oodcli.errors import OodError, UsageError
from oodcli.extract import (
    DTYPES,
    ExtractResult,
    LazyModel,
    check_device,
    check_featmap_pool,
    check_layers,
    extract_split,
    model_id,
    resolve_device,
)
from oodcli.perturb import check_perturbations, check_reference, parse_perturbations
from oodcli.store import check_name, features_node, open_store, remove_store


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
        role = role or role_from_name(splits[0])
        if role not in ROLES:
            raise UsageError(f"unknown --role '{role}'; use one of {', '.join(ROLES)}")
        return [SplitDef(splits[0], role, data)]
    raise UsageError("say what to extract: --benchmark NAME or --data SOURCE")


MAX_SHARDS = 100_000


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` (I = 0..N-1), or torchrun's RANK / WORLD_SIZE when it is not given."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        text = f"{os.environ.get('RANK', '0')}/{world}"
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not slash or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard '{text}' is not I/N with 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4)")
    if n > MAX_SHARDS:
        raise UsageError(f"--shard '{text}': at most {MAX_SHARDS} shards (one chunk of rows each at least)")
    return (i, n) if n > 1 else None


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
    shard: str | None = None,
    featmap_pool: int | None = None,
    perturb: list[str] | None = None,
    preprocess: str | None = None,
) -> list[ExtractResult]:
    """Extract several splits with one lazily built backbone.

    Everything that can be checked without running the backbone (model, weights,
    layers, device, data sets) is checked before the store is touched; a store
    created by this call is removed again if it fails before its first chunk.

    ``featmap_pool`` average-pools the ``featmap`` layer to G x G; ``perturb`` takes
    ``--perturb`` strings (``odin:temperature=1000,epsilon=0.0014``, ``mahalanobis:epsilon=...``;
    see ``oodcli.perturb``). A Mahalanobis perturbation fits on the train split, which must be
    in the store already or among these splits (it is then extracted first).

    The images are normalised as the checkpoint's training set was: models trained on a
    benchmark's data (``cifar_resnet*``) take that benchmark's mean and std (``--benchmark``,
    else the store's); ``preprocess`` (``KEY=VALUE,...``, see ``parse_preprocess``) overrides
    any of resize, crop, mean, std and interpolation.
    """
    spec = get_spec(model)
    spec.weights_identity(weights)
    spec = spec.for_weights(weights)
    trained_on = benchmark
    if trained_on is None and Path(store).exists():
        with open_store(Path(store), "r") as existing:
            trained_on = existing.attrs.get("benchmark")
    spec = spec.for_data(trained_on)
    if preprocess is not None:
        spec = dataclasses.replace(spec, preprocess=parse_preprocess(preprocess, spec.preprocess))
    layer_names = check_layers(spec, layers)
    pool = check_featmap_pool(layer_names, featmap_pool)
    perturbs = parse_perturbations(perturb)
    shard_of = parse_shard(shard)
    if shard_of is not None and shard is None and device == "auto" and "LOCAL_RANK" in os.environ:
        if resolve_device("auto").type == "cuda":  # torchrun: one GPU per local rank
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    dev = check_device(device)  # a cache hit with --device auto imports no torch
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'; use float16 or float32")
    defs = resolve_splits(benchmark, data, splits, role)
    names = [d.name for d in defs]
    check_perturbations(perturbs, spec, layer_names, names)
    if perturbs and shard_of is not None:
        raise UsageError("--perturb runs without --shard (its Mahalanobis fit reads the whole train split); "
                         "extract the perturbed splits in one process")
    fit_splits = {p.params["train"] for p in perturbs if p.kind == "mahalanobis"}
    defs.sort(key=lambda d: d.name not in fit_splits)  # a Mahalanobis fit split is extracted first
    root = resolve_root(data_root)
    datasets = [(d, open_source(d.source, root, d.is_ood)) for d in defs]
    for d, ds in datasets:
        if len(ds) == 0:
            raise OodError(f"split '{d.name}' ({d.source}) has no samples; check the data source")

    store = Path(store)
    if any(p.kind == "mahalanobis" for p in perturbs):  # its train features must be there: refuse before writing
        with (open_store(store, "r") if store.exists() else nullcontext()) as existing:
            check_reference(existing, store, perturbs, spec.name, model_id(spec, weights), names)
    created = not store.exists() and shard_of is None  # shards share a store: none removes it
    st = open_store(store, "a", shared=shard_of is not None)
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
                        shard=shard_of, featmap_pool=pool, perturbs=perturbs,
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
