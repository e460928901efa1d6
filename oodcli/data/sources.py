"""The source kinds a benchmark split (or ``--source``) can name.

``torchvision:NAME:SPLIT``  a torchvision data set under ``<root>/NAME`` (never downloaded here)
``folder:PATH``             an ImageFolder (class sub-folders), or a flat folder of images
``imglist:FILE[@IMAGEDIR]`` an OpenOOD image list; images under ``<root>/IMAGEDIR``
``digits:PART``             the embedded digits benchmark
``classes:LABELS:SOURCE``   the rows of SOURCE whose label is listed, relabelled 0..n-1 in listed order;
                            LABELS is a label ``N``, a range ``A-B`` (inclusive) or a comma-separated
                            list of both, e.g. ``classes:0-499:...`` or ``classes:151-170,173-268:...``

Every factory learns the labels without decoding an image, and opens images lazily.
Importing this module (``oodcli.data`` does, to register the kinds) imports no PIL: the
functions that read images import it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from oodcli.data.base import ImageDataset, register_source
from oodcli.errors import OodError, UsageError

FIX_HINT = "set --data-root / OODCLI_DATA_ROOT"


def _candidates(root: Path, path: str) -> list[Path]:
    """Where a path of a source may be: absolute as given; relative, under the data root first
    (benchmark files name paths relative to it), then from the working directory."""
    p = Path(path).expanduser()
    return [p] if p.is_absolute() else list(dict.fromkeys([root / p, Path.cwd() / p]))


def _resolve(root: Path, path: str) -> Path:
    """The first candidate that exists (else the first, for the error to name)."""
    found = _candidates(root, path)
    return next((c for c in found if c.exists()), found[0])


def _looked(root: Path, path: str) -> str:
    return " and ".join(str(c) for c in _candidates(root, path))


def _open_image(path: Path, source: str):
    """Read an image fully (so no file handle stays open) and return it unconverted."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # an animation's first frame
            return _eight_bit(img)
    except FileNotFoundError:
        raise OodError(f"image {path} of {source} not found") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying truncated or not an image
        raise OodError(f"image {path} of {source} cannot be read ({_reason(exc)}); fix or remove it") from None


def _eight_bit(img):
    """High-bit-depth images (16-bit PNG and TIFF open as 'I;16' or 'I', float TIFF as 'F')
    brought to 8 bits by their real range: PIL's RGB conversion would clip them to white."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:  # 16-bit range (32-bit 'I' from a 16-bit file holds 0..65535)
        arr = arr / (65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0) * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def decode_check(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None. JPEGs decode at 1/8 scale (``draft``): every
    byte is still parsed, so truncation shows, at a fraction of the full decode."""
    return _decode(path)[0]


def _decode(path) -> tuple[str | None, bool]:
    """(why it cannot be decoded or None, whether it is an animation: only its first frame is read)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            return None, getattr(img, "n_frames", 1) > 1
    except FileNotFoundError:
        return "not found", False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _reason(exc), False


# --- torchvision ------------------------------------------------------------------------


# name -> (torchvision class, splits as torchvision names them)
_TORCHVISION = {
    "cifar10": ("CIFAR10", ("train", "test")),
    "cifar100": ("CIFAR100", ("train", "test")),
    "svhn": ("SVHN", ("train", "test", "extra")),
    "mnist": ("MNIST", ("train", "test")),
    "fashionmnist": ("FashionMNIST", ("train", "test")),
    "dtd": ("DTD", ("train", "val", "test")),
    "places365": ("Places365", ("train-standard", "train-challenge", "val")),
}


def _tv_build(name: str, split: str, folder: Path):
    """The torchvision data set object; raises RuntimeError when its files are missing."""
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION[name][0])
    if name in ("svhn", "dtd"):
        return cls(str(folder), split=split, download=False)
    if name == "places365":
        # the 256x256 release, the one OOD work uses (a tenth of the full-size download)
        return cls(str(folder), split=split, small=True, download=False)
    return cls(str(folder), train=split == "train", download=False)


def _tv_labels(ds) -> np.ndarray:
    """Labels from the attribute each class keeps them in: no image is decoded."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64).reshape(-1)
    raise TypeError(f"no label attribute on {type(ds).__name__}")  # a bug, not a user error


class TorchvisionDataset(ImageDataset):
    def __init__(self, ds, name: str, split: str, is_ood: bool):
        self.ds = ds
        self.name = f"torchvision:{name}/{split}"
        labels = _tv_labels(ds)
        self.labels = np.full(len(labels), -1, np.int64) if is_ood else labels
        classes = getattr(ds, "classes", None)
        self.class_names = None if is_ood or classes is None else list(classes)

    def load(self, i: int):
        return self.ds[i][0]  # no transform set: the PIL image (grayscale stays grayscale)


@register_source("torchvision")
def torchvision_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    name, _, split = arg.partition(":")
    name = name.lower()
    if name not in _TORCHVISION:
        raise UsageError(f"unknown torchvision data set '{name}'; use one of: {', '.join(_TORCHVISION)}")
    title, splits = _TORCHVISION[name]
    if split not in splits:
        raise UsageError(f"torchvision:{name} has no split '{split}'; use one of: {', '.join(splits)}")
    folder = root / name
    try:
        ds = _tv_build(name, split, folder)
    except (RuntimeError, FileNotFoundError):
        raise OodError(
            f"{title} ({split}) not found under {folder}; download it with torchvision "
            f"(download=True, root={folder}) or {FIX_HINT}"
        ) from None
    return TorchvisionDataset(ds, name, split, is_ood)


# --- folder -------------------------------------------------------------------------------


def image_suffixes() -> frozenset[str]:
    """Every file suffix PIL can open (GIF, TIFF, WebP, ...), not a fixed list."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _walk_images(folder: Path, suffixes, seen: set[str]) -> list[Path]:
    """Images under ``folder`` in sorted order, recursing into sub-folders (as ImageFolder
    does). Links are followed, but a folder in ``seen`` (the top folder and every class
    folder, so a link loop or a link into another class) or already visited is not entered,
    and no file is listed twice."""
    out: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            real = os.path.realpath(entry)
            if real not in seen:
                seen.add(real)
                out += _walk_images(entry, suffixes, seen)
        elif entry.is_file() and entry.suffix.lower() in suffixes:
            target = os.path.realpath(entry)
            if target not in seen:
                seen.add(target)
                out.append(entry)
    return out


def hash_files(paths) -> str:
    """A hash of the files' bytes, in order (``extract --verify-content``)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return f"sha256:{h.hexdigest()}"


class FolderDataset(ImageDataset):
    """Image files on disk. Their identity covers each file's path (relative to ``root``), size
    and modification time, as make and rsync decide, and the absolute root: replacing the
    images or pointing at another copy is never a cache hit. ``content_hash`` reads the bytes
    (``extract --verify-content``) for changes that keep all three."""

    def __init__(self, name: str, files: list[Path], labels: np.ndarray, class_names, root: Path | None = None):
        self.name = name
        self.files = files
        self.labels = labels
        self.class_names = class_names
        self.root = Path(root).resolve() if root is not None else None
        self._identity: str | None = None

    def identity(self) -> str:
        if self._identity is None:  # a stat per file, once per run
            h = hashlib.sha256()
            for path in self.files:
                st = os.stat(path)
                rel = os.path.relpath(path, self.root) if self.root is not None else str(path)
                h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            root = f":root={self.root}" if self.root is not None else ""
            self._identity = f"{super().identity()}{root}:files={h.hexdigest()[:16]}"
        return self._identity

    def content_hash(self) -> str:
        return hash_files(self.files)

    def load(self, i: int):
        return _open_image(self.files[i], self.name)

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        bad, self.animated = [], []
        for path in self.files[start:stop]:
            reason, animated = _decode(path)
            if reason is not None:
                bad.append((str(path), reason))
            elif animated:
                self.animated.append(str(path))
        return bad

    def notes(self) -> list[str]:
        """What the last ``unreadable`` check found worth saying: animations, of which the first frame is read."""
        animated = getattr(self, "animated", [])
        if not animated:
            return []
        return [f"{len(animated)} animated image(s) (e.g. {animated[0]}): the first frame of each is used"]


@register_source("folder")
def folder_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """ImageFolder layout (one sub-folder per class, sorted = label order); a folder with
    images but no sub-folders is read as one unlabelled set, which suits OOD sets."""
    path = _resolve(root, arg)
    if not path.is_dir():
        raise OodError(f"image folder {arg} not found (looked in {_looked(root, arg)}); put the images there or {FIX_HINT}")
    suffixes = image_suffixes()
    top = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        if top:  # ImageFolder would drop them without a word
            raise OodError(f"image folder {path} holds {len(top)} image(s) (e.g. {top[0].name}) beside class "
                           f"sub-folders ({subdirs[0].name}, ...); move them into a class folder or give the "
                           "sub-folders as sources of their own")
        files, labels, classes = [], [], []
        seen = {os.path.realpath(p) for p in (path, *subdirs)}
        for label, sub in enumerate(subdirs):
            classes.append(sub.name)
            for f in _walk_images(sub, suffixes, seen):
                files.append(f)
                labels.append(label)
        labels = np.asarray(labels, dtype=np.int64)
    else:
        files = top
        labels = np.full(len(files), -1, np.int64)
        classes = None
    if not files:
        raise OodError(f"no images found in {path} (image types read: {', '.join(sorted(suffixes))})")
    if is_ood:
        labels, classes = np.full(len(files), -1, np.int64), None
    return FolderDataset(f"folder:{arg}", files, labels, classes, root=path)


# --- imglist (OpenOOD) ------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def parse_imglist_line(line: str) -> tuple[str, int] | None:
    """``relative/path.jpg 3`` -> (path, 3); the label is the first integer after the
    path (OpenOOD also writes dict-like extras there), -1 when there is none."""
    parts = line.strip().split(None, 1)
    if not parts:
        return None
    m = _INT.search(parts[1]) if len(parts) > 1 else None
    return parts[0], int(m.group()) if m else -1


@register_source("imglist")
def imglist_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``FILE@IMAGEDIR``, both relative to the data root (as OpenOOD v1.5 lays them out:
    ``benchmark_imglist/<bench>/<file>.txt`` and ``images_classic/`` or
    ``images_largescale/``); IMAGEDIR defaults to ``images_classic``."""
    file, _, image_dir = arg.partition("@")
    list_path = _resolve(root, file)
    image_root = _resolve(root, image_dir or "images_classic")
    if not list_path.is_file():
        raise OodError(
            f"image list {list_path} not found; get OpenOOD's benchmark_imglist "
            f"(scripts/download/download.py) into {root} or {FIX_HINT}"
        )
    entries = [e for e in map(parse_imglist_line, list_path.read_text().splitlines()) if e]
    if not entries:
        raise OodError(f"image list {list_path} lists no images")
    files = [image_root / p for p, _ in entries]
    if not files[0].is_file():  # fail now, not hours into an extraction
        raise OodError(
            f"image {files[0]} (first in {list_path}) not found; download the images into {image_root}"
        )
    labels = np.asarray([-1 if is_ood else y for _, y in entries], dtype=np.int64)
    return FolderDataset(f"imglist:{arg}", files, labels, None, root=image_root)


# --- digits -------------------------------------------------------------------------------


@register_source("digits")
def digits_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    from oodcli.data.digits import digits_part

    return digits_part(arg, is_ood)


# --- classes (a class subset of another source) ----------------------------------------------

_CLASS_ITEM = re.compile(r"(\d+)(?:-(\d+))?")
_MAX_LABEL = 2**62  # labels are int64


def parse_class_list(spec: str) -> list[tuple[int, int]]:
    """``151-170,173,200-201`` -> [(151, 170), (173, 173), (200, 201)]: the inclusive label
    ranges of a ``classes:`` source, in listed order. ValueError says what is wrong."""
    spans = []
    for item in spec.split(","):
        m = _CLASS_ITEM.fullmatch(item)
        if not m:
            raise ValueError(f"'{item}' is neither a label nor a FIRST-LAST range" if item else "an empty item")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if first > last:
            raise ValueError(f"range '{item}' runs backwards")
        if last > _MAX_LABEL:
            raise ValueError(f"label {last} is too large")
        spans.append((first, last))
    ordered = sorted(spans)
    for (_, prev_last), (first, _) in zip(ordered, ordered[1:]):
        if first <= prev_last:
            raise ValueError(f"label {first} is listed twice")
    return spans


class ClassRangeDataset(ImageDataset):
    """Rows of another data set whose labels fall in the listed ranges, in the inner data set's
    row order, relabelled 0..n-1 in listed order (one range A-B: label - A, as it always was)."""

    def __init__(self, inner: ImageDataset, spans: list[tuple[int, int]], spec: str):
        self.inner = inner
        self.name = f"classes:{spec}:{inner.name}"
        firsts = np.array([a for a, _ in spans], np.int64)
        lasts = np.array([b for _, b in spans], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lasts - firsts + 1)[:-1]]).astype(np.int64)
        order = np.argsort(firsts, kind="stable")
        labels = np.asarray(inner.labels, np.int64)
        # the span each label could fall in: the last one starting at or below it
        k = np.searchsorted(firsts[order], labels, side="right") - 1
        span = order[np.clip(k, 0, None)]
        inside = (k >= 0) & (labels <= lasts[span])
        self.rows = np.flatnonzero(inside)
        self.labels = (offsets[span] + labels - firsts[span])[inside]
        names = inner.class_names
        self.class_names = [n for a, b in spans for n in names[a : b + 1]] if names else None

    def load(self, i: int):
        return self.inner.load(int(self.rows[i]))

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        files = getattr(self.inner, "files", None)
        if files is None:
            return []
        bad = [(str(files[r]), decode_check(files[r])) for r in self.rows[start:stop]]
        return [(path, reason) for path, reason in bad if reason is not None]


@register_source("classes")
def class_range_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """``LABELS:SOURCE``: a class subset of a labelled source, e.g. the ImageNet-500 halves
    (``0-499``) or the open-set protocols' scattered classes (``151-170,173-268``)."""
    from oodcli.data.base import open_source

    span, _, inner = arg.partition(":")
    try:
        spans = parse_class_list(span)
        if not inner:
            raise ValueError("no SOURCE after the labels")
    except ValueError as e:
        raise UsageError(
            f"bad source 'classes:{arg}' ({e}); write classes:LABELS:SOURCE, LABELS a label, a FIRST-LAST "
            f"range or a comma-separated list of them, e.g. classes:0-499:folder:imagenet/val"
        ) from None
    spec = ",".join(str(a) if item.isdigit() else f"{a}-{b}" for item, (a, b) in zip(span.split(","), spans))
    data = ClassRangeDataset(open_source(inner, root, is_ood=False), spans, spec)
    if len(data) == 0:
        raise OodError(f"{data.name} holds no images of classes {spec}")
    if is_ood:
        data.labels = np.full(len(data), -1, np.int64)
    return data
