"""The embedded ``digits`` benchmark: small, offline and deterministic.

Everything is made from data that installed packages ship (scikit-learn's 8x8
digits, scikit-image's sample images), so tests and demos run without a
download. Every part goes through the same pipeline, an 8x8 grayscale image
with values in [0, 1] on the digits' 1/16 grid, bilinearly upsampled to a
32x32 RGB image, so that resolution and value range give nothing away and OOD
methods must tell the sets apart by content.

Parts: ``train``/``test`` (digits 0-5, stratified 70/30), ``ood/near/digits6-9``,
``ood/far/textures`` (crops of natural and synthetic photographs) and
``ood/far/noise`` (uniform noise, blurred noise, Gaussian blobs).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from oodcli.data.base import ImageDataset
from oodcli.errors import UsageError

DIGITS_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five"]
PARTS = ("train", "test", "ood/near/digits6-9", "ood/far/textures", "ood/far/noise")

SEED = 0
TEST_FRACTION = 0.3
N_TEXTURES = 500
N_NOISE = 300
SIZE = 32  # side of the images handed to backbones

# scikit-image sample images that ship inside the package (no network needed).
TEXTURE_IMAGES = (
    "brick", "grass", "gravel", "camera", "coins", "moon", "text", "checkerboard",
    "page", "clock", "cell", "coffee", "chelsea", "astronaut", "rocket",
    "immunohistochemistry",
)  # fmt: skip


def _quantize(x: np.ndarray) -> np.ndarray:
    """Snap to the digits' grid of 17 levels (0..16)/16."""
    return np.round(np.clip(x, 0.0, 1.0) * 16.0) / 16.0


def _like_digits(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give an 8x8 image the digits' look: stretched to [0, 1], a dark background
    (a random 30-65% of pixels pushed to 0) and the 1/16 value grid, so that
    brightness statistics alone do not separate OOD from ID."""
    x = (x - x.min()) / (x.max() - x.min())
    cut = min(np.quantile(x, rng.uniform(0.3, 0.65)), 0.8)  # keep some pixels bright
    x = np.clip((x - cut) / (1.0 - cut), 0.0, 1.0)
    return _quantize(x)


def _sample_images() -> list[np.ndarray]:
    """The texture source images as float grayscale in [0, 1]."""
    from skimage import data
    from skimage.color import rgb2gray

    out = []
    for name in TEXTURE_IMAGES:
        img = getattr(data, name)()
        img = rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float64) / 255.0
        out.append(np.asarray(img, dtype=np.float64))
    return out


def _textures(rng: np.random.Generator, n: int) -> np.ndarray:
    """8x8 area-averaged random crops (24-96 px) of the sample images."""
    sources = _sample_images()
    out = []
    while len(out) < n:
        img = sources[rng.integers(len(sources))]
        side = 8 * int(rng.integers(3, 13))  # a multiple of 8: exact 8x8 block means
        side = min(side, min(img.shape) // 8 * 8)
        y = rng.integers(0, img.shape[0] - side + 1)
        x = rng.integers(0, img.shape[1] - side + 1)
        k = side // 8
        small = img[y : y + side, x : x + side].reshape(8, k, 8, k).mean(axis=(1, 3))
        if small.max() - small.min() < 0.1:  # flat patch: no texture left to show
            continue
        if rng.random() < 0.5:  # bright-on-dark and dark-on-bright both occur
            small = 1.0 - small
        out.append(_like_digits(small, rng))
    return np.stack(out)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform noise, blurred Gaussian noise and sums of Gaussian blobs, in turn."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:8, 0:8].astype(np.float64)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            img = rng.uniform(0.0, 1.0, (8, 8))
        elif kind == 1:
            img = gaussian_filter(rng.normal(size=(8, 8)), rng.uniform(0.6, 1.5), mode="reflect")
        else:
            img = np.zeros((8, 8))
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.uniform(1.0, 6.0, 2)
                s = rng.uniform(0.7, 2.0)
                img += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out.append(_like_digits(img, rng))
    return np.stack(out)


@lru_cache(maxsize=None)
def _generate() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All parts as (8x8 float images in [0, 1], int64 labels); made once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images / 16.0
    labels = digits.target.astype(np.int64)
    is_id = labels < len(DIGITS_CLASS_NAMES)
    id_rows = np.flatnonzero(is_id)
    train_rows, test_rows = train_test_split(
        id_rows, test_size=TEST_FRACTION, stratify=labels[id_rows], random_state=SEED
    )
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    near = np.flatnonzero(~is_id)
    parts = {
        "train": (images[train_rows], labels[train_rows]),
        "test": (images[test_rows], labels[test_rows]),
        "ood/near/digits6-9": (images[near], np.full(len(near), -1, np.int64)),
        "ood/far/textures": (_textures(np.random.default_rng(SEED + 1), N_TEXTURES), None),
        "ood/far/noise": (_noise(np.random.default_rng(SEED + 2), N_NOISE), None),
    }
    out = {}
    for name, (x, y) in parts.items():
        y = np.full(len(x), -1, np.int64) if y is None else y
        x = x.astype(np.float32)
        x.setflags(write=False)
        y.setflags(write=False)
        out[name] = (x, y)
    return out


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise UsageError(f"unknown digits part '{part}'; use one of: {', '.join(PARTS)}")
    return part


def digits_8x8(part: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, 8, 8] in [0, 1], int64 labels [N]; -1 for OOD) before upsampling."""
    return _generate()[_check_part(part)]


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of bilinear resizing (pixel centres aligned, edges clamped)."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


@lru_cache(maxsize=None)
def digits_arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 32, 32, 3], int64 labels [N]): the exact pixels that
    ``digits_part(part).load(i)`` returns, for fast training loops."""
    x, y = digits_8x8(part)
    m = _upsample_matrix(8, SIZE)
    big = np.einsum("ij,njk,lk->nil", m, x.astype(np.float64), m)
    gray = np.round(np.clip(big, 0.0, 1.0) * 255.0).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    rgb.setflags(write=False)
    return rgb, y


class DigitsDataset(ImageDataset):
    """One part of the digits benchmark; images are 32x32 RGB PIL images."""

    def __init__(self, part: str, is_ood: bool = False):
        self.part = _check_part(part)
        labels = digits_arrays(part)[1]
        self.labels = np.full(len(labels), -1, np.int64) if is_ood else np.array(labels)
        self.name = f"digits:{part}"
        self.class_names = None if (is_ood or part.startswith("ood/")) else list(DIGITS_CLASS_NAMES)

    def load(self, i: int):
        return Image.fromarray(digits_arrays(self.part)[0][i])


def digits_part(part: str, is_ood: bool = False) -> ImageDataset:
    """The named part as an ImageDataset (labels -1 for OOD parts or when is_ood)."""
    return DigitsDataset(part, is_ood)
