"""Text prototypes for the CLIP scorers: class names through prompt templates, encoded once.

Prompts must go through the text tower of the very CLIP that made the image features,
so the backbone is rebuilt from the store's ``weights_source`` and has to hash to the
weights identity recorded beside the features. The L2-normalised prototypes are cached
under ``fitted/text/<backbone>/<label set>/<templates>``, keyed by the weights, the
names and the templates; a later run reads them without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.store import Store, digest, features_node, list_backbones, list_splits

DATA_DIR = Path(__file__).parent / "data"
TEXT_ROOT = "fitted/text"
ENCODE_BATCH = 256


def _read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def imagenet_clip_names() -> list[str]:
    """The 1000 ImageNet-1K class names as cleaned by CLIP's authors for prompting
    (e.g. 'kite (bird of prey)', 'crane bird'), in label order."""
    return _read_lines(DATA_DIR / "imagenet_clip_classes.txt")


#: named template sets; any other value with a '{}' is one literal template
TEMPLATE_SETS = {
    "photo": lambda: ("a photo of a {}.",),
    "ensemble": lambda: tuple(_read_lines(DATA_DIR / "clip_imagenet_templates.txt")),  # CLIP's 80 ImageNet prompts
}


def templates_for(spec: str) -> tuple[str, ...]:
    """'photo', 'ensemble' (CLIP's 80 ImageNet templates) or a literal template with '{}'."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]()
    if isinstance(spec, str) and spec.count("{}") == 1:
        return (spec,)
    raise UsageError(
        f"unknown prompt templates '{spec}'; use photo, ensemble or one template with '{{}}' (e.g. 'a photo of a {{}}.')"
    )


def template_key(spec: str) -> str:
    """A node name for a template choice: the set's name, or a digest of a literal template."""
    return spec if spec in TEMPLATE_SETS else "t-" + digest(spec)[:10]


# ---- class names ------------------------------------------------------------------------


def label_set(store: Store, labels: str | None = None) -> tuple[str, list[str]]:
    """(name, class names) for prompts: a names file (one per line) or the store's benchmark."""
    if labels:
        path = Path(labels).expanduser()
        if not path.is_file():
            raise OodError(f"class names file {path} not found; give one class name per line, in label order")
        names = _read_lines(path)
        if not names:
            raise OodError(f"class names file {path} is empty")
        return f"labels-{path.stem}", names
    bench = store.attrs.get("benchmark")
    if not bench:
        from oodcli.store import list_splits, split_node

        for split in ["train", *list_splits(store)]:  # class folders recorded with an ID split
            node = split_node(split)
            if store.exists(node) and store.node_attrs(node).get("class_names"):
                return f"folders-{split.replace('/', '-')}", list(store.node_attrs(node)["class_names"])
        raise OodError(
            f"store {store.path} names no benchmark, so the class names are unknown; "
            "pass a file with one name per line: --param METHOD.labels=FILE"
        )
    from oodcli.data.benchmarks import get_benchmark

    names = get_benchmark(bench).resolve_prompt_names()
    if not names:
        raise OodError(f"benchmark '{bench}' ships no class names; pass --param METHOD.labels=FILE")
    return bench, names


# ---- the CLIP behind a store's features -----------------------------------------------------


@dataclass(frozen=True)
class ClipSource:
    """How to get back the CLIP that made a store's features."""

    backbone: str
    weights: str | None  # the recorded weights_source: a path, a pretrained tag, or None (default)
    identity: str  # the weights identity recorded in the features' fingerprint parts
    model_id: str | None
    dim: int  # width of the image embeddings
    #: SOURCE:NAME models (open_clip:...): how extract named the model, to name it again
    model_source: dict | None = None


def _spec(backbone: str, weights: str | None = None, model_source: dict | None = None):
    """The spec of a store's CLIP: a built-in by its name, an open_clip model (or one stored with
    ``extract --as``) as extract named it."""
    from oodcli.backbones.base import get_spec
    from oodcli.backbones.spec import spec_as_recorded

    if model_source:
        return spec_as_recorded(model_source, weights)
    return get_spec(backbone)


def clip_source(store: Store, backbone: str, model_id: str | None = None) -> ClipSource:
    """Read where the features' CLIP came from (any complete split with that model)."""
    from oodcli.backbones.sources import source_of

    source = source_of(backbone)
    if (source is None and _spec(backbone).family != "clip") or source not in (None, "open_clip"):
        raise UsageError(f"this method needs CLIP features, and '{backbone}' is not a CLIP model")
    lacking = None
    for split in list_splits(store):
        if backbone not in list_backbones(store, split):
            continue
        node = features_node(split, backbone)
        attrs = store.node_attrs(node)
        if not attrs.get("complete") or (model_id is not None and attrs.get("model_id") != model_id):
            continue
        if "weights" not in attrs.get("parts", {}):
            raise OodError(f"the '{backbone}' features of split '{split}' do not say which weights made them; re-extract them")
        if not store.is_array(f"{node}/image_embeds"):
            lacking = split
            continue
        shape = store.shape(f"{node}/image_embeds")[1:]
        return ClipSource(
            backbone, attrs.get("weights_source"), attrs["parts"]["weights"], attrs.get("model_id"), int(shape[-1]),
            attrs.get("model_source"),
        )
    if lacking is not None:
        raise OodError(
            f"the '{backbone}' features in {store.path} have no image_embeds (split '{lacking}'); make them with "
            f"'oodcli extract --model {backbone} --layers image_embeds --split {lacking} --store {store.path} --overwrite'"
        )
    raise OodError(f"store {store.path} has no complete '{backbone}' features; run 'oodcli extract --model {backbone}'")


def build_text_tower(source: ClipSource):
    """The text tower of the CLIP of ``source`` (never its image encoder), refusing weights
    that are not the ones that made the features."""
    import torch

    where = source.weights or (source.model_source or {}).get("model")
    try:
        spec = _spec(source.backbone, source.weights, source.model_source)
    except OodError as exc:  # a file named in an open_clip:...@FILE model, or its folder, is gone
        raise OodError(f"the CLIP that made these features ({where}) cannot be named again ({exc}); put its "
                       "files back or re-extract the store") from None
    where = source.weights or spec.default_weights or where
    if where and Path(where).is_absolute() and not Path(where).exists():
        raise OodError(
            f"the CLIP weights that made these features ({where}) are gone; put them back there "
            "or re-extract the store with the weights you have"
        )
    now = spec.weights_identity(source.weights)
    if now != source.identity:
        raise OodError(
            f"text prototypes would come from another CLIP than the image features: the weights at {where} "
            f"are '{now}', the features were made with '{source.identity}'; re-extract with these weights"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return spec.build_text(source.weights).to(device)


class TextEncoder:
    """Builds the store's CLIP text tower on first use only, so cache hits never pay for it."""

    def __init__(self, source: ClipSource):
        self.source = source
        self._model = None

    def __call__(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """L2-normalised float32 embeddings [len(texts), D], in batches."""
        import torch

        if self._model is None:
            self._model = build_text_tower(self.source)
        out = []
        threads = torch.get_num_threads()
        if self._model.width <= 128:
            torch.set_num_threads(1)  # a tiny text tower's ops are too small to split; threads only spin
        try:
            with torch.inference_mode():
                for i in range(0, len(texts), ENCODE_BATCH):
                    batch = texts[i : i + ENCODE_BATCH]
                    out.append(self._model.encode_text(batch).cpu().numpy().astype(np.float32))
                    if progress:
                        progress(len(batch))
        finally:
            torch.set_num_threads(threads)
        emb = np.concatenate(out) if out else np.zeros((0, self.source.dim), np.float32)
        if emb.shape[1] != self.source.dim:
            raise OodError(
                f"text embeddings have {emb.shape[1]} dimensions but the image features {self.source.dim}; "
                "they come from different CLIP models"
            )
        return emb


def encode_prompts(encode: TextEncoder, names: list[str], templates: tuple[str, ...], progress=None) -> np.ndarray:
    """One prototype per class: the normalised mean of its normalised template embeddings (CLIP's ensembling)."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = encode(prompts, progress).reshape(len(names), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


# ---- the cache ------------------------------------------------------------------------------


def text_node(backbone: str, label_set_name: str, leaf: str) -> str:
    return f"{TEXT_ROOT}/{backbone}/{label_set_name}/{leaf}"


def read_cached(store: Store, node: str, key: dict) -> tuple[np.ndarray, dict] | None:
    """The cached embeddings at ``node`` (and their attrs) if they were made from ``key``."""
    if not store.is_array(f"{node}/embeds"):
        return None
    attrs = store.node_attrs(node)
    if not attrs.get("complete") or attrs.get("key") != digest(key):
        return None
    return store.read(f"{node}/embeds").astype(np.float32), attrs


def write_cached(store: Store, node: str, key: dict, embeds: np.ndarray, **info) -> None:
    """Embeddings and their key land together (one transaction), so an interrupted write is never read back."""
    with store.transaction() as txn:
        staged = txn.stage(node)
        store.require_group(staged)
        store.write_array(f"{staged}/embeds", np.asarray(embeds, np.float32))
        store.set_attrs(staged, key=digest(key), **key, **info, complete=True)


def class_prototypes(
    store: Store,
    source: ClipSource,
    encode: TextEncoder,
    labels: str | None,
    templates: str,
    progress=None,
) -> tuple[np.ndarray, str, list[str], bool]:
    """(prototypes [C, D], label set name, class names, cache hit) for the store's classes and ``templates``."""
    name, names = label_set(store, labels)
    prompts = templates_for(templates)
    key = {"weights": source.identity, "names": digest(names), "templates": list(prompts)}
    node = text_node(source.backbone, name, template_key(templates))
    hit = read_cached(store, node, key)
    if hit is not None:
        return hit[0], name, names, True
    advance = progress(f"text: encode {len(names) * len(prompts)} prompts", len(names) * len(prompts)) if progress else None
    protos = encode_prompts(encode, names, prompts, advance)
    write_cached(store, node, key, protos, class_names=names)
    return protos, name, names, False
