"""The embedded ``digits`` benchmark: small, offline and deterministic.

Everything is made from data that installed packages ship (scikit-learn's 8x8
digits, scikit-image's sample images, matplotlib's fonts), so tests and demos run
without a download. Every part goes through the same pipeline, an 8x8 grayscale image
with values in [0, 1] on the digits' 1/16 grid, bilinearly upsampled to a
32x32 RGB image, so that resolution and value range give nothing away and OOD
methods must tell the sets apart by content.

Parts: ``train``/``test`` (digits 0-5, stratified 70/30), ``ood/near/digits6-9``,
``ood/near/letters`` (letters in the fonts matplotlib ships, made the way the digits
were: see ``_letters``), ``ood/far/textures`` (crops of natural and synthetic
photographs) and ``ood/far/noise`` (uniform noise, blurred noise, Gaussian blobs);
``csid/digits-shifted`` (the ``test`` digits under covariate shift, labels kept, for
full-spectrum OOD: see ``_shifted``); for choosing hyperparameters (``oodcli sweep``,
OpenOOD's validation protocol) ``val`` (every fifth train row of each class, so ``test``
and every OOD test set stay exactly as they were) and ``ood/val/textures`` (fresh
texture crops from a seed of their own, no test image).

Labels (and so ``identity()``, the fingerprint of a split) are known without making
an image and without importing scikit-learn: a cache-hit ``extract`` costs
milliseconds. Images are made on the first ``load`` (or ``unreadable``) of a part, each
part on its own (from its own seed), so adding a part changes no other part's pixels.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from oodcli.data.base import ImageDataset
from oodcli.errors import OodError, UsageError

DIGITS_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five"]
PARTS = ("train", "val", "test", "ood/val/textures", "ood/near/digits6-9", "ood/near/letters",
         "ood/far/textures", "ood/far/noise", "csid/digits-shifted")

SEED = 0
TEST_FRACTION = 0.3
N_TEXTURES = 500
N_NOISE = 300
N_VAL_TEXTURES = 200
VAL_EVERY = 5  # every VAL_EVERY-th train row of each class (in row order) is a validation row
SIZE = 32  # side of the images handed to backbones

# ood/near/letters: every letter but O, o, I and l (at 8x8 those are, in most fonts, the ID digits
# 0 and 1 themselves: not OOD by content), each in these fonts of matplotlib's mpl-data/fonts/ttf:
# DejaVu Sans, Serif and Sans Mono, STIX and Computer Modern (sans, typewriter), in regular, bold,
# oblique, italic and bold italic. Look-alikes of digits such as S, Z, B, b, g, q stay: near-OOD.
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz"
LETTER_FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSerif", "DejaVuSerif-Italic",
    "DejaVuSansMono", "STIXGeneral", "STIXGeneralBolIta", "cmss10", "cmtt10",
)  # fmt: skip
GLYPH_PX = 128  # glyphs are drawn this tall, then sampled down as the digits' bitmaps were
INK = (0.25, 0.36)  # the 5th-95th percentile of the ID digits' mean pixel value

# scikit-image sample images that ship inside the package (no network needed).
TEXTURE_IMAGES = (
    "brick", "grass", "gravel", "camera", "coins", "moon", "text", "checkerboard",
    "page", "clock", "cell", "coffee", "chelsea", "astronaut", "rocket",
    "immunohistochemistry",
)  # fmt: skip


# Which of the 1083 ID rows (digits 0-5, in load_digits order) are test rows: the split that
# train_test_split(test_size=0.3, stratify=labels, random_state=0) makes (scikit-learn 1.x),
# kept here so the split, and with it every store's fingerprint, is known without sklearn.
_N_ID_ROWS = 1083
_TEST_MASK = (
    "01026a718821c1426424d000a400409c30110590109208f2028759082bd821940654a9040005c405c100028c08"
    "80c1200970180015d640281080783e1db104000f5b50834611264800e426832e120054109122842802a357e096"
    "0b4ac1028413490f22a2980b02580014840142700b425024c88a800b31430526835808910133a028a02a41a950a"
)


def _digits_csv() -> Path | None:
    """scikit-learn's digits CSV, found without importing scikit-learn (which costs seconds)."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: (float64 images [1797, 8, 8] in [0, 1], int64 labels), what
    ``load_digits()`` returns, read straight from its CSV when that file is where it always was."""
    path = _digits_csv()
    if path is not None:
        raw = np.loadtxt(path, delimiter=",")
        images, target = raw[:, :-1].reshape(-1, 8, 8), raw[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, target = digits.images, digits.target
    return images / 16.0, target.astype(np.int64)


@lru_cache(maxsize=None)
def _rows() -> dict[str, np.ndarray]:
    """Sorted rows of the raw digits that make ``train``, ``test`` and ``ood/near/digits6-9``."""
    labels = _digits_raw()[1]
    is_id = labels < len(DIGITS_CLASS_NAMES)
    id_rows = np.flatnonzero(is_id)
    if len(id_rows) == _N_ID_ROWS:
        bits = format(int(_TEST_MASK, 16), f"0{len(id_rows)}b")
        is_test = np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")
        train_rows, test_rows = id_rows[~is_test], id_rows[is_test]
    else:  # not the digits data the mask was made for: split it the way the mask was made
        from sklearn.model_selection import train_test_split

        train_rows, test_rows = train_test_split(
            id_rows, test_size=TEST_FRACTION, stratify=labels[id_rows], random_state=SEED
        )
        train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    is_val = np.zeros(len(train_rows), bool)
    for c in np.unique(labels[train_rows]):  # stratified without scikit-learn: the same rows every time
        of_class = np.flatnonzero(labels[train_rows] == c)
        is_val[of_class[VAL_EVERY - 1 :: VAL_EVERY]] = True
    return {"train": train_rows[~is_val], "val": train_rows[is_val], "test": test_rows,
            "ood/near/digits6-9": np.flatnonzero(~is_id), "csid/digits-shifted": test_rows}


@lru_cache(maxsize=None)
def digits_labels(part: str) -> np.ndarray:
    """int64 labels [N] of a part (-1 for the OOD parts), known without making an image."""
    part = _check_part(part)
    if part in ("train", "val", "test", "csid/digits-shifted"):
        y = _digits_raw()[1][_rows()[part]]
    else:
        n = {"ood/far/textures": N_TEXTURES, "ood/far/noise": N_NOISE, "ood/val/textures": N_VAL_TEXTURES,
             "ood/near/letters": len(LETTERS) * len(LETTER_FONTS)}.get(part)
        y = np.full(len(_rows()[part]) if n is None else n, -1, np.int64)
    y.setflags(write=False)
    return y


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


def _blocks(on: np.ndarray) -> np.ndarray:
    """A 32x32 image (a bitmap, or ink in [0, 1]) as the digits were made: the mean of each 4x4 block."""
    return on.reshape(8, 4, 8, 4).mean(axis=(1, 3))


def _glyph(font, char: str) -> np.ndarray:
    """The bitmap (bool, cropped to its ink) of one character drawn GLYPH_PX tall."""
    from PIL import ImageDraw

    canvas = Image.new("L", (3 * GLYPH_PX, 3 * GLYPH_PX), 0)
    ImageDraw.Draw(canvas).text((GLYPH_PX, GLYPH_PX), char, fill=255, font=font)
    on = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    return on[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _font_folder() -> Path:
    """matplotlib's mpl-data/fonts/ttf, found without importing matplotlib (which costs a second)."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf"
        if path.is_dir():
            return path
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _thicker(on: np.ndarray) -> np.ndarray:
    """A bitmap dilated by one pixel towards its four neighbours."""
    out = on.copy()
    out[1:] |= on[:-1]
    out[:-1] |= on[1:]
    out[:, 1:] |= on[:, :-1]
    out[:, :-1] |= on[:, 1:]
    return out


def _letters(rng: np.random.Generator) -> np.ndarray:
    """Every letter of LETTERS in every font of LETTER_FONTS, made the way scikit-learn's digits
    were (UCI optdigits): a bitmap scaled to fill the 32-pixel height (width by the glyph's
    aspect, at most 24 pixels, the width most digits take), centred, and the on-pixels of each
    4x4 block counted (0..16, so the 1/16 grid comes by itself). Font strokes are thinner than
    the digits' pen: each bitmap is thickened one pixel at a time (up to 4) towards a mean ink
    drawn from the digits' own range INK, so that ink alone does not give a letter away."""
    from PIL import ImageFont

    folder = _font_folder()
    out = []
    for name in LETTER_FONTS:
        try:
            font = ImageFont.truetype(str(folder / f"{name}.ttf"), GLYPH_PX)
        except OSError as e:
            raise OodError(f"digits:ood/near/letters needs matplotlib's font {name}.ttf in {folder}: {e}") from None
        for char in LETTERS:
            glyph = _glyph(font, char)
            h, w = glyph.shape
            width = int(np.clip(round(SIZE * w / h), 1, 24))
            small = Image.fromarray(glyph.astype(np.uint8) * 255).resize((width, SIZE), Image.Resampling.BOX)
            on = np.zeros((SIZE, SIZE), bool)
            left = (SIZE - width) // 2
            on[:, left : left + width] = np.asarray(small) >= 128
            target = rng.uniform(*INK)
            for _ in range(4):
                thicker = _thicker(on)
                if on.mean() >= target or abs(thicker.mean() - target) > abs(on.mean() - target):
                    break
                on = thicker
            out.append(_blocks(on.astype(np.float64)))
    return np.stack(out)


def _shifted(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """Covariate shift of the kinds scanned handwriting meets, each image its own draw: at 32x32
    (every 8x8 pixel a 4x4 block, so no shift gives back the image exactly) a rotation of up to
    15 degrees, a shear of up to 0.2 and a shrink to 85-100% about the centre, a pen thinner or
    thicker by up to a pixel (grey erosion or dilation), a blur (sigma up to 1.2 pixels) and
    faded ink (contrast 75-100%); then the 4x4 block means on the 1/16 grid. Each alone costs
    the demo's CNN at most 3.5 points of accuracy, together about 16 (100% -> 84%)."""
    from scipy.ndimage import affine_transform, gaussian_filter, grey_dilation, grey_erosion

    centre = np.array([SIZE, SIZE]) / 2.0 - 0.5
    out = []
    for img in images:
        big = np.kron(img, np.ones((4, 4)))
        angle = np.deg2rad(rng.uniform(-15.0, 15.0))
        shear, scale = rng.uniform(-0.2, 0.2), rng.uniform(0.85, 1.0)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        forward = scale * rot @ np.array([[1.0, 0.0], [shear, 1.0]])  # (row, col) of the output
        inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input ones
        big = affine_transform(big, inverse, offset=centre - inverse @ centre, order=1, mode="constant")
        pen = rng.integers(-1, 2)  # -1 thinner, 0 as written, +1 thicker
        if pen:
            big = (grey_dilation if pen > 0 else grey_erosion)(big, size=(3, 3))
        big = gaussian_filter(big, rng.uniform(0.0, 1.2))
        out.append(_quantize(_blocks(big) * rng.uniform(0.75, 1.0)))
    return np.stack(out)


@lru_cache(maxsize=None)
def _generate(part: str) -> tuple[np.ndarray, np.ndarray]:
    """One part as (8x8 float images in [0, 1], int64 labels); made once per process."""
    images, rows = _digits_raw()[0], _rows()
    if part in ("train", "val", "test", "ood/near/digits6-9"):
        x = images[rows[part]]
    else:
        x = {
            "ood/val/textures": lambda: _textures(np.random.default_rng(SEED + 3), N_VAL_TEXTURES),
            "ood/far/textures": lambda: _textures(np.random.default_rng(SEED + 1), N_TEXTURES),
            "ood/far/noise": lambda: _noise(np.random.default_rng(SEED + 2), N_NOISE),
            "ood/near/letters": lambda: _letters(np.random.default_rng(SEED + 4)),
            "csid/digits-shifted": lambda: _shifted(np.random.default_rng(SEED + 5), images[rows[part]]),
        }[part]()
    y = np.array(digits_labels(part))
    assert len(y) == len(x), part
    x = x.astype(np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise UsageError(f"unknown digits part '{part}'; use one of: {', '.join(PARTS)}")
    return part


def digits_8x8(part: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, 8, 8] in [0, 1], int64 labels [N]; -1 for OOD) before upsampling."""
    return _generate(_check_part(part))


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
    """One part of the digits benchmark; images are 32x32 RGB PIL images, made on first use
    (labels, length and ``identity()`` need none)."""

    def __init__(self, part: str, is_ood: bool = False):
        self.part = _check_part(part)
        labels = digits_labels(part)
        self.labels = np.full(len(labels), -1, np.int64) if is_ood else np.array(labels)
        self.name = f"digits:{part}"
        self.class_names = None if (is_ood or part.startswith("ood/")) else list(DIGITS_CLASS_NAMES)

    def load(self, i: int):
        return Image.fromarray(digits_arrays(self.part)[0][i])

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        """Nothing to decode; makes the images now (extract calls this just before it computes),
        so DataLoader workers forked afterwards share them instead of each making its own."""
        digits_arrays(self.part)
        return []


def digits_part(part: str, is_ood: bool = False) -> ImageDataset:
    """The named part as an ImageDataset (labels -1 for OOD parts or when is_ood)."""
    return DigitsDataset(part, is_ood)
