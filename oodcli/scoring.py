"""Score splits of a store with one or more methods and write ``scores/<method>/<split>``.

All inputs are checked before anything is computed, and fitted state and scores are
written only after every method has scored every split, so a failure leaves the
store as it was. A method whose fitted state under ``fitted/<method>`` matches its
hyperparameters and train features loads it instead of fitting (reported as cached).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import (
    Progress,
    Scorer,
    no_progress,
    check_features,
    check_train_split,
    get_scorer,
    load_head,
    scorer_names,
)
from oodcli.store import (
    Store,
    check_name,
    features_node,
    half_made_splits,
    list_backbones,
    list_splits,
    require_whole_splits,
    split_node,
    split_role,
)


@dataclass
class ScoreResult:
    method: str
    split: str
    rows: int
    mean: float
    seconds: float
    fit: str = "-"  # "fitted", "cached" (state loaded from fitted/), or "-" (nothing to learn)
    fit_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def parse_methods(text: str) -> list[str]:
    names = scorer_names()
    if text.strip() == "all":
        return names
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("no method given; name one or more, e.g. 'msp,energy', or 'all'")
    for m in methods:
        if m not in names:
            raise UsageError(f"unknown method '{m}'; choose from: {', '.join(names)}, or 'all'")
    return list(dict.fromkeys(methods))


def default_backbone(store: Store, split: str | None = None) -> str:
    """The only backbone in the store; several need ``--backbone``."""
    splits = [split] if split else list_splits(store)
    found = sorted({b for s in splits for b in list_backbones(store, s)})
    if not found:
        raise OodError(f"store {store.path} has no extracted features; run 'oodcli extract' first")
    if len(found) > 1:
        raise UsageError(f"store {store.path} holds several backbones ({', '.join(found)}); pick one with --backbone")
    return found[0]


def default_id_split(store: Store) -> str:
    require_whole_splits(store)
    splits = list_splits(store)
    if "test" in splits:
        return "test"
    ids = [s for s in splits if split_role(store, s) == "id" and s != "train"]
    if not ids:
        raise OodError(f"store {store.path} has no ID test split; extract one or pass --id SPLIT")
    return ids[0]


def ood_splits(store: Store) -> list[str]:
    """Every OOD split; refused while the store holds a half-made split, which might be one."""
    require_whole_splits(store)
    return [s for s in list_splits(store) if split_role(store, s).startswith("ood")]


def check_splits_exist(store: Store, splits: list[str]) -> None:
    """Each named split is whole and has rows, or a one-line error saying what to do."""
    known = list_splits(store)
    half = half_made_splits(store)
    for split in splits:
        if split in half:
            raise OodError(f"split '{split}' in {store.path} is half-made (an interrupted extract); re-run that "
                           f"extract, or remove it with 'oodcli store rm {store.path} {split}'")
        if split not in known:
            raise OodError(f"store {store.path} has no split '{split}'; it has: {', '.join(known) or 'none'}")
        if store.shape(f"{split_node(split)}/labels")[0] == 0:
            raise OodError(f"split '{split}' in {store.path} is empty; there is nothing to score "
                           f"(remove it with 'oodcli store rm {store.path} {split}')")


def check_same_model(store: Store, backbone: str, splits: list[str]) -> None:
    """Refuse to compare splits whose features came from different weights or preprocessing."""
    ids = {s: store.node_attrs(features_node(s, backbone)).get("model_id") for s in splits}
    reference = next(iter(ids.values()))
    for s, mid in ids.items():
        if mid != reference:
            a = store.node_attrs(features_node(splits[0], backbone))["parts"]
            b = store.node_attrs(features_node(s, backbone))["parts"]
            diff = [k for k in ("weights", "preprocess") if a.get(k) != b.get(k)]
            raise OodError(
                f"splits '{splits[0]}' and '{s}' were extracted with different '{backbone}' "
                f"{' and '.join(diff) or 'models'}; re-extract one of them with the same model"
            )


def _applicable(store: Store, backbone: str, splits: list[str], train_split: str, scorer: Scorer) -> bool:
    """Whether the store holds every layer (and the head) this scorer reads."""
    needed = splits + ([train_split] if scorer.needs_fit else [])
    if not all(store.is_array(f"{features_node(s, backbone)}/{layer}") for s in needed for layer in scorer.layers):
        return False
    if scorer.uses_head and not store.is_array(f"backbones/{backbone}/head/weight"):
        return False
    return scorer.applicable(store, backbone, train_split)


def score_store(
    store: Store,
    methods: list[str],
    backbone: str | None = None,
    id_split: str | None = None,
    ood: list[str] | None = None,
    train_split: str = "train",
    hparams: dict[str, dict] | None = None,
    progress: Progress | None = None,
    only_applicable: bool = False,
    save_as: str | None = None,
) -> list[ScoreResult]:
    """Check every input, fit or load each method, score each split, then write everything.

    ``save_as`` writes a single method's scores under another name (``scores/<save_as>/``),
    so that ablations and the same method on several backbones sit side by side in a report.

    ``only_applicable`` (what 'all' asks for) drops the methods whose layers or head the
    store lacks, e.g. the CLIP scores on a classifier's store.

    ``progress(description, total)`` returns ``advance(n)``: it is asked once for the
    methods overall and once for every streamed pass over a split (rows).
    """
    hparams = hparams or {}
    progress = progress or no_progress
    if save_as is not None:
        if len(methods) != 1:
            raise UsageError("--as names the scores of one method; give a single METHOD")
        check_name(save_as, "--as")
        if "/" in save_as:
            raise UsageError(f"--as '{save_as}' is not a usable name: it holds '/'; name the scores in one part")
    for name, what in ((id_split, "--id"), (train_split, "--train"), *((o, "--ood") for o in ood or [])):
        if name is not None:
            check_name(name, what)
    id_split = id_split or default_id_split(store)
    if ood and id_split in ood:
        raise UsageError(f"--ood '{id_split}' is the ID split (--id); name OOD splits, e.g. {', '.join(ood_splits(store)) or 'ood/far/...'}")
    splits = list(dict.fromkeys([id_split] + (ood if ood else ood_splits(store))))
    if len(splits) == 1:
        raise OodError(f"store {store.path} has no OOD split to score; extract one (e.g. ood/far/...) first")
    check_splits_exist(store, splits)
    backbone = backbone or default_backbone(store, id_split)
    scorers: list[Scorer] = [get_scorer(m, **hparams.get(m, {})) for m in methods]
    if only_applicable:  # if none applies, keep them all so the checks below say what is missing
        scorers = [s for s in scorers if _applicable(store, backbone, splits, train_split, s)] or scorers
    fitted = [s for s in scorers if s.needs_fit]
    for s in scorers:
        for split in splits:
            check_features(store, backbone, split, s.layers)
    for s in fitted:
        check_features(store, backbone, train_split, s.layers)
        check_train_split(store, backbone, train_split, s.layers, s.min_train_classes)
    check_same_model(store, backbone, splits + ([train_split] if fitted else []))
    model_id = store.node_attrs(features_node(id_split, backbone)).get("model_id")
    if any(s.uses_head for s in scorers):
        load_head(store, backbone, model_id)  # fail before any work if it is missing

    advance_methods = progress("methods", len(scorers))
    results: list[ScoreResult] = []
    pending: list[tuple[str, str, np.ndarray, dict]] = []
    to_save: list[Scorer] = []  # scorers that fitted afresh
    for scorer in scorers:
        scorer.progress = progress
        t0 = time.perf_counter()
        status = scorer.prepare(store, backbone, train_split, model_id)
        fit_seconds = time.perf_counter() - t0
        if status == "fitted":
            to_save.append(scorer)
        attrs = {"method": scorer.name, "backbone": backbone, "model_id": model_id, "hparams": scorer.hparams()}
        out_name = save_as or scorer.name
        if scorer.needs_fit:
            attrs |= {"train_split": train_split, "fitted": f"fitted/{scorer.name}"}
        for split in splits:
            t0 = time.perf_counter()
            values = scorer.score(store, backbone, split)
            if not np.isfinite(values).all():
                raise OodError(f"method '{scorer.name}' gave NaN/inf scores on split '{split}'")
            seconds = time.perf_counter() - t0
            pending.append((out_name, split, values, attrs))
            results.append(
                ScoreResult(out_name, split, len(values), float(values.mean()), seconds, status, fit_seconds)
            )
        scorer.release()
        advance_methods(1)
    with store.transaction() as txn:  # every method's scores and fitted state land together, or none
        for scorer in to_save:
            scorer.save(store, txn)
        for method, split, values, attrs in pending:
            store.write_array(txn.stage(f"scores/{method}/{split}"), values.astype(np.float32), **attrs)
    return results


def scored_methods(store: Store) -> list[str]:
    return store.children("scores")


def read_scores(store: Store, method: str, split: str) -> np.ndarray:
    node = f"scores/{method}/{split}"
    if not store.is_array(node) or not store.node_attrs(node).get("complete"):
        raise OodError(f"no scores for method '{method}' on split '{split}'; run 'oodcli score {method}' first")
    return store.read(node)
