"""Score splits of a store with one or more methods and write ``scores/<method>/<split>``.

Forgiving: every method stands on its own. What concerns all methods alike (the store,
the splits to score, unknown methods, bad parameters) is checked first and fails the
whole run; then each method is planned (which backbone, are its layers, head, train
split and prerequisites there), fitted or loaded, scored on every split and written in
a transaction of its own (its scores on every split and its fitted state land whole or
not at all). A method that cannot run is *skipped* with a one-line reason and the others
go on; its old scores stay as they were. A bad parameter value that only shows against
the data (``knn.k`` above the train rows) still stops the run (exit 2), and so does
Ctrl-C: methods already written stay, the one in progress is not written.

A method whose fitted state under ``fitted/<method>`` matches its hyperparameters and
train features loads it instead of fitting (reported as cached).

Without ``--backbone`` each method gets the backbone that has what it needs: the only
one in the store, else one named after the method (``apex`` scores on the ``apex``
backbone), else the only one whose layers (and head) cover the ID, OOD and train
splits. Several such backbones make the choice ambiguous: that method is skipped and
asks for ``--backbone``. A backbone that lacks a split is told apart from one that
cannot serve the method: the reason then names the exact ``oodcli extract`` command.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from oodcli.data.base import CSID_ROLE, role_from_name
from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import (
    OLDER_LAYERS,
    Progress,
    Scorer,
    no_progress,
    check_features,
    check_train_split,
    get_scorer,
    load_head,
    is_scorer,
    scorer_names,
    scorer_params,
    split_members,
    unknown_method,
    train_fingerprint,
)
from oodcli.store import (
    Store,
    check_name,
    features_node,
    list_backbones,
    list_splits,
    require_whole_splits,
    split_node,
    split_role,
    split_states,
)

WRITTEN, SKIPPED = "written", "skipped"


@dataclass
class ScoreResult:
    """One row of the summary: a written method on one split, or (``split`` None) a skipped method."""

    method: str
    split: str | None
    rows: int
    mean: float | None
    seconds: float
    fit: str = "-"  # "fitted", "cached" (state loaded from fitted/), or "-" (nothing to learn)
    fit_seconds: float = 0.0
    backbone: str | None = None
    status: str = WRITTEN  # "written" or "skipped"
    reason: str | None = None  # why a method was skipped (one line)
    picked: str | None = None  # why this backbone, when the run picked it (no --backbone, several in the store)
    notes: list[str] = field(default_factory=list)  # what else happened (e.g. GROOD gradients made)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodOutcome:
    """What became of one method: written (its scores on every split + fitted state) or skipped."""

    method: str  # the name its scores go under (the method, or --as NAME)
    status: str
    backbone: str | None = None
    reason: str | None = None
    fit: str = "-"
    fit_seconds: float = 0.0
    splits: list[ScoreResult] = field(default_factory=list)
    picked: str | None = None
    notes: list[str] = field(default_factory=list)
    error: OodError | None = field(default=None, repr=False)  # the error behind ``reason`` (its exit code)

    def rows(self) -> list[ScoreResult]:
        """Summary rows: one per scored split, or one saying why the method was skipped."""
        if self.status == WRITTEN:
            return self.splits
        return [ScoreResult(self.method, None, 0, None, 0.0, self.fit, self.fit_seconds, self.backbone, SKIPPED,
                            self.reason, self.picked, list(self.notes))]


def parse_methods(text: str) -> list[str]:
    if text.strip() == "all":
        return scorer_names(plugins=True)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("no method given; name one or more, e.g. 'msp,energy', or 'all'")
    for m in methods:
        if not is_scorer(m):
            raise unknown_method(m, ", or 'all'")
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


VAL_ROLE = "ood-val"  # OOD data held out for choosing hyperparameters (sweep): never a test OOD set
ID_VAL_SPLIT = "val"  # the ID validation split's name in every benchmark (OpenOOD's val lists)


def is_test_ood(role: str) -> bool:
    """An OOD split that score and report evaluate on (not the ``ood-val`` validation data)."""
    return role.startswith("ood") and role != VAL_ROLE


def default_id_split(store: Store) -> str:
    splits = require_whole_splits(store)
    if "test" in splits:
        return "test"
    ids = [s for s in splits if split_role(store, s) == "id" and s not in ("train", ID_VAL_SPLIT)]
    if not ids:
        raise OodError(f"store {store.path} has no ID test split; extract one or pass --id SPLIT")
    return ids[0]


def ood_splits(store: Store) -> list[str]:
    """Every test OOD split (validation OOD splits left out); refused while the store holds
    a half-made split, which might be one."""
    return [s for s in require_whole_splits(store) if is_test_ood(split_role(store, s))]


def csid_splits(store: Store) -> list[str]:
    """Every covariate-shifted ID split (role ``csid``): scored beside the OOD sets, counted as ID
    by ``report --fsood``."""
    return [s for s in require_whole_splits(store) if split_role(store, s) == CSID_ROLE]


def val_ood_splits(store: Store) -> list[str]:
    """Every OOD validation split (role ``ood-val``)."""
    return [s for s in require_whole_splits(store) if split_role(store, s) == VAL_ROLE]


def check_splits_exist(store: Store, splits: list[str]) -> None:
    """Each named split is whole and has rows, or a one-line error saying what to do."""
    known, half = split_states(store)
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
            a = store.node_attrs(features_node(splits[0], backbone)).get("parts", {})
            b = store.node_attrs(features_node(s, backbone)).get("parts", {})
            diff = [k for k in ("weights", "preprocess") if a.get(k) != b.get(k)]
            raise OodError(
                f"splits '{splits[0]}' and '{s}' were extracted with different '{backbone}' "
                f"{' and '.join(diff) or 'models'}; re-extract one of them with the same model"
            )


def store_backbones(store: Store) -> list[str]:
    """Every backbone with features on some whole split of the store."""
    return sorted({b for s in list_splits(store) for b in list_backbones(store, s)})


# ---- what a backbone lacks, as the command that makes it ---------------------------------


def _reference_features(store: Store, backbone: str, prefer: list[str]) -> dict:
    """The attributes of a whole features node of ``backbone`` (``prefer`` first): how it was extracted."""
    for split in dict.fromkeys([*prefer, *list_splits(store)]):
        node = features_node(split, backbone)
        if store.exists(node) and not store.is_array(node) and store.node_attrs(node).get("complete"):
            return store.node_attrs(node)
    return {}


def extract_command(store: Store, backbone: str, split: str, layers: tuple[str, ...] = (),
                    prefer: list[str] | None = None) -> str:
    """The ``oodcli extract`` command that gives ``split`` the ``backbone`` features its other
    splits have: same weights (the ``weights_source`` the store recorded), layers and dtype,
    over the data source the split recorded."""
    from oodcli.backbones.base import all_specs

    ref = _reference_features(store, backbone, prefer or ["train"])
    named = ref.get("model_source") or {}  # SOURCE:NAME or extract --as: the model as extract named it
    model = named.get("model", backbone)
    spec = all_specs().get(model)
    cmd = ["oodcli", "extract", "--model", model]
    if named.get("head"):
        cmd += ["--head", named["head"]]
    for tap in named.get("layers") or ():
        cmd += ["--layer", tap]
    if named.get("strict") is False:
        cmd += ["--strict", "false"]
    if named.get("name"):
        cmd += ["--as", named["name"]]
    weights = ref.get("weights_source")
    if weights:
        cmd += ["--weights", str(weights)]
    elif spec is not None and spec.needs_weights_file:
        cmd += ["--weights", "CHECKPOINT"]
    attrs = store.node_attrs(split_node(split)) if store.exists(split_node(split)) else {}
    source = attrs.get("source")
    benchmark = store.attrs.get("benchmark")
    in_benchmark = False
    if benchmark and source:
        try:
            from oodcli.data.benchmarks import get_benchmark

            in_benchmark = get_benchmark(benchmark).split(split).source == source
        except OodError:
            pass
    if in_benchmark:
        cmd += ["--benchmark", benchmark, "--split", split]
    else:
        cmd += ["--data", source or "SOURCE", "--split", split]
        role = attrs.get("role")
        if role and role != role_from_name(split):
            cmd += ["--role", role]
    base = list(ref.get("layers") or (spec.default_layers if spec is not None else []))
    want = list(dict.fromkeys([*base, *layers]))
    if want and (spec is None or sorted(want) != sorted(spec.default_layers)):
        cmd += ["--layers", ",".join(want)]
    parts = ref.get("parts") or {}
    if parts.get("dtype") == "float32":
        cmd += ["--dtype", "float32"]
    if parts.get("featmap_pool") is not None:
        cmd += ["--featmap-pool", str(parts["featmap_pool"])]
    for settings in (parts.get("perturb") or {}).values():  # the same perturbations (oodcli.perturb)
        keys = [k for k in settings if k not in ("method", "train_fingerprint")]
        cmd += ["--perturb", f"{settings['method']}:" + ",".join(f"{k}={settings[k]}" for k in sorted(keys))]
    cmd += ["--store", str(store.path)]
    return " ".join(shlex.quote(c) for c in cmd)


def rescore_command(store: Store, name: str, identity: dict, id_split: str, ood=()) -> str:
    """The ``oodcli score`` command that gives ``name`` (a method, or its ``--as`` alias) scores on
    ``id_split`` (and the ``ood`` splits) with the settings of its existing scores: the same method,
    backbone and changed hyperparameters (``identity``: the method, backbone and hparams they recorded)."""
    method = identity["method"]
    cmd = ["oodcli", "score", method, "--store", str(store.path), "--id", id_split]
    cmd += [arg for split in ood for arg in ("--ood", split)]
    if identity.get("backbone"):
        cmd += ["--backbone", identity["backbone"]]
    if name != method:
        cmd += ["--as", name]
    defaults = scorer_params(method) if is_scorer(method) else {}
    for key, value in (identity.get("hparams") or {}).items():
        if key in defaults and defaults[key] != value:
            text = json.dumps(value) if isinstance(value, (list, dict)) else value
            cmd += ["-p", f"{method}.{key}={text}"]
    return " ".join(shlex.quote(str(c)) for c in cmd)


# ---- which backbone serves a method --------------------------------------------------------


class _Ambiguous(UsageError):
    """Several backbones serve a method: it is skipped (or, named alone, a usage error)."""


def _needs(scorer: Scorer) -> str:
    return ", ".join(scorer.layers) + (" and a classifier head" if scorer.uses_head else "") + \
        (" (on the train split too)" if scorer.needs_fit else "")


def _applies(store: Store, scorer: Scorer, backbone: str, id_split: str, train_split: str) -> bool:
    """Whether ``backbone`` can serve the scorer at all: its layers on the ID split (and the
    train split if it fits), the head if it reads one, and the scorer's own prerequisites
    (GROOD's synthesize, APEX's prototypes). Missing OOD splits do not count here: they are a
    reason to skip, with the command that makes them, not a reason to leave the method out."""
    needed = [id_split] + ([train_split] if scorer.needs_fit else [])

    def has(split: str, layer: str) -> bool:  # an older layer counts: the method is planned, skipped with how to remake it
        node = features_node(split, backbone)
        return any(store.is_array(f"{node}/{name}") for name in (layer, OLDER_LAYERS.get(layer)) if name)

    if not all(has(s, layer) for s in needed for layer in scorer.layers):
        return False
    if scorer.uses_head and not store.is_array(f"backbones/{backbone}/head/weight"):
        return False
    try:
        return bool(scorer.applicable(store, backbone, train_split))
    except OodError:
        return False


def _check_on(store: Store, scorer: Scorer, backbone: str, splits: list[str], train_split: str,
              memo: dict) -> str | None:
    """Everything the scorer needs from ``backbone``, checked without computing anything;
    returns the model id of its features, or raises the one-line reason."""
    if scorer.multi_backbone:
        return _check_members(store, scorer, backbone, splits, train_split, memo)
    return _check_one(store, scorer, backbone, splits, train_split, memo)


def _check_one(store: Store, scorer: Scorer, backbone: str, splits: list[str], train_split: str,
               memo: dict) -> str | None:
    """``_check_on`` for one backbone."""
    needed = list(dict.fromkeys(splits + ([train_split] if scorer.needs_fit else [])))
    for split in needed:
        node = features_node(split, backbone)
        if store.exists(split_node(split)) and not store.exists(node):
            raise OodError(f"split '{split}' has no '{backbone}' features; make them with: "
                           f"{extract_command(store, backbone, split, scorer.layers, [train_split, splits[0]])}")
        check_features(store, backbone, split, scorer.layers, scorer.name)
    if scorer.needs_fit:
        key = ("train", backbone, train_split, scorer.layers[0], scorer.min_train_classes)
        if key not in memo:
            try:
                check_train_split(store, backbone, train_split, scorer.layers, scorer.min_train_classes)
                memo[key] = None
            except OodError as exc:
                memo[key] = exc
        if memo[key] is not None:
            raise memo[key]
    check_same_model(store, backbone, needed)
    model_id = store.node_attrs(features_node(splits[0], backbone)).get("model_id")
    if scorer.uses_head:
        load_head(store, backbone, model_id)
    scorer.check_inputs(store, backbone, train_split, model_id)  # e.g. GROOD: prototypes, train gradients, index
    return model_id


def _members_needed(scorer: Scorer, backbones: list[str], named: list[str] = ()) -> OodError:
    """A multi-backbone method given fewer than two members (``named``), with what the store holds."""
    others = [b for b in backbones if b not in named]
    if len({*backbones, *named}) <= 1:
        hint = (f" (the store holds only '{(list(named) or backbones)[0]}': extract another model's features "
                "beside it, or another checkpoint's with extract --as NAME)")
    else:
        hint = f" (the store {'also ' if named else ''}holds {', '.join(others)})"
    return OodError(f"'{scorer.name}' combines several backbones; name two or more with --backbone A,B{hint}")


def _check_members(store: Store, scorer: Scorer, backbone: str, splits: list[str], train_split: str,
                   memo: dict) -> str:
    """A multi-backbone method's members (``--backbone a,b,c``), each checked as one backbone is,
    their layers of one shape on every split; returns the members' model ids joined by commas."""
    members = split_members(backbone)
    if len(members) < 2:
        raise _members_needed(scorer, store_backbones(store), members)
    ids = [_check_one(store, scorer, member, splits, train_split, memo) for member in members]
    for split in splits:
        for layer in scorer.layers:
            shapes = {m: store.shape(f"{features_node(split, m)}/{layer}")[1:] for m in members}
            if len(set(shapes.values())) > 1:
                raise OodError(f"the members' {layer} on '{split}' differ in shape ("
                               + ", ".join(f"{m}: {'x'.join(map(str, v))}" for m, v in shapes.items())
                               + f"); '{scorer.name}' combines models of the same classes")
    return ",".join(str(i) for i in ids)


def check_backbone_option(store: Store, backbone: str | None, backbones: list[str], scorers: list[Scorer]) -> None:
    """``--backbone`` names one backbone of the store, or, for methods that combine several
    (``multi_backbone``), a comma-separated list of them; else one line saying what to do."""
    if backbone is None or backbone in backbones:
        return
    members = split_members(backbone)
    if len(members) > 1:
        single = [s.name for s in scorers if not s.multi_backbone]
        if single:
            raise UsageError(f"--backbone {backbone} names several backbones, which only a method that combines "
                             f"them takes (ensemble); score {', '.join(single[:3])}"
                             f"{f' and {len(single) - 3} more' if len(single) > 3 else ''} with one backbone")
        if len(set(members)) < len(members):
            raise UsageError(f"--backbone {backbone} names a backbone twice")
        missing = [m for m in members if m not in backbones]
        if not missing:
            return
        backbone = missing[0]
    raise OodError(f"store {store.path} has no '{backbone}' features on any split; its backbones: "
                   f"{', '.join(backbones)}")


def _not_served(scorer: Scorer, backbone: str) -> OodError:
    doc = (type(scorer).applicable.__doc__ or "").strip().splitlines()
    why = f" ({doc[0].rstrip('.')})" if doc and type(scorer).applicable is not Scorer.applicable else ""
    return OodError(f"backbone '{backbone}' does not serve '{scorer.name}'{why}")


def _pick_backbone(store: Store, scorer: Scorer, backbones: list[str], explicit: str | None, splits: list[str],
                   train_split: str, memo: dict) -> tuple[str | None, str | None, str | None, OodError | None]:
    """(backbone, model id, why it was picked, error). A usage error other than an
    ambiguous choice is raised: it fails the whole run."""
    def check(b: str):
        try:
            return b, _check_on(store, scorer, b, splits, train_split, memo), None
        except UsageError:
            raise
        except OodError as exc:
            return b, None, exc

    if scorer.multi_backbone and explicit is None:  # it takes only the members named
        return None, None, None, _members_needed(scorer, backbones)
    if explicit is not None or len(backbones) == 1:
        b, mid, err = check(explicit or backbones[0])
        return b, mid, None, err
    if scorer.name in backbones:
        b, mid, err = check(scorer.name)
        return b, mid, "named after the method", err
    ok, errors = {}, {}
    for b in backbones:
        _, mid, err = check(b)
        if err is None and not _applies(store, scorer, b, splits[0], train_split):
            err = _not_served(scorer, b)
        if err is None:
            ok[b] = mid
        else:
            errors[b] = err
    if len(ok) == 1:
        [(b, mid)] = ok.items()
        return b, mid, "the only backbone with what it needs", None
    if ok:
        return None, None, None, _Ambiguous(
            f"several backbones have what '{scorer.name}' needs ({', '.join(ok)}); pick one with --backbone")
    serving = [b for b in backbones if _applies(store, scorer, b, splits[0], train_split)]
    if len(serving) == 1:  # the method's backbone, short of something: say what, and how to make it
        return serving[0], None, None, errors[serving[0]]
    if serving:
        return None, None, None, OodError(
            f"no backbone has everything '{scorer.name}' needs: " + "; ".join(f"{b}: {errors[b]}" for b in serving))
    return None, None, None, OodError(
        f"no backbone in store {store.path} serves '{scorer.name}' (it needs {_needs(scorer)}): "
        + "; ".join(f"{b}: {errors[b]}" for b in backbones))


@dataclass
class _Plan:
    scorer: Scorer
    out_name: str
    backbone: str
    model_id: str | None
    picked: str | None
    sweep: str | None = None  # the sweep record its hyperparameters come from (--from-sweep)


# ---- the sweep a method is scored with (--from-sweep; 'oodcli sweep' writes it, oodcli.sweeping) -------

SWEEPS = "fitted/sweeps"


def sweep_node(method: str) -> str:
    return f"{SWEEPS}/{method}"


def load_sweep(store: Store, method: str) -> dict:
    """The recorded sweep of ``method``, or a one-line error saying how to make one."""
    node = sweep_node(method)
    if not store.exists(node) or not store.node_attrs(node).get("complete"):
        raise OodError(f"store {store.path} has no sweep of '{method}'; run 'oodcli sweep {method} "
                       f"--store {store.path}' first")
    return store.node_attrs(node)


def check_sweep_matches(store: Store, record: dict, backbone: str, model_id: str | None, train_split: str,
                        layers: tuple[str, ...]) -> None:
    """Refuse a sweep made on other features than the ones about to be scored."""
    method = record["method"]
    again = f"run 'oodcli sweep {method} --store {store.path}' again"
    if record.get("backbone") != backbone:
        raise OodError(f"the sweep of '{method}' was made on backbone '{record.get('backbone')}', not '{backbone}'; "
                       f"{again} (or pass --backbone {record.get('backbone')})")
    if record.get("model_id") != model_id:
        raise OodError(f"the sweep of '{method}' was made on other '{backbone}' features (another checkpoint or "
                       f"preprocessing); {again}")
    if record.get("train_split") != train_split or \
            record.get("train_fingerprint") != train_fingerprint(store, backbone, train_split, layers):
        raise OodError(f"the sweep of '{method}' was fitted on other train features than '{train_split}' holds now; "
                       f"{again}")


# ---- the run -----------------------------------------------------------------------------------


def score_methods(
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
    log: Callable[[str], None] | None = None,
    on_outcome: Callable[[MethodOutcome], None] | None = None,
    from_sweep: bool = False,
) -> list[MethodOutcome]:
    """Score each method on its own; returns one outcome per method, written or skipped.

    Raised (the whole run fails, nothing written): a missing store or split, a half-made
    or empty split, an unknown method or parameter, --as with several methods, --backbone
    naming no backbone of the store; with ``only_applicable`` and no method that applies,
    the first method's reason. Raised later: a ``UsageError`` a method meets against the
    data (e.g. ``knn.k`` above the train rows: methods given ``hparams`` run first, so that
    this comes before other methods are written) and ``KeyboardInterrupt``; methods written
    before stay. Outcomes come in the order of ``methods``.

    ``save_as`` writes a single method's scores under another name (``scores/<save_as>/``),
    so that ablations and the same method on several backbones sit side by side in a report.

    ``only_applicable`` (what 'all' asks for) leaves out the methods no backbone of the store
    serves (layers on the ID/train splits, head, prerequisites), e.g. the CLIP scores on a
    classifier's store; those that apply but cannot run are skipped with their reason.

    ``progress(description, total)`` returns ``advance(n)``: it is asked once for the
    methods overall and once for every streamed pass over a split (rows). ``log`` gets
    one-line notes (a backbone picked, gradients made); ``on_outcome`` each outcome as
    soon as it is known.

    ``from_sweep`` scores each method with the setting its sweep chose (``fitted/sweeps/<method>``,
    see ``oodcli.sweeping``), on the sweep's backbone unless ``backbone`` is given. A named method
    without a sweep fails the run; with ``only_applicable`` ('all') it keeps its defaults. A
    sweep made on other features (backbone, model, train split) skips its method with the reason.
    """
    hparams = hparams or {}
    progress = progress or no_progress
    log = log or (lambda message: None)
    if save_as is not None:
        if len(methods) != 1:
            raise UsageError("--as names the scores of one method; give a single METHOD")
        check_name(save_as, "--as")
        if "/" in save_as:
            raise UsageError(f"--as '{save_as}' is not a usable name: it holds '/'; name the scores in one part")
    for name, what in ((id_split, "--id"), (train_split, "--train"), *((o, "--ood") for o in ood or [])):
        if name is not None:
            check_name(name, what)
    sweeps: dict[str, dict] = {}
    if from_sweep:
        for m in methods:
            if hparams.get(m):
                raise UsageError(f"--from-sweep and -p both set the parameters of '{m}'; give one of them")
            try:
                sweeps[m] = load_sweep(store, m)
            except OodError:
                if not only_applicable:
                    raise
        if only_applicable and len(sweeps) < len(methods):
            log(f"--from-sweep: swept {', '.join(sweeps) or 'none'}; the other methods run with their defaults")
    scorers: list[Scorer] = [get_scorer(m, **(sweeps[m]["best_hparams"] if m in sweeps else hparams.get(m, {})))
                             for m in methods]  # bad -p: before any work
    id_split = id_split or default_id_split(store)
    if ood and id_split in ood:
        raise UsageError(f"--ood '{id_split}' is the ID split (--id); name OOD splits, "
                         f"e.g. {', '.join(ood_splits(store)) or 'ood/far/...'}")
    splits = list(dict.fromkeys([id_split] + (ood if ood else ood_splits(store) + csid_splits(store))))
    if len(splits) == 1:
        raise OodError(f"store {store.path} has no OOD split to score; extract one (e.g. ood/far/...) first")
    check_splits_exist(store, splits)
    backbones = store_backbones(store)
    if not backbones:
        raise OodError(f"store {store.path} has no extracted features; run 'oodcli extract' first")
    check_backbone_option(store, backbone, backbones, scorers)
    none_applies = False
    if only_applicable:
        candidates = [backbone] if backbone else backbones
        kept = [s for s in scorers if any(_applies(store, s, b, id_split, train_split) for b in candidates)]
        if kept:
            scorers = kept
        else:  # none applies: plan them all, and the first one's reason fails the run
            none_applies = True

    memo: dict = {}
    outcomes: list[MethodOutcome | None] = []
    plans: list[tuple[int, _Plan]] = []
    picked: dict[tuple[str, str], list[str]] = {}
    for scorer in scorers:
        out_name = save_as or scorer.name
        record = sweeps.get(scorer.name)
        explicit = backbone or (record["backbone"] if record and record.get("backbone") in backbones else None)
        chosen, model_id, why, error = _pick_backbone(store, scorer, backbones, explicit, splits, train_split, memo)
        if error is None and record is not None:
            try:
                check_sweep_matches(store, record, chosen, model_id, train_split, scorer.layers)
            except OodError as exc:
                error = exc
        if error is not None:
            if none_applies:
                raise error
            outcome = MethodOutcome(out_name, SKIPPED, chosen, str(error), picked=why, error=error)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
            continue
        if why is not None:
            picked.setdefault((chosen, why), []).append(out_name)
        plans.append((len(outcomes), _Plan(scorer, out_name, chosen, model_id, why,
                                           sweep_node(scorer.name) if record else None)))
        outcomes.append(None)
    for (chosen, why), names in picked.items():
        others = [b for b in backbones if b != chosen]
        log(f"using backbone '{chosen}' for {', '.join(names)} ({why}; the store also holds "
            f"{', '.join(others)}; --backbone picks one)")

    # methods given -p values run first: a value that only fails against the data (knn.k above
    # the train rows) then stops the run before any other method is written
    plans.sort(key=lambda item: not hparams.get(item[1].scorer.name))
    advance_methods = progress("methods", len(plans)) if plans else (lambda n: None)
    for i, plan in plans:
        outcome = _run_one(store, plan, splits, train_split, progress, log)
        outcomes[i] = outcome
        if on_outcome:
            on_outcome(outcome)
        advance_methods(1)
    return [o for o in outcomes if o is not None]


def _run_one(store: Store, plan: _Plan, splits: list[str], train_split: str, progress: Progress,
             log: Callable[[str], None]) -> MethodOutcome:
    """Fit or load, score every split, then write scores + fitted state in one transaction.
    A user-fixable failure (``OodError``) skips the method; a ``UsageError`` and Ctrl-C stop the run."""
    scorer, backbone, model_id = plan.scorer, plan.backbone, plan.model_id
    notes: list[str] = []
    status, fit_seconds = "-", 0.0
    try:
        scorer.progress = progress
        t0 = time.perf_counter()
        status = scorer.prepare(store, backbone, train_split, model_id)
        fit_seconds = time.perf_counter() - t0
        for note in scorer.complete_inputs(store, backbone, splits):  # e.g. GROOD gradients of a new split
            log(f"{plan.out_name}: {note}")
            notes.append(note)
        attrs = {"method": scorer.name, "backbone": backbone, "model_id": model_id, "hparams": scorer.hparams(),
                 "splits": list(splits)}  # scored together: store verify notices one of them gone
        if scorer.multi_backbone:
            attrs["members"] = split_members(backbone)
        if scorer.needs_fit:
            attrs |= {"train_split": train_split, "fitted": f"fitted/{scorer.name}"}
        if plan.sweep:
            attrs["sweep"] = plan.sweep
        scored: list[tuple[str, np.ndarray, float]] = []
        for split in splits:
            t0 = time.perf_counter()
            values = scorer.score(store, backbone, split)
            if not np.isfinite(values).all():
                raise OodError(f"method '{scorer.name}' gave NaN/inf scores on split '{split}'")
            scored.append((split, values, time.perf_counter() - t0))
        constant = [split for split, values, _ in scored if len(values) and float(np.ptp(values.astype(np.float32))) == 0.0]
        if constant:  # written (they are what the method computes), but no metric may pass them off as chance
            note = (f"scores are constant on {', '.join(constant)}: the method cannot rank those rows "
                    "(the report shows 'const' and averages nothing over them)")
            log(f"{plan.out_name}: {note}")
            notes.append(note)
        with store.transaction() as txn:  # this method's scores and fitted state land together, or not at all
            if status == "fitted":
                scorer.save(store, txn)
            for split, values, _ in scored:
                store.write_array(txn.stage(f"scores/{plan.out_name}/{split}"), values.astype(np.float32), **attrs)
    except UsageError:
        raise
    except OodError as exc:
        return MethodOutcome(plan.out_name, SKIPPED, backbone, str(exc), status, fit_seconds, picked=plan.picked,
                             notes=notes, error=exc)
    finally:
        scorer.release()
    rows = [ScoreResult(plan.out_name, split, len(values), float(values.mean()), seconds, status, fit_seconds,
                        backbone, WRITTEN, None, plan.picked, notes) for split, values, seconds in scored]
    return MethodOutcome(plan.out_name, WRITTEN, backbone, None, status, fit_seconds, rows, plan.picked, notes)


def failure_line(failed: list[MethodOutcome]) -> str:
    """One line naming every skipped method and why."""
    if len(failed) == 1:
        return f"method '{failed[0].method}' not written: {failed[0].reason}"
    return f"{len(failed)} methods not written: " + "; ".join(f"{o.method} ({o.reason})" for o in failed)


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
    log: Callable[[str], None] | None = None,
    from_sweep: bool = False,
) -> list[ScoreResult]:
    """``score_methods``, strict about the methods named: their scores on every split (one
    row each), after writing every method that could run; then, if a named method was
    skipped, its error (one method) or one error naming them all. With ``only_applicable``
    ('all') skipped methods are no error unless none was written."""
    outcomes = score_methods(store, methods, backbone=backbone, id_split=id_split, ood=ood, train_split=train_split,
                             hparams=hparams, progress=progress, only_applicable=only_applicable, save_as=save_as,
                             log=log, from_sweep=from_sweep)
    failed = [o for o in outcomes if o.status == SKIPPED]
    written = [o for o in outcomes if o.status == WRITTEN]
    if failed and (not only_applicable or not written):
        if len(outcomes) == 1:
            raise failed[0].error
        raise OodError(failure_line(failed))
    return [r for o in written for r in o.splits]


def scored_methods(store: Store) -> list[str]:
    return store.children("scores")


def read_scores(store: Store, method: str, split: str) -> np.ndarray:
    node = f"scores/{method}/{split}"
    if not store.is_array(node) or not store.node_attrs(node).get("complete"):
        raise OodError(f"no scores for method '{method}' on split '{split}'; run 'oodcli score {method}' first")
    return store.read(node)
