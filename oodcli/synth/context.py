"""SynOOD's context labels (paper 003, eq. 3): p_con = phi(x_in, p_in).

SynOOD inpaints each ID image with a prompt made of the labels of the image's elements
other than its main object ("bamboo, tourist, leaf, railing" for a panda), produced by
an MLLM (LLaVA in the paper). ``context_labels`` returns {image id -> [labels]} for a
split of the store, from one of three providers, and names the provider:

- ``llava``: the paper's reading. LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` by default, or
  a local folder) looks at each image, read again from the data source the split
  records, and is asked for short comma-separated labels of every element except the
  named class; the answer is split into labels.
- ``clip``: a cheap stand-in needing no MLLM: CLIP zero-shot over the shipped WordNet
  nouns ("a photo of a {}."), using the split's stored ``image_embeds`` (no image
  encoder runs); the top-k nouns per image, without the nouns naming an ID class and,
  for each image, without parts of its own class name ('panda' for a giant panda). The nouns'
  text features are encoded once and cached under ``fitted/text/<backbone>/wordnet-nouns``.
- a JSON-lines file: ``{"id": <splits/<split>/ids value>, "labels": [...]}`` per image,
  e.g. from an MLLM run elsewhere; a header line ``{"context_labels": {...}}`` is skipped.

Ids are the split's ``ids`` (an image's position in its source data set), so the labels
stay with their image whatever rows are selected. ``per_class`` takes N images per class
by the rule of D_in* and of ``synthesize synood``'s sources (``pick="complex"``: the most
complex by JPEG bytes per pixel, read from the split's recorded data source), so the labels
cover exactly the images SynOOD inpaints; ``pick="random"`` draws them with ``seed`` instead
(needs no image files).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodcli import negatives, text
from oodcli.errors import OodError, UsageError
from oodcli.store import Store, digest, features_node, list_backbones, list_splits, split_node

CLIP_TEMPLATE = "a photo of a {}."
VOCABULARY_SET = "wordnet-nouns"  # the label-set name of the nouns' cached text features
LLAVA_DEFAULT = "llava-hf/llava-1.5-7b-hf"
ROWS_PER_BLOCK = 256  # clip: image rows scored against the whole vocabulary at once
_TOKENS = re.compile(r"[a-z0-9]+")


@dataclass
class ContextLabels:
    """The labels per image id, the provider that made them, and which images."""

    split: str
    provider: str
    labels: dict[int, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        counts = [len(v) for v in self.labels.values()]
        return {"split": self.split, "provider": self.provider, "images": len(self.labels),
                "labels_per_image": float(np.mean(counts)) if counts else 0.0, "seconds": round(self.seconds, 3)}

    def write_jsonl(self, path: Path) -> Path:
        """One header line, then {"id", "labels"} per image; atomically."""
        from oodcli.outputs import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"context_labels": {k: v for k, v in self.summary().items() if k != "seconds"}}) + "\n")
                for i, labels in self.labels.items():
                    f.write(json.dumps({"id": int(i), "labels": labels}) + "\n")

        return atomic_write(Path(path), write)


# ---- which images and which names ---------------------------------------------------------


def _tokens(s: str) -> tuple[str, ...]:
    return tuple(_TOKENS.findall(s.lower()))


def _runs(tokens: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every contiguous run of words of ``tokens``."""
    return {tokens[i:j] for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)}


def names_class(class_names: list[str]):
    """A test ``word -> bool``: does the word contain an ID class name as whole words
    ('giant panda' for the class 'panda')? Such words are no context of any image. Whole
    words, so 'one' does not take out 'money' or 'bone'; set lookups, so 67k nouns against
    ImageNet's 1000 names stay fast."""
    names = {t for t in map(_tokens, class_names) if t}
    return lambda word: bool(_runs(_tokens(word)) & names)


def is_main_object(word: str, class_name: str) -> bool:
    """Does ``word`` name the image's own class: contain its name, or be a run of its words
    ('panda' for a 'giant panda' image; 'ball' for a 'soccer ball', but only there)?"""
    w, c = _tokens(word), _tokens(class_name)
    return bool(w) and bool(c) and (c in _runs(w) or w in _runs(c))


def _own_class_words(words: list[str], class_names: list[str]) -> dict[int, np.ndarray]:
    """Per class, the indices of ``words`` that are a run of its name's words (banned for its images only)."""
    index: dict[tuple[str, ...], list[int]] = {}
    for j, w in enumerate(words):
        index.setdefault(_tokens(w), []).append(j)
    return {c: np.array(sorted(j for r in _runs(_tokens(n)) for j in index.get(r, ())), dtype=np.int64)
            for c, n in enumerate(class_names)}


def per_class_rows(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Every row, or up to ``per_class`` rows of each class drawn with ``seed``; sorted."""
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 1:
        raise UsageError(f"--per-class must be at least 1, not {per_class}")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(rows, min(per_class, len(rows)), replace=False)
              for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def complex_per_class_rows(store: Store, split: str, labels: np.ndarray, ids: np.ndarray, per_class: int,
                           data_root_dir: str | None = None) -> np.ndarray:
    """``synthesize synood``'s sources: D_in*'s complexity rule with m = per_class x classes."""
    from oodcli.data.base import data_root, open_source
    from oodcli.synth.synood import source_rows

    if per_class < 1:
        raise UsageError(f"--per-class must be at least 1, not {per_class}")
    attrs = store.node_attrs(split_node(split))
    if "source" not in attrs:
        raise OodError(f"split '{split}' records no data source to measure its images' complexity; use --pick random")
    data = open_source(attrs["source"], data_root(data_root_dir), is_ood=False)
    if data.identity() != attrs.get("data"):
        raise OodError(f"the images at {attrs['source']} are not the ones split '{split}' was extracted from; check --data-root")
    return source_rows(data, ids, labels, per_class)


def _split_rows(store: Store, split: str, per_class: int | None, seed: int, names: list[str], pick: str = "complex",
                data_root_dir: str | None = None):
    """(rows, ids, labels) of the chosen images of an ID split."""
    if split not in list_splits(store):
        raise OodError(f"store {store.path} has no split '{split}'; extract it first (oodcli extract --split {split})")
    labels = store.read(f"{split_node(split)}/labels")
    ids = store.read(f"{split_node(split)}/ids")
    if (labels < 0).any():
        raise OodError(f"split '{split}' holds OOD rows (label -1); context labels are made for ID images")
    if labels.size and int(labels.max()) >= len(names):
        raise OodError(f"split '{split}' has labels beyond the {len(names)} class names of the label set")
    if pick not in ("complex", "random"):
        raise UsageError(f"unknown --pick '{pick}'; use complex or random")
    if per_class is not None and pick == "complex":
        rows = complex_per_class_rows(store, split, labels, ids, per_class, data_root_dir)
    else:
        rows = per_class_rows(labels, per_class, seed)
    return rows, ids[rows], labels[rows]


# ---- providers ------------------------------------------------------------------------------


def from_file(path: Path) -> tuple[dict[int, list[str]], str]:
    """{id -> labels} from JSON lines {"id", "labels"} (checked against the split by ``_check_file_ids``)."""
    path = Path(path)
    if not path.is_file():
        raise OodError(f"context labels file {path} not found; give JSON lines {{\"id\": ..., \"labels\": [...]}}")
    found: dict[int, list[str]] = {}
    made_by = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "context_labels" in rec:
                    made_by = rec["context_labels"].get("provider")
                    continue
                i, labels = int(rec["id"]), rec["labels"]
                if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                    raise ValueError
            except (ValueError, KeyError, TypeError, AttributeError):
                raise OodError(
                    f"{path} line {n} is not {{\"id\": <int>, \"labels\": [\"...\", ...]}}: {line.strip()[:80]}"
                ) from None
            found[i] = [x.strip() for x in labels if x.strip()]
    return found, f"file:{path.resolve()}" + (f" (made by {made_by})" if made_by else "")


def _check_file_ids(found: dict[int, list[str]], all_ids: np.ndarray, chosen: np.ndarray, path, split: str):
    """Every id in the file must be one of the split's, and every chosen image must have labels."""
    unknown = sorted(set(found) - set(all_ids.tolist()))
    if unknown:
        few = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise OodError(f"{path} has {len(unknown)} id(s) not in split '{split}' (e.g. {few}); "
                       f"ids are the values of splits/{split}/ids")
    missing = [int(i) for i in chosen if int(i) not in found]
    if missing:
        raise OodError(f"{len(missing)} of the {len(chosen)} chosen images of split '{split}' have no labels in {path} "
                       f"(e.g. id {missing[0]}); label them or narrow the choice with --per-class")
    return {int(i): found[int(i)] for i in chosen}


def clip_vocabulary() -> negatives.Vocabulary:
    """The candidate words of the clip provider: the shipped WordNet nouns (the same on every machine)."""
    return negatives.shipped_vocabulary()


def vocabulary_features(store: Store, source: text.ClipSource, nouns: list[str], progress=None) -> tuple[np.ndarray, bool]:
    """(text features [V, D] of the nouns, cache hit): encoded once per CLIP weights and cached."""
    key = {"weights": source.identity, "names": digest(nouns), "templates": [CLIP_TEMPLATE]}
    node = text.text_node(source.backbone, VOCABULARY_SET, text.template_key("photo"))
    hit = text.read_cached(store, node, key)
    if hit is not None:
        return hit[0], True
    advance = progress(f"context: encode {len(nouns)} WordNet nouns", len(nouns)) if progress else None
    emb = text.encode_prompts(text.TextEncoder(source), nouns, (CLIP_TEMPLATE,), advance)
    text.write_cached(store, node, key, emb, words=len(nouns))
    return emb, False


def top_k_words(image_embeds: np.ndarray, word_feats: np.ndarray, allowed: np.ndarray, k: int,
                banned: list[np.ndarray] | None = None) -> np.ndarray:
    """[N, k] indices of the k words of highest cosine similarity per image, best first, among
    the ``allowed`` ones and without each row's ``banned`` indices."""
    x = image_embeds.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ word_feats.T
    sims[:, ~allowed] = -np.inf
    for row, cols in enumerate(banned or ()):
        sims[row, cols] = -np.inf
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def from_clip(store: Store, split: str, backbone: str, rows: np.ndarray, classes: np.ndarray, class_names: list[str],
              top_k: int, progress=None) -> tuple[list[list[str]], str]:
    """Top-k WordNet nouns per chosen row by CLIP similarity of its stored image embedding."""
    from oodcli.train.prompts import read_rows

    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {top_k}")
    node = features_node(split, backbone)
    if backbone not in list_backbones(store, split) or not store.is_array(f"{node}/image_embeds"):
        raise OodError(f"split '{split}' has no '{backbone}' image_embeds; make them with 'oodcli extract --model "
                       f"{backbone} --layers image_embeds --split {split} --store {store.path}'")
    source = text.clip_source(store, backbone, store.node_attrs(node).get("model_id"))
    vocab = clip_vocabulary()
    is_class = names_class(class_names)
    allowed = np.array([not is_class(w) for w in vocab.nouns])
    own = _own_class_words(vocab.nouns, class_names)
    fewest = min((int(allowed.sum() - allowed[own[int(c)]].sum()) for c in np.unique(classes)), default=top_k)
    if fewest < top_k:
        raise UsageError(f"--top-k {top_k} exceeds the {fewest} vocabulary nouns left for some class once class names are out")
    feats, hit = vocabulary_features(store, source, vocab.nouns, progress)
    out: list[list[str]] = []
    advance = progress(f"context: top-{top_k} nouns", len(rows)) if progress else None
    for i in range(0, len(rows), ROWS_PER_BLOCK):
        block = rows[i : i + ROWS_PER_BLOCK]
        banned = [own[int(c)] for c in classes[i : i + ROWS_PER_BLOCK]]
        picks = top_k_words(read_rows(store, f"{node}/image_embeds", block, split), feats, allowed, top_k, banned)
        out += [[vocab.nouns[j] for j in p] for p in picks]
        if advance:
            advance(len(block))
    return out, (f"clip:{backbone} weights={source.identity} zero-shot top-{top_k} of {int(allowed.sum())} "
                 f"{vocab.source} nouns, '{CLIP_TEMPLATE}'")


def llava_prompt(class_name: str) -> str:
    """p_in of eq. 3: LLaVA-1.5's chat format, asking for everything but the named main object."""
    return (
        f"USER: <image>\nThe main object of this image is a {class_name}. List every other element you can see "
        f"(objects, animals, people, plants, background, scenery), not the {class_name} itself, as short labels "
        "of one or two words, separated by commas. Answer with the labels only. ASSISTANT:"
    )


def parse_labels(answer: str, class_name: str) -> list[str]:
    """An MLLM answer -> labels: split on commas, semicolons and lines; drop list markers,
    'and', trailing dots and the class itself; lower case; each label once."""
    out: list[str] = []
    for part in re.split(r"[,;\n]", answer):
        label = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", part).strip()
        label = re.sub(r"^(?:and|or)\s+", "", label, flags=re.I).strip(" .:\"'").lower()
        if label and label not in out and not is_main_object(label, class_name):
            out.append(label)
    return out


def from_llava(store: Store, split: str, ids: np.ndarray, labels: np.ndarray, class_names: list[str],
               model: str = LLAVA_DEFAULT, device: str = "auto", batch_size: int = 8, max_new_tokens: int = 64,
               data_root_dir: str | None = None, progress=None) -> tuple[list[list[str]], str]:
    """Ask LLaVA about each chosen image (read from the split's recorded data source)."""
    import torch

    from oodcli.data.base import data_root, open_source
    from oodcli.extraction import resolve_device

    dev = resolve_device(device)
    attrs = store.node_attrs(split_node(split))
    data = open_source(attrs["source"], data_root(data_root_dir), is_ood=False)
    if data.identity() != attrs.get("data"):
        raise OodError(f"the images at {attrs['source']} are not the ones split '{split}' was extracted from; check --data-root")
    try:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(model)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        net = LlavaForConditionalGeneration.from_pretrained(model, dtype=dtype).to(dev).eval()
    except OSError as exc:
        raise OodError(f"cannot load LLaVA '{model}' ({str(exc).splitlines()[0][:160]}); give a downloaded "
                       "model folder with --model or run where the Hugging Face hub is reachable") from None
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at the same place
    out: list[list[str]] = []
    advance = progress(f"context: LLaVA on {len(ids)} images", len(ids)) if progress else None
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            names = [class_names[int(c)] for c in labels[i : i + batch_size]]
            images = [data.load(int(j)).convert("RGB") for j in ids[i : i + batch_size]]
            inputs = processor(images=images, text=[llava_prompt(n) for n in names], return_tensors="pt",
                               padding=True).to(dev)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            gen = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers = processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [parse_labels(a, n) for a, n in zip(answers, names)]
            if advance:
                advance(len(images))
    return out, f"llava:{model} greedy, max_new_tokens={max_new_tokens}"


# ---- entry point ----------------------------------------------------------------------------


def context_labels(
    store: Store,
    split: str = "train",
    source: str = "clip",
    backbone: str | None = None,
    top_k: int = 5,
    per_class: int | None = None,
    seed: int = 0,
    labels_file: str | None = None,
    model: str = LLAVA_DEFAULT,
    device: str = "auto",
    batch_size: int = 8,
    data_root_dir: str | None = None,
    progress=None,
    pick: str = "complex",
) -> ContextLabels:
    """Context labels of the chosen images of ``split``: ``source`` is clip, llava or a JSON-lines file."""
    start = time.perf_counter()
    if source not in ("clip", "llava") and not Path(source).suffix and not Path(source).exists():
        raise UsageError(f"unknown --source '{source}'; use clip, llava or a JSON-lines file of labels")
    if source == "llava":
        from oodcli.extraction import check_device

        check_device(device)  # before any reading: a cuda request on a machine without one is one line
    _, names = text.label_set(store, labels_file)
    rows, ids, classes = _split_rows(store, split, per_class, seed, names, pick, data_root_dir)
    if source == "clip":
        from oodcli.scoring import default_backbone

        backbone = backbone or default_backbone(store, split)
        found, provider = from_clip(store, split, backbone, rows, classes, names, top_k, progress)
    elif source == "llava":
        found, provider = from_llava(store, split, ids, classes, names, model, device, batch_size,
                                     data_root_dir=data_root_dir, progress=progress)
    else:
        by_id, provider = from_file(Path(source))
        by_id = _check_file_ids(by_id, store.read(f"{split_node(split)}/ids"), ids, source, split)
        found = [by_id[int(i)] for i in ids]
    return ContextLabels(split, provider, {int(i): f for i, f in zip(ids, found)}, time.perf_counter() - start)
