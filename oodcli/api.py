"""Library entry points behind the CLI commands that touch several modules."""

from __future__ import annotations

import dataclasses
import os
import re
from contextlib import nullcontext
from fnmatch import fnmatchcase
from pathlib import Path

from oodcli.backbones.base import get_spec
from oodcli.backbones.spec import parse_preprocess
from oodcli.data.base import CSID_ROLE, SplitDef, data_root as resolve_root, open_source, role_from_name
from oodcli.data.benchmarks import ROLES, get_benchmark
from oodcli.data.external import with_columns
from oodcli.errors import OodError, UsageError
from oodcli.extraction import (
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
from oodcli.fewshot import few_shot_subset
from oodcli.perturb import check_perturbations, check_reference, parse_perturbations
from oodcli.store import check_name, features_node, open_store, remove_store


_PATTERN = re.compile(r"[*?\[]")  # a --split holding these is a shell-style pattern of a benchmark's split names


def match_splits(bench, splits: list[str] | None) -> list[str] | None:
    """Each --split name, or each of the benchmark's split names a pattern ('ood/*') matches."""
    if not splits:
        return splits
    names = [d.name for d in bench.splits]
    picked: list[str] = []
    for s in splits:
        found = [n for n in names if fnmatchcase(n, s)] if _PATTERN.search(s) else [s]
        if not found:
            raise UsageError(f"--split '{s}' matches no split of benchmark '{bench.name}' ({', '.join(names)})")
        picked += [n for n in found if n not in picked]
    return picked


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
        splits = match_splits(bench, splits)
        return [bench.split(s) for s in splits] if splits else [s for s in bench.splits if not s.optional]
    if data:
        if any(_PATTERN.search(s) for s in splits or []):
            raise UsageError("--split patterns ('ood/*') pick among a benchmark's splits; with --data name the split")
        if not splits or len(splits) != 1:
            raise UsageError("--data needs exactly one --split NAME (e.g. --split ood/far/mydata)")
        role = role or role_from_name(splits[0])
        if role not in ROLES:
            raise UsageError(f"unknown --role '{role}'; use one of {', '.join(ROLES)}")
        return [SplitDef(splits[0], role, data)]
    raise UsageError("say what to extract: --benchmark NAME or --data SOURCE")


def _reference_classes(store: Path, benchmark: str | None) -> tuple[list[str] | None, list[str] | None, str]:
    """(class folders recorded with an ID split of the store, the benchmark's class names, where
    the folders come from): what a labelled folder split must match."""
    recorded, where = None, ""
    if store.exists():
        from oodcli.store import list_splits, split_node

        try:
            existing = open_store(store, "r")
        except OodError:  # e.g. a store whose creation was killed: opening it to write decides what to do
            existing = None
        if existing is not None:
            with existing:
                benchmark = benchmark or existing.attrs.get("benchmark")
                splits = list_splits(existing)
                for split in (["train"] if "train" in splits else []) + splits:
                    attrs = existing.node_attrs(split_node(split))
                    if attrs.get("class_names") and attrs.get("role") == "id":
                        recorded, where = list(attrs["class_names"]), f"split '{split}'"
                        break
    names = None
    if benchmark:
        try:
            names = get_benchmark(benchmark).resolve_class_names()
        except OodError:
            names = None
    return recorded, (list(names) if names else None), (where or f"benchmark '{benchmark}'")


def _folder_mismatch(names: list[str], reference: list[str]) -> str:
    missing = [c for c in reference if c not in names]
    extra = [c for c in names if c not in reference]
    return "; ".join(part for part in (
        f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
        f"not in the list {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "",
        "the same names in another order" if not missing and not extra else "",
    ) if part)


def check_class_folders(store: Path, benchmark: str | None, datasets: list) -> None:
    """Labels of image folders come from their class sub-folders in sorted order: refuse an ID
    split whose folders are not the class list (a missing folder would shift every later label)
    and an ID split without labels (a flat folder), in one line each. The list is the folders
    recorded with the store's ID splits (or the first labelled split of this call); else the
    benchmark's classes, by name where the folders carry the names, by count where they carry
    ids (ImageNet's wnid folders)."""
    from oodcli.data.sources import FolderDataset

    recorded, bench_names, where = _reference_classes(store, benchmark)
    for d, ds in datasets:
        if d.role not in ("id", CSID_ROLE) or type(ds) is not FolderDataset or not ds.name.startswith("folder:"):
            continue  # OOD and synthetic splits carry no labels; lists and packaged data sets give theirs
        names = list(ds.class_names or [])
        if not names:
            raise OodError(
                f"split '{d.name}' ({d.source}) is an ID split but its images have no labels (no class sub-folders); "
                "put them in one folder per class, or give --role ood (or ood-near / ood-far) if it is OOD data"
            )
        fix = "labels follow the folders' sorted names, so give it one folder per class, all of them"
        if recorded is not None:
            if names != recorded:
                raise OodError(f"the class folders of split '{d.name}' ({len(names)}) are not the {len(recorded)} of "
                               f"{where} ({_folder_mismatch(names, recorded)}); {fix}")
        elif bench_names is not None:
            if any(n in bench_names for n in names):  # folders named by class
                if names != bench_names:
                    raise OodError(f"the class folders of split '{d.name}' ({len(names)}) are not the {len(bench_names)} "
                                   f"classes of {where} ({_folder_mismatch(names, bench_names)}); {fix}")
            elif len(names) != len(bench_names):  # folders named by id: at least as many as the classes
                raise OodError(f"split '{d.name}' has {len(names)} class folders but {where} has {len(bench_names)} "
                               f"classes; {fix}")
        if recorded is None:
            recorded, where = names, f"split '{d.name}'"  # the first labelled split sets the list for the rest


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
    verify_content: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    head: str | None = None,
    layer_paths: list[str] | None = None,
    strict: bool = True,
    shots: int | None = None,
    seed: int | None = None,
    classes: str | None = None,
    store_as: str | None = None,
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

    ``image_column`` / ``label_column`` name the columns a ``data`` source of a user's own data
    reads (``hf:``, ``webdataset:``, ``csv:``, ``jsonl:``; found by type or name when not given).

    ``model`` may be ``SOURCE:NAME`` (torchvision, timm, hf, python; see ``oodcli.backbones.sources``):
    ``head`` names its classifier module (--head), ``layer_paths`` adds layers read at submodules
    (``NAME=module.path[:in|:out]``) and ``strict=False`` loads a weights file whose keys do not all fit.

    ``shots`` (with ``seed``, default 0, and ``classes`` ``FIRST-LAST``) extracts only a few-shot
    subset of each (ID) split: the draw ``train --shots`` makes from a whole split (``oodcli.fewshot``).

    ``store_as`` stores the features under that backbone name instead of the model's (``--as``):
    several checkpoints of one network side by side, e.g. the members of ``score ensemble``.
    """
    spec = get_spec(model, weights=weights, head=head, layers=layer_paths or (), strict=strict,
                    preprocess=preprocess)
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
    if hasattr(spec, "requesting"):  # a SOURCE:NAME model: each layer asked for is checked when it is built
        layer_names = tuple(dict.fromkeys((*layer_names, *(t.name for t in spec.source.taps))))  # --layer: stored
        spec = spec.requesting(layer_names)
    if store_as is not None:
        spec = spec.stored_as(store_as, model)
    pool = check_featmap_pool(layer_names, featmap_pool)
    perturbs = parse_perturbations(perturb)
    shard_of = parse_shard(shard)
    if shard_of is not None and shard is None and device == "auto" and "LOCAL_RANK" in os.environ:
        if resolve_device("auto").type == "cuda":  # torchrun: one GPU per local rank
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    dev = check_device(device)  # a cache hit with --device auto imports no torch
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'; use float16 or float32")
    if image_column or label_column:
        if not data:
            raise UsageError("--image-column / --label-column go with --data; a benchmark names its own columns")
        data = with_columns(data, image_column, label_column)
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
    check_class_folders(Path(store), benchmark, datasets)
    n_classes = get_benchmark(benchmark).num_classes if benchmark else None
    datasets = [(d, few_shot_subset(d.name, d.role, ds, shots, seed, classes, n_classes)) for d, ds in datasets]

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
                        shard=shard_of, featmap_pool=pool, perturbs=perturbs, verify_content=verify_content,
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


# ---- the public library (``import oodcli``): the calls behind the commands ---------------------


def extract(model: str, store: str | Path, **options) -> list[ExtractResult]:
    """``oodcli extract``: run ``model`` once over each split and write its layers into ``store``.
    Options as the command's (``benchmark``, ``data``, ``splits``, ``role``, ``weights``, ``layers``,
    ``batch_size``, ``device``, ``dtype``, ``preprocess``, ...); see ``extract_splits``."""
    return extract_splits(model, store, **options)


def score(store: str | Path, methods: str | list[str] = "all", *, backbone: str | list[str] | None = None,
          id_split: str | None = None, ood: list[str] | None = None, train_split: str = "train",
          params: dict[str, dict] | None = None, save_as: str | None = None, from_sweep: bool = False,
          progress=None, log=None) -> list:
    """``oodcli score``: score the ID test split and every OOD split with ``methods`` ("all", "knn,vim"
    or a list); ``params`` = ``{"knn": {"k": 10}}`` as ``-p knn.k=10``; ``backbone`` a name, or for
    ``ensemble`` its members (``"a,b,c"`` or a list). Returns one ``ScoreResult`` per method and
    split written; a named method that cannot run raises its one-line ``OodError``."""
    from oodcli.scoring import parse_methods, score_store

    if isinstance(backbone, (list, tuple)):
        backbone = ",".join(backbone)
    text = methods if isinstance(methods, str) else ",".join(methods)
    names = parse_methods(text)
    with open_store(store, "r+") as st:
        return score_store(st, names, backbone=backbone, id_split=id_split, ood=ood, train_split=train_split,
                           hparams=params or {}, progress=progress, only_applicable=text.strip() == "all",
                           save_as=save_as, log=log, from_sweep=from_sweep)


def sweep(store: str | Path, method: str, grid: str | dict[str, list] | None = None, *, backbone: str | None = None,
          val_id: str = "val", val_ood: list[str] | None = None, train_split: str = "train", progress=None,
          log=None) -> dict:
    """``oodcli sweep``: choose ``method``'s hyperparameters on the validation splits (``grid`` as the
    command's ``'k=1,10;...'`` or a dict of lists); records and returns the sweep."""
    from oodcli.sweeping import parse_grid, run_sweep

    parsed = parse_grid(grid, method) if isinstance(grid, str) else grid
    with open_store(store, "r+") as st:
        return run_sweep(st, method, parsed, backbone=backbone, val_id=val_id, val_ood=val_ood,
                         train_split=train_split, progress=progress, log=log)


def report(store: str | Path, methods: list[str] | None = None, *, id_split: str | None = None, fpr: str = "id",
           average_runs: bool = False, fsood: bool = False) -> dict:
    """``oodcli report --format json`` as a dict: per method, per OOD set and near/far averages, every
    metric in both FPR conventions (fractions, not %), ID accuracy, recorded thresholds. ``fsood``:
    the cs-ID splits counted as ID (``report --fsood``), with ``csid_accuracy`` per split and
    ``fsood_accuracy`` over ID and cs-ID pooled."""
    from oodcli.reporting import build_report

    with open_store(store, "r") as st:
        return build_report(st, methods, id_split, average_runs, fpr=fpr, fsood=fsood)


FRAME_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")


def report_frame(store: str | Path, methods: list[str] | None = None, *, id_split: str | None = None,
                 fpr: str = "id", average_runs: bool = False, fsood: bool = False):
    """The report as a pandas DataFrame in OpenOOD's layout: one row per (method, OOD set) and the
    near / far averages, columns FPR@95 (in the ``fpr`` convention), AUROC, AUPR_IN, AUPR_OUT and
    ACC (the ID accuracy; with ``fsood``, cs-ID counted as ID, the accuracy over ID and cs-ID
    pooled, as OpenOOD's FS-OOD table), in %. With ``fpr="openood"`` the AUPR columns are
    OpenOOD's trapezoid ones."""
    import pandas as pd

    from oodcli.reporting import FPR_CONVENTIONS

    data = report(store, methods, id_split=id_split, fpr=fpr, average_runs=average_runs, fsood=fsood)
    suffix = "_openood" if fpr == "openood" else ""
    acc = data["fsood_accuracy"] if fsood else data["id_accuracy"]
    rows, index = [], []
    for method, entry in data["methods"].items():
        cells = []  # OpenOOD's order: the near sets and their average, then the far ones
        for group in ("near", "far", "ood"):
            cells += [(s, entry["sets"][s]) for s, g in data["ood_splits"].items() if g == group and s in entry["sets"]]
            if group in entry["averages"]:
                cells.append((f"{group}_average", entry["averages"][group]))
        for name, m in cells:
            index.append((method, name))
            rows.append([100 * m[FPR_CONVENTIONS[fpr]], 100 * m["auroc"], 100 * m["aupr_in" + suffix],
                         100 * m["aupr_out" + suffix], None if acc is None else 100 * acc])
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["method", "ood_set"]),
                        columns=list(FRAME_COLUMNS))


def threshold(store: str | Path, method: str, split: str | None = None, tpr: float = 0.95):
    """``oodcli threshold``: the score keeping ``tpr`` of the ID validation split, recorded in the store."""
    from oodcli.deploy import record_threshold

    return record_threshold(store, method, split=split, tpr=tpr)
