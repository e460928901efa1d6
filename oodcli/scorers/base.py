"""The scorer contract: a class registered by name, fitted on the ID train split,
scoring any split chunk by chunk. Higher score = more in-distribution.

Hyperparameters are keyword arguments with the papers' defaults; the CLI exposes
them as ``--param method.name=value`` and ``oodcli score --list`` prints them.

What a scorer learns (``fit``) is a small dict of numpy arrays and numbers. It is
kept under ``fitted/<method>/`` with the hyperparameters, the backbone, the model id
and the train split's fingerprint, so the next run with the same inputs loads it
instead of fitting again (a cache hit) and any change of those inputs refits.
"""

from __future__ import annotations

import inspect
import re
import json
from typing import Callable, ClassVar, Iterator

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError, UsageError
from oodcli.store import Store, features_node, split_node

_REGISTRY: dict[str, type["Scorer"]] = {}

#: ``progress(description, total_rows)`` returns ``advance(rows)``; used for every pass over a split
Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda rows: None


def register(cls: type["Scorer"]) -> type["Scorer"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def scorer_names(plugins: bool = False) -> list[str]:
    """Every registered method; ``plugins`` loads the plugins' scorers first (listings, 'all')."""
    from oodcli import scorers  # noqa: F401  (imports every family module)

    if plugins:
        from oodcli.plugins import load_plugins

        load_plugins()
    return sorted(_REGISTRY)


def is_scorer(name: str) -> bool:
    """Whether a method of that name exists; a name no built-in has loads the plugins first."""
    return name in scorer_names() or name in scorer_names(plugins=True)


def unknown_method(name: str, also: str = "") -> UsageError:
    """The one-line error for a method nobody registered, naming the failed plugins' reasons."""
    from oodcli.plugins import failure_note

    return UsageError(f"unknown method '{name}'; choose from: {', '.join(scorer_names())}{also}{failure_note()}")


def _init_params(name: str) -> dict[str, inspect.Parameter]:
    """The hyperparameters: named keyword arguments (a scorer without its own ``__init__``, as a
    plugin may write it, has object's ``*args, **kwargs``, which are none)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {k: p for k, p in inspect.signature(_REGISTRY[name].__init__).parameters.items()
            if k != "self" and p.kind not in variadic}


def scorer_params(name: str) -> dict:
    """A scorer's keyword arguments and their defaults (what ``--param`` accepts)."""
    return {k: p.default for k, p in _init_params(name).items()}


def describe_scorers() -> list[dict]:
    """Name, family module, one-line summary, parameters and origin (built-in or plugin) of every
    scorer (``score --list``)."""
    from oodcli.plugins import origin

    rows = []
    for name in scorer_names(plugins=True):
        cls = _REGISTRY[name]
        rows.append({
            "method": name,
            "family": cls.__module__.rsplit(".", 1)[-1],
            "summary": (cls.__doc__ or "").strip().splitlines()[0],
            "needs": ", ".join(cls.layers) + (", head" if cls.uses_head else "") + (", train" if cls.needs_fit else ""),
            "params": scorer_params(name),
            "origin": origin("scorer", name),
        })
    return rows


def param_value(text: str):
    """A hyperparameter value as typed on the command line (``-p knn.k=50``, ``--grid 'k=1,10'``):
    an int or a float where it parses as one, true/false/none, else the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def check_param(method: str, key: str, value, default, annotation: str = ""):
    """A hyperparameter value of the type its default has, or one ``UsageError``: an int
    parameter takes no 1.5, a float no ``true``, a flag no number, a temperature no value
    <= 0, no float NaN or inf. A parameter defaulting to None is checked by its annotation
    (``int | None``: an integer or none)."""
    import math

    shown = default
    if default is None:
        if value is None:
            return None
        kinds = set(re.findall(r"\w+", annotation))  # e.g. "int | None", "Optional[float]"
        kind = next((k for k in ("bool", "float", "int") if k in kinds), None)  # int | float: a number
        if kind is None:
            return value
        default = {"bool": False, "float": 0.0, "int": 0}[kind]

    def bad(what: str) -> UsageError:
        return UsageError(f"--param {method}.{key}={value!r}: {what} (default {shown!r})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("expects true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise bad("expects an integer")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("expects a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("expects a finite number")
    elif isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. a file named 100
    if "temperature" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise bad("a temperature must be > 0")
    return value


def get_scorer(name: str, **hparams) -> "Scorer":
    if not is_scorer(name):
        raise unknown_method(name)
    params = _init_params(name)
    unknown = set(hparams) - set(params)
    if unknown:
        raise UsageError(
            f"method '{name}' has no parameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(params)) or 'none'}"
        )
    hparams = {k: check_param(name, k, v, params[k].default, str(params[k].annotation)) for k, v in hparams.items()}
    try:
        return _REGISTRY[name](**hparams)
    except (TypeError, ValueError) as exc:  # e.g. --param knn.k=abc
        raise UsageError(f"bad parameter for method '{name}': {exc}") from None


class Scorer:
    """Base class. Subclasses set ``name`` and ``layers`` and implement ``score_batch``;
    those that learn from the train split set ``needs_fit`` and implement ``fit``.

    Lifecycle (driven by ``oodcli.scoring.score_store``): ``prepare`` once (loads the
    head, then the cached state or a fresh ``fit``), ``score`` per split, ``save`` if
    it fitted, ``release`` at the end.
    """

    name: ClassVar[str]
    layers: ClassVar[tuple[str, ...]] = ("logits",)
    needs_fit: ClassVar[bool] = False
    uses_head: ClassVar[bool] = False  # reads backbones/<backbone>/head/{weight,bias}
    min_train_classes: ClassVar[int] = 1  # class-conditional methods need 2
    multi_backbone: ClassVar[bool] = False  # scores several backbones together (--backbone a,b,c; ensemble)

    progress: Progress = staticmethod(no_progress)
    state: dict  # what fit learned: numpy arrays and plain numbers
    weight: np.ndarray  # float64 [C, D], set by prepare when uses_head
    bias: np.ndarray  # float64 [C]

    def hparams(self) -> dict:
        """The keyword arguments this scorer was made with (recorded beside its scores)."""
        return {k: getattr(self, k) for k in scorer_params(self.name)}

    # ---- what subclasses implement ------------------------------------------------
    def fit(self, store: Store, backbone: str, split: str) -> dict:
        """Learn from the ID train split; return the state to keep. Stateless scorers need nothing."""
        return {}

    def ready(self, store: Store, backbone: str, split: str) -> None:
        """Build what scoring needs from ``self.state`` (fresh or cached); e.g. KNN's index."""

    def check_inputs(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> None:
        """Raise ``OodError`` when inputs beyond the layers are missing or stale (GROOD's index,
        a prompt file for another CLIP). Called once per run, before fitting."""

    def complete_inputs(self, store: Store, backbone: str, splits: list[str]) -> list[str]:
        """Settle inputs that depend on the store (the layer ASH shapes, GROOD's gradients of a
        new split) for these splits; return one-line notes. ``score`` and ``sweep`` both call it
        before fitting, so a sweep chooses on the inputs the scores then use."""
        return []

    def applicable(self, store: Store, backbone: str, train_split: str) -> bool:
        """Whether 'score all' runs it, beyond having its layers: GROOD needs 'synthesize' first."""
        return True

    def score_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def score_features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Scores of rows that are not in the store (``oodcli.deploy.Detector``): ``score_batch``,
        unless the method's score reads more than its layers (GROOD's gradients)."""
        return self.score_batch(batch)

    def release(self) -> None:
        """Drop large structures built by ``ready`` once every split is scored."""

    # ---- the lifecycle ------------------------------------------------------------
    def prepare(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> str:
        """Load the head and the fitted state; returns 'fitted', 'cached' or '-' (nothing to fit)."""
        if self.uses_head:
            self.weight, self.bias = load_head(store, backbone, model_id)
        if not self.needs_fit:
            self.state = {}
            return "-"
        key = self._fit_key(store, backbone, train_split, model_id)
        cached = self._load_cached(store, key)
        status = "cached" if cached is not None else "fitted"
        self.state = cached if cached is not None else self.fit(store, backbone, train_split)
        self._key = key
        self.ready(store, backbone, train_split)
        return status

    def save(self, store: Store, txn) -> None:
        """Stage ``self.state`` as ``fitted/<method>/`` in the transaction ``txn`` (it lands
        whole with the scores it produced, or not at all)."""
        node = txn.stage(fitted_node(self.name))
        store.require_group(node)
        scalars = {}
        for key, value in self.state.items():
            if isinstance(value, np.ndarray):
                store.write_array(f"{node}/{key}", value)
            else:
                scalars[key] = value
        store.set_attrs(node, **self._key, scalars=scalars, complete=True)

    def score(self, store: Store, backbone: str, split: str) -> np.ndarray:
        out = [self.score_batch(b) for b in self.blocks(store, backbone, split, f"score {split}")]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def blocks(
        self, store: Store, backbone: str, split: str, what: str, labels: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """One streamed pass over a split's layers, shown as a progress bar."""
        n = store.shape(f"{features_node(split, backbone)}/{self.layers[0]}")[0]
        advance = self.progress(f"{self.name}: {what}", n)
        for block in iter_feature_blocks(store, backbone, split, self.layers, labels=labels):
            yield block
            advance(len(block[self.layers[0]]))

    # ---- the cache of fitted state -----------------------------------------------
    def _fit_key(self, store: Store, backbone: str, split: str, model_id: str | None) -> dict:
        return {
            "method": self.name,
            "hparams": self.hparams(),
            "backbone": backbone,
            "model_id": model_id,
            "train_split": split,
            "train_fingerprint": train_fingerprint(store, backbone, split, self.layers),
            "oodcli_version": __version__,  # another release may fit differently
        }

    def _load_cached(self, store: Store, key: dict) -> dict | None:
        node = fitted_node(self.name)
        if not store.exists(node):
            return None
        attrs = store.node_attrs(node)
        # compare through JSON so tuples/lists and ints/floats read back from attrs match
        same = json.dumps({k: attrs.get(k) for k in key}, sort_keys=True) == json.dumps(key, sort_keys=True)
        if not (attrs.get("complete") and same):
            return None
        state = dict(attrs.get("scalars", {}))
        for name in store.children(node):
            state[name] = store.read(f"{node}/{name}")
        return state


def split_members(backbone: str) -> list[str]:
    """The backbones a multi-backbone method combines, as ``--backbone a,b,c`` names them."""
    return [b.strip() for b in backbone.split(",") if b.strip()]


def fitted_node(method: str) -> str:
    return f"fitted/{method}"


def train_fingerprint(store: Store, backbone: str, split: str, layers: tuple[str, ...]) -> str:
    """The extraction fingerprint of the train features (covers data, weights, layers, dtype)
    and their row count; a hand-made split without one is hashed chunk by chunk instead."""
    node = features_node(split, backbone)
    attrs = store.node_attrs(node)
    rows = store.shape(f"{node}/{layers[0]}")[0]
    if attrs.get("fingerprint"):
        return f"{attrs['fingerprint']}:{rows}"
    return f"sha256:{store.content_hash(*(f'{node}/{layer}' for layer in layers))}:{rows}"


def train_mean(scorer: Scorer, store: Store, backbone: str, split: str) -> np.ndarray:
    """The mean train feature of ``scorer.layers[0]``, summed in float64 over one streamed pass."""
    layer = scorer.layers[0]
    total = np.zeros(store.shape(f"{features_node(split, backbone)}/{layer}")[1])
    n = 0
    for block in scorer.blocks(store, backbone, split, "fit pass 1/1"):
        total += block[layer].astype(np.float64).sum(axis=0)
        n += len(block[layer])
    return total / n


def load_head(store: Store, backbone: str, model_id: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The classifier head saved beside the features, refused if it belongs to other weights."""
    node = f"backbones/{backbone}"
    if not (store.is_array(f"{node}/head/weight") and store.is_array(f"{node}/head/bias")):
        raise OodError(
            f"store {store.path} has no classifier head for '{backbone}' ({node}/head); "
            "this method needs a backbone that ends in a linear classifier"
        )
    head_id = store.node_attrs(node).get("model_id")
    if model_id is not None and head_id is not None and head_id != model_id:
        raise OodError(
            f"the '{backbone}' head in {store.path} comes from other weights than the features; "
            "re-extract with the same --weights"
        )
    weight = store.read(f"{node}/head/weight").astype(np.float64)
    bias = store.read(f"{node}/head/bias").astype(np.float64)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or not np.isfinite(weight).all():
        raise OodError(f"the '{backbone}' head in {store.path} is malformed or non-finite; re-extract")
    return weight, bias


def iter_feature_blocks(
    store: Store,
    backbone: str,
    split: str,
    layers: tuple[str, ...],
    block_rows: int | None = None,
    labels: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Aligned float32 row blocks of several layers of one split (plus ``labels`` if asked),
    never the whole array.

    Refuses incomplete splits, missing layers and non-finite values with a one-line error.
    """
    node = features_node(split, backbone)
    check_features(store, backbone, split, layers)
    n = store.shape(f"{node}/{layers[0]}")[0]
    step = block_rows or min(store.chunk_rows(f"{node}/{layer}") for layer in layers)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        block = {layer: store.read(f"{node}/{layer}", rows).astype(np.float32) for layer in layers}
        for layer, values in block.items():
            if not np.isfinite(values).all():
                raise OodError(
                    f"split '{split}' has NaN or inf in '{backbone}/{layer}' (rows {rows.start}-{rows.stop - 1}); "
                    "check the input data or re-extract with --dtype float32"
                )
        if labels:
            block["labels"] = store.read(f"{split_node(split)}/labels", rows)
        yield block


#: layers that took over the use of an older one: a split with only the older layer is told
#: how to make the newer, and the older is never read in its place (the local CLIP methods
#: read the value-path ``patch_values``; stores made before it hold ``patch_tokens``)
OLDER_LAYERS = {"patch_values": "patch_tokens"}


def check_features(store: Store, backbone: str, split: str, layers: tuple[str, ...], method: str | None = None) -> None:
    """Refuse with one line a split whose ``backbone`` features cannot serve ``layers``
    (``method`` names the scorer asking, for the option its message gives)."""
    if not store.exists(split_node(split)):
        raise OodError(f"store {store.path} has no split '{split}'; extract it first")
    node = features_node(split, backbone)
    if not store.exists(node):
        raise OodError(f"split '{split}' has no '{backbone}' features; run 'oodcli extract --model {backbone}'")
    attrs = store.node_attrs(node)
    if not attrs.get("complete"):
        raise OodError(
            f"split '{split}' ({backbone}) is only partly extracted ({attrs.get('rows_done', 0)} rows); "
            "re-run the same extract command to finish it"
        )
    missing = [layer for layer in layers if not store.is_array(f"{node}/{layer}")]
    lost = [layer for layer in missing if layer in attrs.get("layers", [])]
    if lost:
        from oodcli.store import StoreDamaged

        raise StoreDamaged(store.path, f"'{node}' lost its layer {', '.join(lost)}, which its attributes list")
    perturbed = [layer for layer in missing if "@" in layer]  # made by extract --perturb, not --layers
    if perturbed:
        kind = perturbed[0].partition("@")[2]
        raise OodError(f"split '{split}' has no '{backbone}' layer {perturbed[0]}; re-extract it with "
                       f"--perturb {kind} (the settings the other splits used) --overwrite")
    older = [(layer, OLDER_LAYERS[layer]) for layer in missing
             if layer in OLDER_LAYERS and store.is_array(f"{node}/{OLDER_LAYERS[layer]}")]
    if older:
        from oodcli.scoring import extract_command

        new, old = older[0]
        raise OodError(
            f"split '{split}' has the '{backbone}' {old} (final-layer patch tokens) but not {new}, the value-path "
            f"patch tokens the local CLIP methods read; re-extract each split with {new}, this one with: "
            f"'{extract_command(store, backbone, split, layers)} --overwrite', or read the final-layer tokens "
            f"with -p {method or 'METHOD'}.local_layer={old}"
        )
    if missing:
        from oodcli.backbones.base import all_specs

        spec = all_specs().get(backbone)
        if spec is not None and any(layer not in spec.layers for layer in missing):
            raise OodError(
                f"backbone '{backbone}' has no layer {', '.join(missing)} (it offers {', '.join(spec.layers)}); "
                "this method needs features from a backbone that has it, e.g. a CLIP model for image_embeds"
            )
        raise OodError(
            f"split '{split}' has no '{backbone}' layer {', '.join(missing)}; "
            f"re-extract with --layers {','.join(dict.fromkeys([*store.children(node), *layers]))} --overwrite"
        )


def check_train_split(store: Store, backbone: str, split: str, layers: tuple[str, ...], min_classes: int = 1) -> None:
    """Refuse a train split that cannot be fitted on: empty, with OOD rows, or too few classes."""
    n = store.shape(f"{features_node(split, backbone)}/{layers[0]}")[0]
    if n == 0:
        raise OodError(f"train split '{split}' is empty; extract the ID train data first")
    classes = set()
    for _, block in store.iter_rows(f"{split_node(split)}/labels"):
        if (block < 0).any():
            raise OodError(f"train split '{split}' holds OOD rows (label -1); fit on ID data only (--train SPLIT)")
        classes.update(np.unique(block).tolist())
    if min_classes > 1:
        if len(classes) < min_classes:
            raise OodError(
                f"train split '{split}' has {len(classes)} class(es); this method needs at least {min_classes}"
            )
