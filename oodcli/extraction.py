"""Run a backbone over a data set once and write its layers into the store.

Idempotent and resumable: a fingerprint of (data, split, backbone, weights,
preprocessing, layers, dtype) decides whether a split is already done (cache
hit, the backbone is not even built), half done (resume from the last whole
chunk) or made by something else (refused unless ``overwrite``).

Compute and I/O overlap: the main thread runs the backbone while a writer thread
gathers rows into whole chunks and writes them; ``rows_done`` is advanced only
after a chunk is on disk, and ``complete`` is set last.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from oodcli import __version__
from oodcli.backbones.spec import BackboneSpec
from oodcli.data.base import ImageDataset, TransformedDataset
from oodcli.errors import OodError, UsageError
from oodcli.fewshot import check_replacing
from oodcli.store import (
    Store,
    check_name,
    chunk_rows_for,
    digest,
    features_node,
    split_dependents,
    split_is_whole,
    split_node,
    split_groups,
)

if TYPE_CHECKING:  # torch is imported only where a split is computed (DESIGN.md, "Fast start")
    import torch

    from oodcli.backbones.modules import Backbone

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class ExtractResult:
    split: str
    backbone: str
    status: str  # "cached" | "extracted" | "resumed" | "extended" (layers added to a complete split)
    rows: int  # rows in the split
    rows_computed: int  # rows the backbone ran on in this call
    seconds: float
    layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. float16 losing a layer's range

    def as_dict(self) -> dict:
        return asdict(self)


FLOAT16_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-5: below it float16 keeps fewer bits, below 3e-8 none
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: above it, inf
FLOAT16_ROW_ERROR = 1e-3  # float16's own rounding stays below 2**-11 (4.9e-4) of a row's norm


def float16_range_notes(block: dict[str, np.ndarray]) -> list[str]:
    """What storing these (float32) rows as float16 would lose, per layer: values above its maximum
    (inf), or rows whose values sit so far below its normal range that the rounding error exceeds
    ``FLOAT16_ROW_ERROR`` of the row's norm (the median row). A few tiny entries beside larger
    ones (post-ReLU features) lose nothing that matters and are not reported."""
    notes = []
    for layer, x in block.items():
        rows = x.reshape(len(x), -1).astype(np.float64)
        rows = rows[np.isfinite(rows).all(axis=1)]
        norm = np.linalg.norm(rows, axis=1)
        rows, norm = rows[norm > 0], norm[norm > 0]
        if not len(rows):
            continue
        over = float(np.mean(np.abs(rows) > FLOAT16_MAX))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, not warned
            error = float(np.median(np.linalg.norm(rows - rows.astype(np.float16).astype(np.float64), axis=1) / norm))
        if over > 0:
            notes.append(f"{layer}: {100 * over:.2g}% of the first chunk's values exceed float16's range "
                         f"({FLOAT16_MAX:g}) and are stored as inf; extract with --dtype float32")
        elif error > FLOAT16_ROW_ERROR:
            notes.append(f"{layer}: its values lie below float16's normal range ({FLOAT16_NORMAL:.1e}): stored as "
                         f"float16 a row loses {100 * error:.2g}% of its norm (median over the first chunk); "
                         "extract with --dtype float32")
    return notes


def check_device(device: str) -> str:
    """Refuse a bad --device before any work. Only a cuda request imports torch (to ask
    whether CUDA is there); auto and cpu are decided when a network is built."""
    if device in ("auto", "cpu"):
        return device
    if not device.startswith("cuda"):
        raise UsageError(f"unknown --device '{device}'; use auto, cpu or cuda[:N]")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return device


def resolve_device(device: str) -> torch.device:
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_identity(spec: BackboneSpec, weights: str | None) -> dict:
    """What makes two feature arrays comparable: same network, same parameters, same input.
    The preprocessing is the one used (the benchmark's normalisation, ``--preprocess``); the
    activation is a key only when it is QuickGELU (CLIP in OpenAI's format or a ``-quickgelu``
    architecture), so stores of GELU networks keep their fingerprints."""
    identity = {
        "backbone": spec.name,
        "weights": spec.weights_identity(weights),
        "preprocess": spec.preprocess.describe(),
    }
    if spec.activation == "quick_gelu":
        identity["activation"] = spec.activation
    return identity


def weights_source(weights: str | None) -> str | None:
    """How to load the weights again later (an absolute path for files); not part of the fingerprint."""
    if weights is not None and Path(weights).exists():
        return str(Path(weights).resolve())
    return weights


def model_id(spec: BackboneSpec, weights: str | None) -> str:
    return digest(model_identity(spec, weights))


def fingerprint_parts(
    spec: BackboneSpec, weights: str | None, data: ImageDataset, split: str, layers, dtype: str,
    featmap_pool: int | None = None, perturbed: dict | None = None,
) -> dict:
    """What decides whether a split is already extracted. The feature-map pooling and the
    perturbations are keys only when asked for, so stores made without them keep their
    fingerprints."""
    parts = {
        "data": data.identity(),
        "split": split,
        **model_identity(spec, weights),
        "layers": sorted(layers),
        "dtype": dtype,
    }
    if "featmap" in layers:
        parts["featmap_pool"] = featmap_pool
    if perturbed:
        parts["perturb"] = perturbed
    if getattr(data, "few_shot", None):  # a few-shot subset (``extract --shots``): its draw and parent
        parts["few_shot"] = data.few_shot
    return parts


def run_backbone(model: Backbone, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One forward pass (a module-level function so tests can slow it down)."""
    return model(x, layers)


def forward_batch(model: Backbone, x: torch.Tensor, layers: tuple[str, ...],
                  featmap_pool: int | None = None) -> dict[str, torch.Tensor]:
    """A batch (on the model's device) through the network as extract stores it: inference mode,
    fp16 autocast on CUDA, the featmap average-pooled to ``featmap_pool`` x ``featmap_pool``."""
    import torch

    autocast = torch.autocast("cuda", dtype=torch.float16) if x.device.type == "cuda" else nullcontext()
    with torch.inference_mode(), autocast:
        out = run_backbone(model, x, layers)
        if featmap_pool is not None and "featmap" in out:
            out["featmap"] = torch.nn.functional.adaptive_avg_pool2d(out["featmap"].float(), featmap_pool)
    return out


class _ChunkWriter(threading.Thread):
    """Collects batches into whole chunks and writes them, advancing ``rows_done``."""

    def __init__(self, store: Store, node: str, layers, start: int, chunk_rows: int, dtype, on_rows, nonfinite: int = 0,
                 marker: str | None = None):
        super().__init__(daemon=True, name="oodcli-writer")
        self.store, self.node, self.layers = store, node, layers
        self.rows_done, self.chunk_rows, self.dtype = start, chunk_rows, dtype
        self.on_rows = on_rows
        self.inbox: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.nonfinite_rows = nonfinite  # kept with rows_done, so a resumed run counts what came before
        self.marker = marker or node  # where rows_done is recorded: the node, or a shard's own group
        self._buffer: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
        self._buffered = 0
        self.notes: list[str] = []  # the first chunk's float16 range check
        self._checked = dtype != np.float16

    def put(self, batch: dict[str, np.ndarray] | str) -> None:
        """Queue a batch, or "end" (write what is left) / "stop" (keep whole chunks only)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.inbox.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while isinstance(batch := self.inbox.get(), dict):
                for layer in self.layers:
                    self._buffer[layer].append(batch[layer])
                self._buffered += len(batch[self.layers[0]])
                while self._buffered >= self.chunk_rows:
                    self._flush(self.chunk_rows)
            if batch == "end" and self._buffered:  # "stop" (interrupt) keeps only whole chunks
                self._flush(self._buffered)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def _flush(self, rows: int) -> None:
        bad = np.zeros(rows, dtype=bool)
        if not self._checked:
            self.notes = float16_range_notes({layer: np.concatenate(self._buffer[layer])[:rows] for layer in self.layers})
            self._checked = True
        for layer in self.layers:
            block = np.concatenate(self._buffer[layer])
            head, tail = block[:rows], block[rows:]
            self._buffer[layer] = [tail] if len(tail) else []
            bad |= ~np.isfinite(head.reshape(rows, -1)).all(axis=1)
            self.store.write_rows(f"{self.node}/{layer}", self.rows_done, head.astype(self.dtype))
        self._buffered -= rows
        self.rows_done += rows
        self.nonfinite_rows += int(bad.sum())
        self.store.set_attrs(self.marker, rows_done=self.rows_done, nonfinite_rows=self.nonfinite_rows)
        self.on_rows(rows)


class LazyModel:
    """Builds the backbone on first use, so cache hits never pay for it."""

    def __init__(self, spec: BackboneSpec, weights: str | None, device: str | torch.device):
        self.spec, self.weights, self.device = spec, weights, device  # a --device string: resolved on build
        self._model: Backbone | None = None

    def get(self) -> Backbone:
        if self._model is None:
            device = resolve_device(self.device) if isinstance(self.device, str) else self.device
            self._model = self.spec.build(self.weights).to(device).eval()
        return self._model


def check_layers(spec: BackboneSpec, layers: list[str] | None) -> tuple[str, ...]:
    from oodcli.backbones.registry import SPECIAL_LAYERS

    if not layers:
        return tuple(spec.default_layers)
    unknown = [layer for layer in layers if layer not in spec.layers]
    special = [layer for layer in unknown if layer in SPECIAL_LAYERS]
    if special:
        raise UsageError(f"model '{spec.name}' has no layer '{special[0]}': {SPECIAL_LAYERS[special[0]]}; "
                         f"drop it from --layers (this model offers: {', '.join(spec.layers)})")
    if "@" in "".join(unknown):
        raise UsageError(f"layer '{next(u for u in unknown if '@' in u)}' is made by --perturb, not --layers "
                         "(e.g. --perturb odin makes logits@odin)")
    if unknown:
        raise UsageError(
            f"model '{spec.name}' has no layer {', '.join(unknown)}; it offers: {', '.join(spec.layers)}"
        )
    return tuple(dict.fromkeys(layers))


def check_featmap_pool(layers: tuple[str, ...], featmap_pool: int | None) -> int | None:
    if featmap_pool is None:
        return None
    if "featmap" not in layers:
        raise UsageError("--featmap-pool pools the featmap layer; add featmap to --layers (e.g. --layers logits,penultimate,featmap)")
    if featmap_pool < 1:
        raise UsageError(f"--featmap-pool {featmap_pool} is not a grid size; give G >= 1 (G x G cells)")
    return int(featmap_pool)


def featmap_shape(native: tuple[int, ...], pool: int | None, model: str) -> tuple[int, ...]:
    """[C, H, W] as stored: the network's map, or C x G x G after --featmap-pool G."""
    if pool is None:
        return tuple(native)
    c, h, w = native
    if pool > min(h, w):
        raise UsageError(f"--featmap-pool {pool} is larger than the {h}x{w} feature map of '{model}'; "
                         f"give G <= {min(h, w)}")
    return (c, pool, pool)


def _plain(value):
    """A value as the store's JSON attributes hold it (tuples become lists), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _describe_mismatch(old: dict, new: dict) -> str:
    """Each field that really differs, in full; of a dict field (the preprocessing), only its
    differing keys. Stored attributes are JSON, so both sides are compared as JSON."""
    old, new = _plain(old), _plain(new)
    parts = []
    for k in new:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{k}.{sub} {json.dumps(a.get(sub))} -> {json.dumps(b.get(sub))}"
                      for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            parts.append(f"{k} {json.dumps(a)} -> {json.dumps(b)}")
    return "; ".join(parts) or "fingerprint differs"


_DATA_FIELDS = re.compile(r":(n|labels|root|files)=")
_DATA_WHAT = {"n": "row count", "labels": "labels", "root": "folder", "files": "image files (names, sizes or times)"}


def describe_data_change(old: str | None, new: str) -> str:
    """What differs between two data identities (``ImageDataset.identity``), each field in full."""
    def fields(identity: str) -> dict[str, str]:
        parts = _DATA_FIELDS.split(identity or "")
        return {"source": parts[0], **dict(zip(parts[1::2], parts[2::2]))}

    a, b = fields(old or ""), fields(new)
    changed = [k for k in b if a.get(k) != b[k]]
    if changed and all(k in ("labels", "files") for k in changed) and a.get("source") == b["source"]:
        return "the " + " and the ".join(_DATA_WHAT[k] for k in changed) + " changed since it was extracted"
    return "; ".join(f"{_DATA_WHAT.get(k, k)} {a.get(k)} -> {b[k]}" for k in changed) or "another data set"


def check_new_split(store: Store, split: str) -> None:
    """A new split may not sit inside another split or hold one (``ood/near`` beside
    ``ood/near/x``): its group would mix a split's arrays with another split's."""
    for other in split_groups(store):
        if other != split and (other.startswith(split + "/") or split.startswith(other + "/")):
            beside = (f"{other}-{split[len(other) + 1:].replace('/', '-')}" if split.startswith(other + "/")
                      else f"{split}-all")  # a name that nests with neither
            raise UsageError(
                f"split '{split}' would nest with the existing split '{other}'; pick a name beside it, e.g. '{beside}'"
            )


def prepare_split(
    store: Store, split: str, role: str, source: str, data: ImageDataset, overwrite: bool = False
) -> None:
    """Write labels, ids and the split's attributes in one transaction (never half a split).
    A half-made split is redone; a split of other data is refused unless ``overwrite``, which
    replaces it together with everything made from it (features, scores, gradients)."""
    check_name(split, "split name")
    node = split_node(split)
    identity = data.identity()
    if split_is_whole(store, split):
        old = store.node_attrs(node).get("data")
        if old == identity:
            return
        if not overwrite:
            raise OodError(
                f"split '{split}' in {store.path} holds other data ({describe_data_change(old, identity)}); "
                "use another --split name or --store, or pass --overwrite to replace the split and all made from it"
            )
    else:
        check_new_split(store, split)
    labels = np.asarray(data.labels, dtype=np.int64)
    with store.transaction() as txn:
        staged = txn.stage(node)
        store.require_group(staged)
        store.write_array(f"{staged}/labels", labels)
        ids = getattr(data, "ids", None)  # a few-shot subset: its rows' positions in the parent data set
        store.write_array(f"{staged}/ids", np.arange(len(labels), dtype=np.int64) if ids is None else ids)
        store.set_attrs(staged, role=role, source=source, data=identity, n=int(len(labels)))
        if getattr(data, "few_shot", None):
            store.set_attrs(staged, few_shot=data.few_shot)
        if getattr(data, "class_names", None) and (labels >= 0).any():  # image folders: their class folders
            store.set_attrs(staged, class_names=list(data.class_names))
        for dependent in split_dependents(store, split):
            txn.remove(dependent)


def shard_rows(n: int, chunk_rows: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows [start, stop) of shard I of N: a contiguous run of whole chunks, so no two shards
    ever write the same chunk file."""
    index, count = shard
    chunks = -(-n // chunk_rows)
    return min(n, index * chunks // count * chunk_rows), min(n, (index + 1) * chunks // count * chunk_rows)


def shard_node(node: str, shard: tuple[int, int]) -> str:
    """Where one shard records its progress: its own group, so shards never write one file."""
    return f"{node}/.shard-{shard[0]}-of-{shard[1]}"


def extract_split(
    store: Store,
    spec: BackboneSpec,
    weights: str | None,
    data: ImageDataset,
    split: str,
    role: str,
    source: str,
    model: LazyModel,
    layers: tuple[str, ...],
    batch_size: int = 128,
    dtype: str = "float16",
    workers: int = 0,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
    shard: tuple[int, int] | None = None,
    featmap_pool: int | None = None,
    perturbs: tuple = (),
    verify_content: bool = False,
) -> ExtractResult:
    """Extract one split (or find it already done). See the module docstring.

    ``shard=(I, N)``: compute only shard I's whole chunks of the rows; N processes (on one or
    many machines sharing the store's file system) write disjoint chunk files of the same
    arrays. Each shard resumes on its own; the shard that finds every shard done marks the
    split complete, so no coordinator is needed.

    ``featmap_pool=G`` average-pools the ``featmap`` layer to G x G (recorded in the layer's
    attributes and the fingerprint). ``perturbs`` (``oodcli.perturb.Perturbation``) add one
    layer each, the network's output on the perturbed input (``logits@odin``, ...).

    ``verify_content`` hashes the images' bytes (``ImageDataset.content_hash``): recorded with
    the split, compared on every later verified run, a cache hit only when they are the same.
    """
    t0 = time.perf_counter()
    n = len(data)
    if n == 0:
        raise OodError(f"split '{split}' has no samples ({data.name}); check the data source")
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype '{dtype}'; use float16 or float32")
    here = tuple(p for p in perturbs if p.applies_to(split))
    this_model = model_id(spec, weights)
    perturbed = {p.layer: _perturb_attrs(store, spec.name, p, this_model) for p in here}
    parts = fingerprint_parts(spec, weights, data, split, layers, dtype, featmap_pool, perturbed)
    fingerprint = digest(parts)
    node = features_node(split, spec.name)
    all_layers = tuple(layers) + tuple(perturbed)

    source_notes: list[str] = []  # what the source's check of the images found worth saying
    with store.setup():  # sharded: one shard at a time changes the tree
        same_data = split_is_whole(store, split) and store.node_attrs(split_node(split)).get("data") == data.identity()
        if split_is_whole(store, split) and not same_data and not overwrite:  # refused before any work
            check_replacing(split, store.node_attrs(split_node(split)).get("few_shot"), getattr(data, "few_shot", None))
        start, fresh = 0, True
        if same_data and store.exists(node):
            attrs = store.node_attrs(node)
            if attrs.get("fingerprint") == fingerprint:
                if attrs.get("complete"):
                    if verify_content:
                        _verify_content(store, split, data)
                    return ExtractResult(split, spec.name, "cached", n, 0, time.perf_counter() - t0, list(all_layers))
                _check_sharding(split, attrs, shard, overwrite)
                start, fresh = (0, True) if overwrite and attrs.get("shards") != (shard and shard[1]) \
                    else (int(attrs.get("rows_done", 0)), False)
            elif attrs.get("fingerprint") is not None and not overwrite:
                held = set(attrs.get("layers") or [])
                if attrs.get("complete") and not here and _same_but_layers(attrs.get("parts", {}), parts):
                    if set(layers) <= held:  # a subset of what the split holds: nothing to compute
                        if verify_content:
                            _verify_content(store, split, data)
                        return ExtractResult(split, spec.name, "cached", n, 0, time.perf_counter() - t0, list(layers))
                    if shard is None:
                        return _add_layers(store, spec, weights, data, split, model, attrs, layers, dtype,
                                           batch_size, workers, featmap_pool, progress, t0)
                raise OodError(
                    f"split '{split}' already has '{spec.name}' features made differently "
                    f"({_describe_mismatch(attrs.get('parts', {}), parts)}); "
                    "pass --overwrite to replace them, or --as NAME to keep both side by side"
                )
        if shard is None:
            check_readable(data, split, start)  # refuse before writing: an unreadable image never leaves half a split
            source_notes = data.notes() if hasattr(data, "notes") else []
        net = model.get()  # bad weights fail here, before the split is written
        if "featmap" in layers:  # a pooling grid too large for this map is refused before writing
            featmap_shape(tuple(net.layer_shapes["featmap"]), featmap_pool, spec.name)
        prepare_split(store, split, role, source, data, overwrite)
        if verify_content:
            _verify_content(store, split, data)
        if fresh:  # the node appears whole (arrays allocated, fingerprint, rows_done 0) or not at all
            shapes = {layer: tuple(net.layer_shapes[layer]) for layer in layers}
            if "featmap" in shapes:
                shapes["featmap"] = featmap_shape(shapes["featmap"], featmap_pool, spec.name)
            shapes |= {p.layer: tuple(net.layer_shapes[p.base]) for p in here}
            rows = chunk_rows or min(chunk_rows_for(s, DTYPES[dtype]) for s in shapes.values())
            rows = max(batch_size, rows // batch_size * batch_size)  # whole batches per chunk
            with store.transaction() as txn:
                staged = txn.stage(node)
                for layer, shape in shapes.items():
                    store.create_array(f"{staged}/{layer}", (n, *shape), DTYPES[dtype], chunk_rows=rows,
                                       attrs=_layer_attrs(layer, net, featmap_pool, perturbed))
                store.set_attrs(
                    staged,
                    fingerprint=fingerprint,
                    parts=parts,
                    model_id=this_model,
                    weights_source=weights_source(weights),
                    model_source=getattr(spec, "rebuild", None),  # SOURCE:NAME models: how to name them again
                    activation=spec.activation,
                    layers=list(layers),
                    perturbed=perturbed,
                    layer_shapes={k: list(v) for k, v in shapes.items()},
                    chunk_rows=rows,
                    rows_done=0,
                    nonfinite_rows=0,
                    complete=False,
                    shards=shard[1] if shard else None,
                    oodcli_version=__version__,
                )
                _stage_backbone(store, txn, spec, weights, net)
                for dependent in split_dependents(store, split):  # scores and gradients of the features replaced
                    if store.node_attrs(dependent).get("backbone") == spec.name:
                        txn.remove(dependent)
        attrs = store.node_attrs(node)
        rows = int(attrs["chunk_rows"])
        lo, hi, marker = 0, n, node
        if shard is not None:
            lo, hi = shard_rows(n, rows, shard)
            marker = shard_node(node, shard)
            if not store.exists(marker):  # appears with its attributes or not at all
                with store.transaction() as txn:
                    staged = txn.stage(marker, internal=True)
                    store.require_group(staged)
                    store.set_attrs(staged, start=lo, stop=hi, rows_done=lo, nonfinite_rows=0, complete=False)
            mattrs = store.node_attrs(marker)
            start = int(mattrs["rows_done"])
            if mattrs.get("complete"):
                _finish_shards(store, node, shard[1], n)
                return ExtractResult(split, spec.name, "cached", n, 0, time.perf_counter() - t0, list(all_layers))
            check_readable(data, split, start, hi)
    status = "resumed" if start > lo else "extracted"
    done_before = int(store.node_attrs(marker).get("nonfinite_rows", 0))

    import torch  # here, not at the top: a cache hit never imports it

    device = next(net.parameters()).device
    loader = torch.utils.data.DataLoader(
        TransformedDataset(data, spec.preprocess.to_transform(), np.arange(start, hi)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    advance = progress(split if shard is None else f"{split} [{shard[0]}/{shard[1]}]", hi - lo, start - lo) \
        if progress else (lambda k: None)
    steps = {}
    if here:
        from oodcli.perturb import fit_reference, make_steps

        references = {p.layer: fit_reference(store, spec.name, p.params["train"], this_model)
                      for p in here if p.kind == "mahalanobis"}
        steps = make_steps(here, net, spec.preprocess.std, references)
    pool = featmap_pool if "featmap" in layers else None
    writer = _ChunkWriter(store, node, all_layers, start, rows, DTYPES[dtype], advance, done_before, marker)
    writer.start()
    try:
        for images, _ in loader:
            x = images.to(device, non_blocking=True)
            out = forward_batch(net, x, layers, pool)
            for layer, step in steps.items():  # needs the input gradient: outside inference mode, in float32
                out[layer] = step(x)
            writer.put({k: v.float().cpu().numpy() for k, v in out.items()})
        writer.put("end")
    finally:
        if writer.is_alive() and writer.error is None:
            writer.put("stop")  # interrupted: finish the whole chunks in hand, then stop
        writer.join()
    if writer.error is not None:
        raise writer.error
    if writer.rows_done != hi:
        raise OodError(f"extraction of '{split}' stopped at row {writer.rows_done} of {hi}; re-run to resume")
    store.set_attrs(marker, complete=True, nonfinite_rows=writer.nonfinite_rows)
    if shard is not None:
        _finish_shards(store, node, shard[1], n)
    return ExtractResult(split, spec.name, status, n, hi - start, time.perf_counter() - t0, list(all_layers),
                         source_notes + writer.notes)


def _verify_content(store: Store, split: str, data: ImageDataset) -> None:
    """Compare the images' bytes with the hash recorded for the split (record it if there is none)."""
    now = data.content_hash()
    if now is None:
        return
    node = split_node(split)
    recorded = store.node_attrs(node).get("content")
    if recorded is not None and recorded != now:
        raise OodError(f"the images of split '{split}' changed since they were extracted (their bytes differ, though "
                       "names, sizes and times do not); re-extract it with --overwrite")
    if recorded is None:
        store.set_attrs(node, content=now)


def _same_but_layers(old: dict, new: dict) -> bool:
    """Whether two fingerprints' parts differ at most in the layers (and the featmap pooling of a
    featmap only one side holds): the same data, model, preprocessing and dtype."""
    old, new = _plain(old), _plain(new)
    rest = lambda p: {k: v for k, v in p.items() if k not in ("layers", "featmap_pool")}  # noqa: E731
    if rest(old) != rest(new):
        return False
    both = "featmap" in old.get("layers", []) and "featmap" in new.get("layers", [])
    return not both or old.get("featmap_pool") == new.get("featmap_pool")


def _add_layers(store: Store, spec: BackboneSpec, weights: str | None, data: ImageDataset, split: str, model: LazyModel,
                attrs: dict, layers: tuple[str, ...], dtype: str, batch_size: int, workers: int,
                featmap_pool: int | None, progress, t0: float) -> ExtractResult:
    """More layers for a complete split made by the same model from the same data: one pass that
    computes only the missing layers and adds them beside the ones kept, in one transaction (they
    appear whole or not at all); the node's fingerprint becomes that of all its layers."""
    import torch

    node = features_node(split, spec.name)
    held = list(attrs.get("layers") or [])
    missing = tuple(layer for layer in layers if layer not in held)
    union = sorted(set(held) | set(missing))
    pool = featmap_pool if "featmap" in missing else attrs.get("parts", {}).get("featmap_pool")
    n = len(data)
    check_readable(data, split)
    net = model.get()
    shapes = {layer: tuple(net.layer_shapes[layer]) for layer in missing}
    if "featmap" in shapes:
        shapes["featmap"] = featmap_shape(shapes["featmap"], pool, spec.name)
    rows = int(attrs.get("chunk_rows") or chunk_rows_for(next(iter(shapes.values())), DTYPES[dtype]))
    device = next(net.parameters()).device
    loader = torch.utils.data.DataLoader(TransformedDataset(data, spec.preprocess.to_transform()), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    advance = progress(f"{split} (+{','.join(missing)})", n, 0) if progress else (lambda k: None)
    bad = np.zeros(n, dtype=bool)
    with store.transaction() as txn:
        staged = {layer: txn.stage(f"{node}/{layer}") for layer in missing}
        for layer, shape in shapes.items():
            store.create_array(staged[layer], (n, *shape), DTYPES[dtype], chunk_rows=rows,
                               attrs=_layer_attrs(layer, net, pool, {}))
        start = 0
        for images, _ in loader:
            out = forward_batch(net, images.to(device, non_blocking=True), missing, pool)
            for layer in missing:
                block = out[layer].float().cpu().numpy()
                bad[start : start + len(block)] |= ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                store.write_rows(staged[layer], start, block.astype(DTYPES[dtype]))
            start += len(images)
            advance(len(images))
    if attrs.get("nonfinite_rows"):  # rows already flagged by the layers kept count once
        for layer in held:
            for lo, block in store.iter_rows(f"{node}/{layer}"):
                bad[lo : lo + len(block)] |= ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    parts = fingerprint_parts(spec, weights, data, split, union, dtype, pool)
    store.set_attrs(node, fingerprint=digest(parts), parts=parts, layers=union, nonfinite_rows=int(bad.sum()),
                    layer_shapes={**(attrs.get("layer_shapes") or {}), **{k: list(v) for k, v in shapes.items()}})
    return ExtractResult(split, spec.name, "extended", n, n, time.perf_counter() - t0, list(layers))


def _perturb_attrs(store: Store, backbone: str, p, this_model: str) -> dict:
    """A perturbation's settings as recorded (attributes and fingerprint); a Mahalanobis one
    also names the train features its Gaussian comes from."""
    attrs = p.describe()
    if p.kind == "mahalanobis":
        from oodcli.perturb import check_reference, reference_fingerprint

        check_reference(store, store.path, (p,), backbone, this_model, [])

        attrs["train_fingerprint"] = reference_fingerprint(store, backbone, p.params["train"])
    return attrs


def _layer_attrs(layer: str, net, featmap_pool: int | None, perturbed: dict) -> dict | None:
    if layer == "featmap":
        return {"layout": "NCHW", "pool": featmap_pool, "map_shape": list(net.layer_shapes["featmap"]),
                "pooling": "none" if featmap_pool is None else f"adaptive average to {featmap_pool}x{featmap_pool}"}
    return dict(perturbed[layer]) if layer in perturbed else None


def _check_sharding(split: str, attrs: dict, shard: tuple[int, int] | None, overwrite: bool) -> None:
    """A half-done split goes on the way it started: in the same number of shards, or unsharded."""
    started = attrs.get("shards")
    now = shard[1] if shard else None
    if started == now or overwrite:
        return
    if started is None:
        raise OodError(f"split '{split}' was started without --shard ({attrs.get('rows_done', 0)} rows done); "
                       "finish it without --shard, or pass --overwrite to start over in shards")
    raise OodError(f"split '{split}' is being extracted in {started} shards; run the missing ones with "
                   f"--shard I/{started} (I = 0..{started - 1}), or pass --overwrite to start over")


def _finish_shards(store: Store, node: str, count: int, n: int) -> None:
    """Mark the split complete once every shard is: whichever shard sees it first (all of them
    write their own marker before looking, so the last one to finish always sees it)."""
    markers = [store.node_attrs(shard_node(node, (i, count))) if store.exists(shard_node(node, (i, count))) else {}
               for i in range(count)]
    if all(m.get("complete") for m in markers):
        store.set_attrs(node, rows_done=n, nonfinite_rows=sum(int(m.get("nonfinite_rows", 0)) for m in markers),
                        complete=True)


def check_readable(data: ImageDataset, split: str, start: int = 0, stop: int | None = None) -> None:
    """Decode every image of rows [start, stop) before anything is written (file-based sources
    only; see ``ImageDataset.unreadable``): a corrupt file is refused in one line naming it."""
    bad = data.unreadable(start, stop)
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise OodError(
            f"split '{split}': image {path} cannot be read ({reason}){more}; nothing was written for it: "
            "fix or remove the file(s) and run again"
        )


def _stage_backbone(store: Store, txn, spec: BackboneSpec, weights: str | None, net: Backbone) -> None:
    """Keep what the backbone offers scorers besides its layers under backbones/<name>/: the
    classifier head (ReAct, ASH, ViM) and ``Backbone.extras`` (e.g. APEX prototypes), replaced
    whole when the weights change."""
    head, extras = net.head(), net.extras() or {}
    if head is None and not extras:
        return
    node = f"backbones/{spec.name}"
    identity = spec.weights_identity(weights)
    keys = (["head/weight", "head/bias"] if head is not None else []) + list(extras)
    if store.exists(node) and store.node_attrs(node).get("weights") == identity \
            and all(store.is_array(f"{node}/{key}") for key in keys):
        return
    staged = txn.stage(node)
    store.require_group(staged)
    if head is not None:
        weight, bias = (t.detach().float().cpu().numpy() for t in head)
        store.write_array(f"{staged}/head/weight", weight)
        store.write_array(f"{staged}/head/bias", bias)
    for key, value in extras.items():
        store.write_array(f"{staged}/{key}", np.asarray(value))
    store.set_attrs(staged, weights=identity, model_id=model_id(spec, weights))
