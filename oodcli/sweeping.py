"""Hyperparameter search on validation splits, from the store (``oodcli sweep``).

OpenOOD chooses a postprocessor's hyperparameters on held-out data ("APS"): every
setting of its ``postprocessor_sweep`` is scored on the ID validation split and the
OOD validation set, and the setting with the highest AUROC is kept. There each setting
costs a network pass; here the features are in the store, so a setting costs a fit on
the stored train features and a pass over the stored validation features.

What a sweep reads: the train split (to fit) and the validation splits (``val`` with
role id, every split with role ``ood-val``); never a test split. What it writes, in one
transaction: ``fitted/sweeps/<method>`` with the grid, every setting's AUROC and FPR@95
(also as arrays ``auroc``/``fpr95`` for plain zarr readers), the chosen setting and the
identity of the features it was chosen on (backbone, model id, train fingerprint).
``oodcli score METHOD --from-sweep`` scores with the chosen setting, and refuses when
the sweep was made on other features.

Choice: highest AUROC averaged over the OOD validation sets (OpenOOD has one; with
several each counts alike); a tie goes to the first setting in grid order (the
cartesian product with the first grid key outermost). A setting that cannot run on this
data (``knn.k`` above the train rows, ``vim.dim`` at or above the feature width) is
recorded as skipped with its reason; the sweep fails only if no setting runs.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Callable

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError, UsageError
from oodcli.metrics import ood_metrics
from oodcli.scorers.base import (
    Progress, get_scorer, is_scorer, no_progress, param_value, scorer_params, train_fingerprint, unknown_method,
)
from oodcli.scoring import (  # noqa: F401  (SWEEPS, load_sweep, check_sweep_matches: their old home)
    SWEEPS, _pick_backbone, check_splits_exist, check_sweep_matches, load_sweep, sweep_node, val_ood_splits,
)
from oodcli.store import Store, check_name, list_backbones, split_role, split_states

#: OpenOOD v1.5's ``postprocessor_sweep`` (configs/postprocessors/<name>.yml) for the methods
#: here that have one, under our parameter names: knn K_list, react percentile_list, ash
#: percentile_list (one file for the three ASH variants), vim dim_list, gen gamma_list x M_list,
#: ebo (energy) temperature_list, mcm tau_list.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "knn": {"k": [50, 100, 200, 500, 1000]},
    "react": {"percentile": [85, 90, 95, 99]},
    "ash-p": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "ash-s": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "ash-b": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "vim": {"dim": [256, 1000]},
    "gen": {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "top_m": [10, 50, 100, 200, 500, 1000]},
    "energy": {"temperature": [1, 10, 100, 1000]},
    "mcm": {"temperature": [0.01, 1, 10]},
}

CACHE_BYTES = 1 << 30  # feature reads kept in RAM across the settings of one sweep


def parse_grid(text: str, method: str) -> dict[str, list]:
    """``'k=1,10,50;percentile=80,90'`` -> ``{'k': [1, 10, 50], 'percentile': [80, 90]}``, checked
    against the method's parameters (one line naming what is wrong)."""
    accepted = scorer_params(method)
    grid: dict[str, list] = {}
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise UsageError(f"--grid '{text}' gives no setting; write NAME=V1,V2;NAME=V1,... (e.g. 'k=10,50,100')")
    for part in parts:
        name, eq, values = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--grid part '{part.strip()}' is not NAME=V1,V2,... (e.g. 'k=10,50,100')")
        if "." in name and name.split(".", 1)[0] == method:
            name = name.split(".", 1)[1]  # knn.k=... reads as k=...
        if name not in accepted:
            raise UsageError(f"method '{method}' has no parameter '{name}'; it takes: "
                             f"{', '.join(sorted(accepted)) or 'none'}")
        if name in grid:
            raise UsageError(f"--grid names '{name}' twice; give all its values in one part")
        items = [v.strip() for v in values.split(",")]
        if any(not v for v in items):
            raise UsageError(f"--grid '{name}={values}' has an empty value; separate values with single commas")
        parsed = [param_value(v) for v in items]
        if len({json.dumps(v) for v in parsed}) != len(parsed):
            raise UsageError(f"--grid '{name}={values}' repeats a value")
        grid[name] = parsed
    return grid


def default_grid(method: str) -> dict[str, list]:
    if method not in DEFAULT_GRIDS:
        have = ", ".join(sorted(DEFAULT_GRIDS))
        raise UsageError(f"'{method}' has no default grid (OpenOOD sweeps none of its parameters); give --grid "
                         f"NAME=V1,V2 (its parameters: {', '.join(scorer_params(method)) or 'none'}); "
                         f"default grids exist for {have}")
    return {k: list(v) for k, v in DEFAULT_GRIDS[method].items()}


def grid_settings(grid: dict[str, list]) -> list[dict]:
    """Every setting of the grid, first key outermost (the order ties are broken in)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


class _CachedReads:
    """The store, read-only, with array reads (up to ``limit`` bytes) and node metadata kept in
    RAM for the settings of one sweep: nothing changes between settings, so each array chunk
    and each node lookup (milliseconds apiece in zarr) is paid once, not once per setting."""

    _MEMO = ("exists", "is_array", "shape", "dtype", "chunk_rows", "children")

    def __init__(self, store: Store, limit: int = CACHE_BYTES):
        self._store, self._limit, self._used = store, limit, 0
        self._cache: dict = {}
        self._meta: dict = {}

    def node_attrs(self, name: str) -> dict:
        key = ("node_attrs", name)
        if key not in self._meta:
            self._meta[key] = self._store.node_attrs(name)
        return json.loads(json.dumps(self._meta[key]))  # a copy the caller may change

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        key = (name, None if rows is None else (rows.start, rows.stop, rows.step))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = self._store.read(name, rows)
        if self._used + value.nbytes <= self._limit:
            value.setflags(write=False)
            self._cache[key] = value
            self._used += value.nbytes
        return value

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name not in self._MEMO:
            return attr

        def memo(*args):
            key = (name, *args)
            if key not in self._meta:
                self._meta[key] = attr(*args)
            return self._meta[key]

        return memo


def _check_val_splits(store: Store, val_id: str, val_ood: list[str]) -> None:
    whole, _ = split_states(store)
    if val_id not in whole:
        raise OodError(f"store {store.path} has no ID validation split '{val_id}'; extract it (e.g. 'oodcli extract "
                       f"--benchmark digits --split {val_id} ...') or name one with --val-id")
    if val_id == "test" or split_role(store, val_id) != "id":
        raise UsageError(f"--val-id '{val_id}' is {'the ID test split' if val_id == 'test' else 'not an ID split'}; "
                         "a sweep chooses on validation data only (e.g. --val-id val)")
    if not val_ood:
        raise OodError(f"store {store.path} has no OOD validation split (role ood-val, e.g. ood/val/...); extract one "
                       "(e.g. 'oodcli extract --benchmark digits --split ood/val/textures ...' or --data SOURCE "
                       "--split ood/val/NAME) or name one with --val-ood")
    for split in val_ood:
        if split not in whole:
            raise OodError(f"store {store.path} has no split '{split}'; its OOD validation splits: "
                           f"{', '.join(s for s in whole if split_role(store, s) == 'ood-val') or 'none'}")
        role = split_role(store, split)
        if role != "ood-val":
            raise UsageError(f"--val-ood '{split}' has role '{role}', a test split; a sweep chooses on OOD validation "
                             "splits only (role ood-val, e.g. ood/val/...)")


def run_sweep(
    store: Store,
    method: str,
    grid: dict[str, list] | None = None,
    backbone: str | None = None,
    val_id: str = "val",
    val_ood: list[str] | None = None,
    train_split: str = "train",
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    write: bool = True,
) -> dict:
    """Fit every setting on ``train_split``, score it on the validation splits, choose the best
    AUROC; record the whole grid under ``fitted/sweeps/<method>`` (unless ``write`` is false)
    and return the record."""
    progress = progress or no_progress
    if not is_scorer(method):
        raise unknown_method(method)
    for name, what in ((val_id, "--val-id"), (train_split, "--train"), *((o, "--val-ood") for o in val_ood or [])):
        check_name(name, what)
    grid = grid if grid is not None else default_grid(method)
    settings = grid_settings(grid)
    scorers = [get_scorer(method, **s) for s in settings]  # bad values: before any work
    cached = _CachedReads(store)  # every check and every setting below reads through it; nothing is written
    val_ood = list(dict.fromkeys(val_ood)) if val_ood else val_ood_splits(cached)
    _check_val_splits(cached, val_id, val_ood)
    splits = [val_id, *val_ood]
    check_splits_exist(cached, splits)
    # only the splits a sweep reads: the train and validation splits
    backbones = sorted({b for s in [train_split, *splits] if cached.exists(f"splits/{s}")
                        for b in list_backbones(cached, s)})
    if not backbones:
        raise OodError(f"store {store.path} has no features on '{val_id}'; run 'oodcli extract' first")
    if backbone is not None and backbone not in backbones:
        raise OodError(f"store {store.path} has no '{backbone}' features on the train and validation splits; "
                       f"their backbones: {', '.join(backbones)}")
    chosen, model_id, why, error = _pick_backbone(cached, scorers[0], backbones, backbone, splits, train_split, {})
    if error is not None:
        raise error
    if why is not None and log is not None:
        log(f"using backbone '{chosen}' for {method} ({why}; --backbone picks one)")

    notes = []
    for scorer in scorers:  # the same inputs score will use (e.g. the layer ASH shapes)
        notes += [n for n in scorer.complete_inputs(cached, chosen, splits) if n not in notes]
    if log is not None:
        for note in notes:
            log(f"{method}: {note}")
    advance = progress(f"sweep {method}", len(settings))
    rows: list[dict] = []
    for setting, scorer in zip(settings, scorers):
        row = {"hparams": setting, "status": "done", "reason": None}
        t0 = time.perf_counter()
        try:
            scorer.prepare(cached, chosen, train_split, model_id)
            id_scores = scorer.score(cached, chosen, val_id)
            per_set = {s: ood_metrics(id_scores, scorer.score(cached, chosen, s)).as_dict() for s in val_ood}
        except OodError as exc:  # this setting cannot run on this data (knn.k above the train rows...)
            row |= {"status": "skipped", "reason": str(exc), "auroc": None, "fpr95": None, "sets": {}}
        else:
            row |= {"auroc": float(np.mean([m["auroc"] for m in per_set.values()])),
                    "fpr95": float(np.mean([m["fpr95"] for m in per_set.values()])), "sets": per_set}
        finally:
            scorer.release()
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        advance(1)
    done = [i for i, r in enumerate(rows) if r["status"] == "done"]
    if not done:
        raise OodError(f"no setting of the {method} grid could run: {rows[0]['reason']}")
    best = max(done, key=lambda i: (rows[i]["auroc"], -i))  # ties: the first in grid order
    record = {
        "method": method,
        "grid": grid,
        "settings": rows,
        "best": best,
        "best_hparams": rows[best]["hparams"],
        "rule": "highest mean AUROC over the OOD validation splits; ties: first in grid order",
        "backbone": chosen,
        "model_id": model_id,
        "train_split": train_split,
        "train_fingerprint": train_fingerprint(cached, chosen, train_split, scorers[0].layers),
        "val_id": val_id,
        "val_ood": val_ood,
        "oodcli_version": __version__,
    }
    if write:
        with store.transaction() as txn:
            node = txn.stage(sweep_node(method))
            store.require_group(node)
            nan = float("nan")
            store.write_array(f"{node}/auroc", np.array([r["auroc"] if r["auroc"] is not None else nan for r in rows]))
            store.write_array(f"{node}/fpr95", np.array([r["fpr95"] if r["fpr95"] is not None else nan for r in rows]))
            store.set_attrs(node, **record, complete=True)
    return record
