"""The source kinds a benchmark split (or ``--source``) can name.

``torchvision:NAME:SPLIT``  a torchvision data set under ``<root>/NAME`` (never downloaded here)
``folder:PATH``             an ImageFolder (class sub-folders), or a flat folder of images
``imglist:FILE[@IMAGEDIR]`` an OpenOOD image list; images under ``<root>/IMAGEDIR``
``digits:PART``             the embedded digits benchmark
``classes:A-B:SOURCE``      the rows of SOURCE with labels A..B (inclusive), relabelled 0..B-A

Every factory learns the labels without decoding an image, and opens images lazily.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from oodcli.data.base import ImageDataset, register_source
from oodcli.errors import OodError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FIX_HINT = "set --data-root / OODCLI_DATA_ROOT"


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _open_image(path: Path, source: str):
    """Read an image fully (so no file handle stays open) and return it unconverted."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise OodError(f"image {path} of {source} not found") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying truncated or not an image
        raise OodError(f"image {path} of {source} cannot be read ({_reason(exc)}); fix or remove it") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def decode_check(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None. JPEGs decode at 1/8 scale (``draft``): every
    byte is still parsed, so truncation shows, at a fraction of the full decode."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except FileNotFoundError:
        return "not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _reason(exc)
    return None


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


class FolderDataset(ImageDataset):
    def __init__(self, name: str, files: list[Path], labels: np.ndarray, class_names):
        self.name = name
        self.files = files
        self.labels = labels
        self.class_names = class_names

    def load(self, i: int):
        return _open_image(self.files[i], self.name)

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        bad = []
        for path in self.files[start:stop]:
            reason = decode_check(path)
            if reason is not None:
                bad.append((str(path), reason))
        return bad


@register_source("folder")
def folder_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    """ImageFolder layout (one sub-folder per class, sorted = label order); a folder with
    images but no sub-folders is read as one unlabelled set, which suits OOD sets."""
    path = _resolve(root, arg)
    if not path.is_dir():
        raise OodError(f"image folder {path} not found; put the images there or {FIX_HINT}")
    if any(p.is_dir() for p in path.iterdir()):
        from torchvision.datasets import ImageFolder

        try:
            ds = ImageFolder(str(path), allow_empty=True)
        except (FileNotFoundError, RuntimeError) as e:
            raise OodError(f"no images found in {path}: {str(e).splitlines()[0]}") from None
        files = [Path(f) for f, _ in ds.samples]
        labels = np.asarray(ds.targets, dtype=np.int64)
        classes = list(ds.classes)
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = np.full(len(files), -1, np.int64)
        classes = None
    if not files:
        raise OodError(f"no images found in {path}")
    if is_ood:
        labels, classes = np.full(len(files), -1, np.int64), None
    return FolderDataset(f"folder:{arg}", files, labels, classes)


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
    return FolderDataset(f"imglist:{arg}", files, labels, None)


# --- digits -------------------------------------------------------------------------------


@register_source("digits")
def digits_source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    from oodcli.data.digits import digits_part

    return digits_part(arg, is_ood)


# --- classes (a class range of another source) ----------------------------------------------


class ClassRangeDataset(ImageDataset):
    """Rows of another data set whose labels fall in [first, last], relabelled from 0."""

    def __init__(self, inner: ImageDataset, first: int, last: int):
        self.inner = inner
        self.name = f"classes:{first}-{last}:{inner.name}"
        self.rows = np.flatnonzero((inner.labels >= first) & (inner.labels <= last))
        self.labels = inner.labels[self.rows] - first
        names = inner.class_names
        self.class_names = list(names[first : last + 1]) if names else None

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
    """``A-B:SOURCE``: a class subset of a labelled source, e.g. the ImageNet-500 halves."""
    from oodcli.data.base import open_source

    span, _, inner = arg.partition(":")
    m = re.fullmatch(r"(\d+)-(\d+)", span)
    if not m or not inner or int(m.group(1)) > int(m.group(2)):
        raise UsageError(f"bad source 'classes:{arg}'; write classes:FIRST-LAST:SOURCE, e.g. classes:0-499:folder:imagenet/val")
    first, last = int(m.group(1)), int(m.group(2))
    data = ClassRangeDataset(open_source(inner, root, is_ood=False), first, last)
    if len(data) == 0:
        raise OodError(f"{data.name} holds no images of classes {first}-{last}")
    if is_ood:
        data.labels = np.full(len(data), -1, np.int64)
    return data
