"""The scorer contract: a class registered by name, fitted on the ID train split,
scoring any split chunk by chunk. Higher score = more in-distribution.

Hyperparameters are keyword arguments with the papers' defaults; the CLI exposes
them as ``--param name=value``.
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Iterator

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.store import Store, features_node, split_node

_REGISTRY: dict[str, type["Scorer"]] = {}


def register(cls: type["Scorer"]) -> type["Scorer"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def scorer_names() -> list[str]:
    from oodcli import scorers  # noqa: F401  (imports every family module)

    return sorted(_REGISTRY)


def get_scorer(name: str, **hparams) -> "Scorer":
    names = scorer_names()
    if name not in _REGISTRY:
        raise UsageError(f"unknown method '{name}'; choose from: {', '.join(names)}")
    cls = _REGISTRY[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(hparams) - accepted
    if unknown:
        raise UsageError(
            f"method '{name}' has no parameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**hparams)


class Scorer:
    """Base class. Subclasses set ``name`` and ``layers`` and implement ``score_batch``;
    those that learn from the train split also implement ``fit``."""

    name: ClassVar[str]
    layers: ClassVar[tuple[str, ...]] = ("logits",)
    needs_fit: ClassVar[bool] = False

    def hparams(self) -> dict:
        """The keyword arguments this scorer was made with (recorded beside its scores)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    def fit(self, store: Store, backbone: str, split: str) -> None:
        """Learn from the ID train split. Stateless scorers need nothing."""

    def score_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def score(self, store: Store, backbone: str, split: str) -> np.ndarray:
        out = [self.score_batch(batch) for batch in iter_feature_blocks(store, backbone, split, self.layers)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def iter_feature_blocks(
    store: Store, backbone: str, split: str, layers: tuple[str, ...], block_rows: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Aligned float32 row blocks of several layers of one split, never the whole array.

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
        yield block


def check_features(store: Store, backbone: str, split: str, layers: tuple[str, ...]) -> None:
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
    if missing:
        raise OodError(
            f"split '{split}' has no '{backbone}' layer {', '.join(missing)}; "
            f"re-extract with --layers {','.join(layers)} --overwrite"
        )
