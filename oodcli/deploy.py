"""From a benchmark table to a decision on new images.

- **Thresholds** (``record_threshold``): the score at which a share ``tpr`` of an ID split is
  kept, computed from that split's stored scores (no torch), recorded under
  ``fitted/thresholds/<method>`` with the split's features fingerprint and the identity of the
  method that scored it (name, backbone, weights, hyperparameters, train features). The split
  is the ID validation split by default; the test split is used only when named, since a
  threshold chosen on the test set makes every test metric at it optimistic.
- **Detector**: a store's method applied to images that are not in the store. It rebuilds the
  backbone the store records (same weights, checked by hash, same preprocessing), loads the
  method's fitted state from the store once, and then costs one forward pass plus the scorer
  per batch. Features are rounded to the dtype they are stored in, so an image of an existing
  split gets the score ``oodcli score`` stored for it.

A score is in-distribution when it is at or above the threshold (every oodcli score is
higher = more ID). Ties at the threshold are all kept, so the share of the split kept is at
least ``tpr`` and exceeds it only when scores tie there; this is the threshold ``report``'s
FPR@95 (ID positive) uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.metrics import id_threshold
from oodcli.store import Store, features_node, open_store, split_node

if TYPE_CHECKING:
    import torch

THRESHOLDS = "fitted/thresholds"
DEFAULT_TPR = 0.95
#: what a method's scores must share with the ones a threshold was computed from
IDENTITY_KEYS = ("method", "backbone", "model_id", "hparams", "train_split")


def threshold_node(name: str) -> str:
    return f"{THRESHOLDS}/{name}"


def check_tpr(tpr: float) -> float:
    if not (isinstance(tpr, (int, float)) and 0.0 < float(tpr) <= 1.0):
        raise UsageError(f"--tpr is the share of ID images to keep, in (0, 1]; not {tpr!r}")
    return float(tpr)


@dataclass
class Threshold:
    """A recorded decision rule: ``score >= value`` is in-distribution."""

    method: str  # the name scores are stored under (``--as`` names included)
    value: float
    tpr: float  # the share of the split asked to be kept
    kept: float  # the share actually kept (more than tpr only when scores tie at value)
    split: str
    rows: int
    split_fingerprint: str | None
    identity: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def score_identity(store: Store, name: str, split: str) -> dict:
    """What made ``scores/<name>/<split>``: method, backbone, weights, hyperparameters, train split."""
    from oodcli.scoring import read_scores

    read_scores(store, name, split)  # refuses missing scores with the command that makes them
    attrs = store.node_attrs(f"scores/{name}/{split}")
    return json.loads(json.dumps({k: attrs.get(k) for k in IDENTITY_KEYS}))


def default_threshold_split(store: Store) -> str:
    """The ID validation split: 'val' if there is one, else the only ID split besides train and test."""
    from oodcli.scoring import ID_VAL_SPLIT, default_id_split
    from oodcli.store import require_whole_splits, split_role

    splits = require_whole_splits(store)
    if ID_VAL_SPLIT in splits:
        return ID_VAL_SPLIT
    try:
        test = default_id_split(store)
    except OodError:
        test = None
    held_out = [s for s in splits if split_role(store, s) == "id" and s not in ("train", test)]
    if len(held_out) == 1:
        return held_out[0]
    raise OodError(
        f"store {store.path} has no ID validation split to set a threshold on "
        + (f"(several could be: {', '.join(held_out)}); name one with --split" if held_out else
           "; extract held-out ID images as --split val (role id), or name a split with --split "
           "(the test split only if you accept optimistic test metrics at the threshold)")
    )


def record_threshold(store_path: str | Path, method: str, split: str | None = None, tpr: float = DEFAULT_TPR,
                     id_split: str | None = None) -> Threshold:
    """Compute the threshold of ``method`` on an ID split's stored scores and record it in the store."""
    from oodcli.scoring import default_id_split, rescore_command
    from oodcli.store import check_name, split_role

    tpr = check_tpr(tpr)
    with open_store(store_path, "r+") as store:
        split = split or default_threshold_split(store)
        check_name(split, "--split")
        if not store.exists(split_node(split)):
            raise OodError(f"store {store.path} has no split '{split}'")
        if split_role(store, split) != "id":
            raise OodError(f"split '{split}' has role '{split_role(store, split)}'; a threshold keeps a share of "
                           "ID images, so it is set on an ID split (default: val)")
        test = id_split or default_id_split(store)
        reference = score_identity(store, method, test)  # the scores report and predict use
        if not store.is_array(f"scores/{method}/{split}"):
            raise OodError(
                f"no '{method}' scores on split '{split}' yet; make them with the settings of its '{test}' scores: "
                + rescore_command(store, method, reference, split)
            )
        identity = score_identity(store, method, split)
        if identity != reference:
            diff = ", ".join(k for k in IDENTITY_KEYS if identity.get(k) != reference.get(k))
            raise OodError(
                f"the '{method}' scores on '{split}' were made with other {diff} than those on '{test}'; "
                f"score '{split}' again with the same settings (oodcli score {reference['method']} --id {split} ...)"
            )
        scores = store.read(f"scores/{method}/{split}").astype(np.float64)
        if scores.size and float(np.ptp(scores)) == 0.0:
            raise OodError(f"the '{method}' scores on '{split}' are constant: no threshold can separate anything")
        value = id_threshold(scores, tpr)
        fingerprint = store.node_attrs(features_node(split, identity["backbone"])).get("fingerprint")
        result = Threshold(method, value, tpr, float(np.mean(scores >= value)), split, int(scores.size),
                           fingerprint, identity)
        with store.transaction() as txn:
            staged = txn.stage(threshold_node(method))
            store.require_group(staged)
            store.set_attrs(staged, **result.as_dict(), complete=True)
    return result


def read_threshold(store: Store, method: str, id_split: str | None = None) -> Threshold:
    """The recorded threshold of ``method``, refused when the method's scores changed since."""
    from oodcli.scoring import default_id_split

    node = threshold_node(method)
    if not store.exists(node) or not store.node_attrs(node).get("complete"):
        raise OodError(f"no threshold recorded for '{method}'; set one with 'oodcli threshold {method} --store {store.path}'"
                       " or pass --threshold VALUE")
    attrs = store.node_attrs(node)
    recorded = Threshold(**{f.name: attrs.get(f.name) for f in dataclasses.fields(Threshold)})
    current = score_identity(store, method, id_split or default_id_split(store))
    if current != json.loads(json.dumps(recorded.identity)):
        diff = ", ".join(k for k in IDENTITY_KEYS if current.get(k) != recorded.identity.get(k))
        raise OodError(f"the threshold recorded for '{method}' was set for other {diff} than its current scores; "
                       f"set it again with 'oodcli threshold {method} --store {store.path}'")
    split_fp = store.node_attrs(features_node(recorded.split, current["backbone"])).get("fingerprint") \
        if store.exists(features_node(recorded.split, current["backbone"])) else None
    if split_fp != recorded.split_fingerprint:
        raise OodError(f"split '{recorded.split}' changed since the '{method}' threshold was set on it; "
                       f"set it again with 'oodcli threshold {method} --store {store.path}'")
    return recorded


# ---- the backbone a store records ----------------------------------------------------------------


def recorded_backbone(store: Store, backbone: str, split: str):
    """(spec, weights) rebuilt from what ``extract`` recorded for ``split``: the network, the weights
    (a file must still hash as it did) and the preprocessing it used."""
    from oodcli.backbones.base import get_spec
    from oodcli.backbones.spec import Preprocess, preprocess_option, spec_as_recorded
    from oodcli.extraction import model_id

    attrs = store.node_attrs(features_node(split, backbone))
    parts, weights = attrs.get("parts") or {}, attrs.get("weights_source")
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in (parts.get("preprocess") or {}).items()}
    try:
        source = attrs.get("model_source")
        if source:  # SOURCE:NAME or extract --as: named again as extract named it, with the recorded preprocessing
            spec = spec_as_recorded(source, weights, preprocess_option(pre))
        else:
            spec = get_spec(parts.get("backbone", backbone))
        spec = spec.for_weights(weights)
        spec = dataclasses.replace(spec, preprocess=Preprocess(**pre))
        built_id = model_id(spec, weights)
    except (OodError, UsageError) as exc:
        raise OodError(f"the '{backbone}' model or weights the store's features were made with cannot be loaded ({exc}); "
                       f"restore {weights} or re-extract the store") from None
    if built_id != attrs.get("model_id"):
        raise OodError(
            f"the '{backbone}' weights at {weights} no longer match the ones split '{split}' was extracted with "
            f"(recorded {parts.get('weights')}); restore that file or re-extract the store"
        )
    return spec, weights


def add_to_store(store_path: str | Path, method: str, source: str, split: str, role: str | None = None,
                 id_split: str | None = None, device: str = "auto", batch_size: int = 64) -> list:
    """``predict --split NAME``: the new images as an ordinary split, extracted with the model, weights,
    preprocessing and dtype of the method's features, then scored by the method with its settings."""
    from oodcli.api import extract_splits
    from oodcli.backbones.spec import preprocess_option
    from oodcli.scoring import default_id_split, score_store

    with open_store(store_path, "r") as store:
        id_split = id_split or default_id_split(store)
        identity = score_identity(store, method, id_split)
        node = features_node(id_split, identity["backbone"])
        attrs = store.node_attrs(node)
        parts, rebuild = attrs.get("parts") or {}, attrs.get("model_source") or {}
        layers = list(attrs.get("layers") or [])
        pool = parts.get("featmap_pool")
    extract_splits(rebuild.get("model", identity["backbone"]), store_path, data=source, splits=[split], role=role,
                   weights=attrs.get("weights_source"), layers=layers, batch_size=batch_size, device=device,
                   dtype=parts.get("dtype", "float16"), featmap_pool=pool if "featmap" in layers else None,
                   preprocess=preprocess_option(parts.get("preprocess") or {}), head=rebuild.get("head"), layer_paths=rebuild.get("layers") or None,
                   strict=rebuild.get("strict", True), store_as=rebuild.get("name"))
    with open_store(store_path, "r+") as store:
        return score_store(store, [identity["method"]], backbone=identity["backbone"], id_split=id_split,
                           train_split=identity.get("train_split") or "train",
                           hparams={identity["method"]: identity.get("hparams") or {}},
                           save_as=method if method != identity["method"] else None)


# ---- the Detector -------------------------------------------------------------------------------


@dataclass
class Predictions:
    """One entry per image, as arrays (``rows()`` gives them as records)."""

    ids: list  # a path (folder sources) or the row index
    scores: np.ndarray
    threshold: float | None
    is_id: np.ndarray | None  # score >= threshold
    percentile: np.ndarray | None  # share (%) of the threshold split's ID scores at or below the score
    predicted: np.ndarray | None  # class index from the head (or the CLIP prototypes)
    probability: np.ndarray | None  # its softmax probability
    class_names: list[str] | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, why) of the images left out

    def rows(self) -> Iterator[dict]:
        for i, ident in enumerate(self.ids):
            row: dict[str, Any] = {"id": ident, "score": float(self.scores[i])}
            if self.is_id is not None:
                row["decision"] = "in" if self.is_id[i] else "out"
            if self.percentile is not None:
                row["percentile"] = float(self.percentile[i])
            if self.predicted is not None:
                c = int(self.predicted[i])
                row["class"] = self.class_names[c] if self.class_names and c < len(self.class_names) else c
                row["probability"] = float(self.probability[i])
            yield row


class Detector:
    """A store's method, ready to score images that are not in the store.

    >>> det = Detector.from_store("stores/digits.zarr", "knn")          # doctest: +SKIP
    >>> det.predict("my_images/").rows()                                # doctest: +SKIP
    """

    def __init__(self, store_path: str, method: str, scorer, backbone: str, model_id: str | None, id_split: str,
                 threshold: Threshold | None, threshold_value: float | None, reference: np.ndarray | None,
                 layer_dtypes: dict[str, np.dtype], featmap_pool: int | None, spec, weights: str | None,
                 head: tuple[np.ndarray, np.ndarray] | None, class_names: list[str] | None, device: str,
                 batch_size: int):
        self.store_path, self.method, self.scorer, self.backbone = store_path, method, scorer, backbone
        self.model_id, self.id_split, self.threshold, self.threshold_value = model_id, id_split, threshold, threshold_value
        self.reference = reference
        self.layer_dtypes, self.featmap_pool, self.spec, self.weights = layer_dtypes, featmap_pool, spec, weights
        self.head, self.class_names, self.device, self.batch_size = head, class_names, device, batch_size
        self._net = None

    @property
    def layers(self) -> tuple[str, ...]:
        """What the method reads (plus the logits when the backbone has them, for the predicted class)."""
        return tuple(self.layer_dtypes)

    @classmethod
    def from_store(cls, store_path: str | Path, method: str, threshold: str | float | None = "recorded",
                   id_split: str | None = None, device: str = "auto", batch_size: int = 64) -> "Detector":
        """Load ``method`` as ``oodcli score`` last stored it (scores/<method>/<ID test split>):
        the same scorer, hyperparameters, backbone and fitted state. ``threshold``: "recorded"
        (from ``oodcli threshold``; refused if none), a number, or None (scores only)."""
        from oodcli.data.benchmarks import get_benchmark
        from oodcli.extraction import check_device
        from oodcli.scorers.base import get_scorer, load_head, no_progress
        from oodcli.scoring import default_id_split

        check_device(device)
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
        with open_store(store_path, "r") as store:
            id_split = id_split or default_id_split(store)
            identity = score_identity(store, method, id_split)
            scorer = get_scorer(identity["method"], **(identity.get("hparams") or {}))
            backbone, model_id = identity["backbone"], identity["model_id"]
            if scorer.multi_backbone:
                raise OodError(f"method '{method}' combines the backbones {backbone}; new images cannot be scored "
                               "by it yet (extract them with each member and run 'oodcli score')")
            perturbed = [layer for layer in scorer.layers if "@" in layer]
            if perturbed:
                raise OodError(f"method '{method}' reads {perturbed[0]}, made by perturbing the input at extraction; "
                               "new images cannot be scored by it yet")
            train_split = identity.get("train_split") or "train"
            scorer.check_inputs(store, backbone, train_split, model_id)
            scorer.progress = no_progress
            scorer.prepare(store, backbone, train_split, model_id)
            if not getattr(scorer, "uses_gradients", False):  # GROOD's gradients of new rows are made per batch
                scorer.complete_inputs(store, backbone, [id_split])  # e.g. the layer ASH shapes
            node = features_node(id_split, backbone)
            dtypes = {layer: store.dtype(f"{node}/{layer}") for layer in scorer.layers}
            if "logits" not in dtypes and store.is_array(f"{node}/logits"):
                dtypes["logits"] = store.dtype(f"{node}/logits")
            pool = store.node_attrs(f"{node}/featmap").get("pool") if "featmap" in dtypes else None
            record, value = None, None
            if threshold == "recorded":
                record = read_threshold(store, method, id_split)
                value = record.value
            elif threshold is not None:
                try:
                    value = float(threshold)
                except (TypeError, ValueError):
                    raise UsageError(f"--threshold is 'recorded' or a number, not {threshold!r}") from None
            ref_split = record.split if record else ("val" if store.is_array(f"scores/{method}/val") else None)
            reference = np.sort(store.read(f"scores/{method}/{ref_split}").astype(np.float64)) if ref_split else None
            head = None
            if store.is_array(f"backbones/{backbone}/head/weight"):
                head = load_head(store, backbone, model_id)
            try:
                names = get_benchmark(store.attrs["benchmark"]).resolve_class_names()
            except (KeyError, OodError):
                names = getattr(scorer, "class_names", None)
            spec, weights = recorded_backbone(store, backbone, id_split)
            if hasattr(spec, "requesting"):  # SOURCE:NAME models build the layers asked for
                spec = spec.requesting(tuple(dtypes))
        return cls(str(store_path), method, scorer, backbone, model_id, id_split, record, value, reference, dtypes,
                   pool, spec, weights, head, names, device, batch_size)

    # ---- features -> scores ------------------------------------------------------------------

    def score_features(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores of rows given as features (``{"penultimate": [N, D], ...}``), e.g. computed by
        the user's own pipeline; each is rounded to the dtype the store keeps that layer in."""
        missing = [layer for layer in self.scorer.layers if layer not in features]
        if missing:
            raise UsageError(f"method '{self.method}' needs the layer(s) {', '.join(missing)}; "
                             f"give {', '.join(self.scorer.layers)}")
        batch = {}
        for layer in self.scorer.layers:
            x = np.asarray(features[layer])
            if layer in self.layer_dtypes:
                x = x.astype(self.layer_dtypes[layer]).astype(np.float32)  # exactly what the store holds
            if not np.isfinite(x).all():
                raise OodError(f"layer {layer} of the given features has NaN or inf values")
            batch[layer] = x
        return np.asarray(self.scorer.score_features(batch), np.float32)

    def _score_forwarded(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """``score_features`` right after a forward pass, with the BLAS pool at one thread: on CPU,
        numpy's BLAS threads and torch's still-spinning OpenMP threads contend for the same cores,
        which made a Mahalanobis batch cost 2-3 forward passes (benchmarks/predict.py)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return self.score_features(feats)

    # ---- images -> features ------------------------------------------------------------------

    def network(self):
        """The backbone, built on first use."""
        if self._net is None:
            from oodcli.extraction import resolve_device

            self._net = self.spec.build(self.weights).to(resolve_device(self.device)).eval()
        return self._net

    def forward(self, x: "torch.Tensor") -> dict[str, np.ndarray]:
        """The layers of a preprocessed batch [N, 3, H, W], as extract computes them."""
        from oodcli.extraction import forward_batch

        net = self.network()
        out = forward_batch(net, x.to(next(net.parameters()).device), tuple(self.layer_dtypes), self.featmap_pool)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _batches(self, images) -> Iterator[tuple[list, "torch.Tensor | None", list]]:
        """(ids, preprocessed batch, failures) for a folder or data source (or an opened one), PIL
        images or a tensor."""
        import torch

        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise UsageError(f"a tensor of images is [N, 3, H, W] and preprocessed; this one is {tuple(images.shape)}")
            for i in range(0, len(images), self.batch_size):
                yield list(range(i, min(i + self.batch_size, len(images)))), images[i : i + self.batch_size], []
            return
        transform = self.spec.preprocess.to_transform()
        if isinstance(images, (str, Path)) or hasattr(images, "load"):
            data = open_images(images) if isinstance(images, (str, Path)) else images
            load = data.load
            ids = [str(p) for p in data.files] if getattr(data, "files", None) is not None else list(range(len(data)))
            indices: Iterable[int] = range(len(data))
        else:
            images = list(images)
            load, ids, indices = images.__getitem__, list(range(len(images))), range(len(images))
        batch, names, failed = [], [], []
        for i in indices:
            try:
                batch.append(transform(load(i)))
                names.append(ids[i])
            except Exception as exc:  # noqa: BLE001 - an unreadable image is listed, the others predicted
                failed.append((str(ids[i]), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            if len(batch) == self.batch_size:
                yield names, torch.stack(batch), failed
                batch, names, failed = [], [], []
        yield names, (torch.stack(batch) if batch else None), failed

    def score(self, images) -> np.ndarray:
        """Scores of images: a folder (or any ``--data`` source), a list of PIL images, or a
        preprocessed tensor [N, 3, H, W]. Unreadable images raise; ``predict`` lists them instead."""
        out, failed = [], []
        for _, x, bad in self._batches(images):
            failed += bad
            if x is not None:
                out.append(self._score_forwarded(self.forward(x)))
        if failed:
            raise OodError(f"{len(failed)} image(s) could not be read, e.g. {failed[0][0]} ({failed[0][1]})")
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def predict(self, images) -> Predictions:
        """Scores, in/out decisions at the threshold, percentiles among the ID validation scores and
        the predicted class, per image; unreadable images are left out and listed in ``failed``."""
        return self.predict_batches(images, collect=True)

    def predict_batches(self, images, collect: bool = True, on_batch=None) -> Predictions:
        ids, scores, classes, probs, failed = [], [], [], [], []
        for names, x, bad in self._batches(images):
            failed += bad
            if x is None:
                continue
            feats = self.forward(x)
            part = self._predictions(names, self._score_forwarded(feats), feats)
            if on_batch is not None:
                on_batch(part)
            if collect:
                ids += part.ids
                scores.append(part.scores)
                if part.predicted is not None:
                    classes.append(part.predicted)
                    probs.append(part.probability)
        cat = (lambda parts: np.concatenate(parts) if parts else None)  # noqa: E731
        s = cat(scores) if scores else np.zeros(0, np.float32)
        return Predictions(ids, s, self.threshold_value,
                           None if self.threshold_value is None else s >= self.threshold_value,
                           self.percentiles(s), cat(classes), cat(probs), self.class_names, failed)

    def percentiles(self, scores: np.ndarray) -> np.ndarray | None:
        if self.reference is None or not len(self.reference):
            return None
        return 100.0 * np.searchsorted(self.reference, np.asarray(scores, np.float64), side="right") / len(self.reference)

    def _predictions(self, names: list, scores: np.ndarray, feats: dict[str, np.ndarray]) -> Predictions:
        predicted = probability = None
        logits = None
        if "logits" in feats:
            logits = feats["logits"].astype(self.layer_dtypes["logits"]).astype(np.float64)
        elif self.head is not None and "penultimate" in feats:
            w, b = self.head
            logits = feats["penultimate"].astype(np.float64) @ w.T + b
        elif getattr(self.scorer, "prototypes", None) is not None and "image_embeds" in feats:
            x = feats["image_embeds"].astype(np.float64)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            logits = x @ np.asarray(self.scorer.prototypes, np.float64).T / 0.01  # CLIP zero-shot at T = 0.01
        if logits is not None:
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            predicted, probability = p.argmax(axis=1), p.max(axis=1)
        return Predictions(names, scores, self.threshold_value,
                           None if self.threshold_value is None else scores >= self.threshold_value,
                           self.percentiles(scores), predicted, probability, self.class_names)


def open_images(source: str | Path):
    """A folder path, or any ``--data`` source (``folder:DIR``, ``digits:test``, ...), as a data set."""
    from oodcli.data.base import data_root, open_source

    text = str(source)
    if Path(text).is_dir():
        text = f"folder:{Path(text).resolve()}"
    elif ":" not in text:
        raise OodError(f"no folder {text}; give a folder of images or a data source such as folder:DIR")
    data = open_source(text, data_root(None), is_ood=True)
    if len(data) == 0:
        raise OodError(f"{source} holds no images")
    return data
