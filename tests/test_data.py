"""Data sources and benchmarks, offline: the digits benchmark is generated, every
other source is exercised on small fake files written to tmp_path."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodcli.data import get_benchmark, list_benchmarks, open_source
from oodcli.data import base, digits
from oodcli.data.sources import parse_imglist_line
from oodcli.errors import OodError, UsageError

ID_PARTS = ("train", "val", "test")
OOD_PARTS = ("ood/near/digits6-9", "ood/near/letters", "ood/far/textures", "ood/far/noise")


# --- digits -------------------------------------------------------------------------------


def test_digits_is_deterministic():
    first = {p: digits.digits_8x8(p) for p in digits.PARTS}
    digits._generate.cache_clear()
    digits.digits_arrays.cache_clear()
    for p in digits.PARTS:
        x, y = digits.digits_8x8(p)
        np.testing.assert_array_equal(x, first[p][0])
        np.testing.assert_array_equal(y, first[p][1])


def test_digits_sizes_classes_and_labels():
    n_train, n_val, n_test = (len(digits.digits_8x8(p)[1]) for p in ("train", "val", "test"))
    assert n_train + n_val + n_test == 1083  # digits 0-5 in load_digits
    assert abs(n_test / 1083 - 0.3) < 0.01
    assert abs(n_val / (n_train + n_val) - 0.2) < 0.01  # every fifth train row of each class
    for part in ID_PARTS:
        y = digits.digits_8x8(part)[1]
        assert set(np.unique(y)) == set(range(6))
        ds = digits.digits_part(part)
        assert ds.class_names == digits.DIGITS_CLASS_NAMES
        assert ds.name == f"digits:{part}"
    assert len(digits.digits_8x8("ood/near/digits6-9")[1]) == 714
    assert 400 <= len(digits.digits_8x8("ood/far/textures")[1]) <= 600
    assert 250 <= len(digits.digits_8x8("ood/far/noise")[1]) <= 350
    assert len(digits.digits_8x8("ood/val/textures")[1]) == 200
    assert len(digits.digits_8x8("ood/near/letters")[1]) == 48 * 10  # letters x fonts
    shifted = digits.digits_part("csid/digits-shifted")  # the test digits: their labels and class names
    np.testing.assert_array_equal(shifted.labels, digits.digits_8x8("test")[1])
    assert shifted.class_names == digits.DIGITS_CLASS_NAMES
    for part in (*OOD_PARTS, "ood/val/textures"):
        ds = digits.digits_part(part)
        assert (ds.labels == -1).all() and ds.class_names is None
    # an ID part opened as OOD gets -1 labels too
    assert (open_source("digits:test", Path("unused"), is_ood=True).labels == -1).all()


def test_digits_same_image_format_everywhere():
    for part in digits.PARTS:
        x8 = digits.digits_8x8(part)[0]
        assert x8.shape[1:] == (8, 8) and x8.min() >= 0.0 and x8.max() <= 1.0
        assert np.allclose(x8 * 16, np.round(x8 * 16))  # the digits' 1/16 grid
        arr, labels = digits.digits_arrays(part)
        assert arr.dtype == np.uint8 and arr.shape == (len(labels), 32, 32, 3)
        assert (arr[..., 0] == arr[..., 2]).all()  # grayscale replicated
        img = digits.digits_part(part).load(len(labels) - 1)
        assert img.mode == "RGB" and img.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(img), arr[-1])


def test_digits_train_val_and_test_do_not_overlap():
    train, val, test = ({r.tobytes() for r in digits.digits_8x8(p)[0]} for p in ("train", "val", "test"))
    assert not train & test and not val & test and not train & val


# identity() and a hash of the pixels of each part as the benchmark first had it: a new part must
# leave every existing store's splits (fingerprints and images) as they were
_EXISTING_PARTS = {
    "train": ("digits:train:n=609:labels=520b00c770728b40", "45d6b6509ed05173"),
    "val": ("digits:val:n=149:labels=f32556080567ad92", "3a5a10968d237267"),
    "test": ("digits:test:n=325:labels=9d523386cfbe9ffc", "60d254f39fc36227"),
    "ood/val/textures": ("digits:ood/val/textures:n=200:labels=eac3349c2bcfb431", "38b10c40df14665d"),
    "ood/near/digits6-9": ("digits:ood/near/digits6-9:n=714:labels=f251cfaec602d387", "981ec72ee943bde8"),
    "ood/far/textures": ("digits:ood/far/textures:n=500:labels=68c5f18d405dd0fb", "e15ef1061801772d"),
    "ood/far/noise": ("digits:ood/far/noise:n=300:labels=50ee3bf5d25a296b", "fa97fc656dee0ceb"),
}


def test_digits_existing_parts_are_unchanged():
    import hashlib

    for part, (identity, pixels) in _EXISTING_PARTS.items():
        assert digits.digits_part(part).identity() == identity, part
        assert hashlib.sha256(digits.digits_arrays(part)[0].tobytes()).hexdigest()[:16] == pixels, part


def test_digits_new_parts_identity_needs_no_image(monkeypatch):
    """A cache-hit extract reads identity() only: the letters and shifted digits must not be drawn for it."""

    def refuse(*args):
        raise AssertionError("an image was made")

    for name in ("_letters", "_shifted", "_textures", "_noise"):
        monkeypatch.setattr(digits, name, refuse)
    digits._generate.cache_clear()  # images made by earlier tests would hide a call
    ids = {p: digits.digits_part(p).identity() for p in ("ood/near/letters", "csid/digits-shifted")}
    assert ids == {"ood/near/letters": "digits:ood/near/letters:n=480:labels=877efe413fb39caa",
                   "csid/digits-shifted": "digits:csid/digits-shifted:n=325:labels=9d523386cfbe9ffc"}


def test_digits_letters_are_drawn_like_the_digits():
    """Full height, at most the digits' width, centred, ink in the digits' range; no letter is an ID image."""
    x = digits.digits_8x8("ood/near/letters")[0]
    ink = x > 0
    assert ink[:, 0].any(1).all() and ink[:, 7].any(1).all()  # top and bottom rows, as every digit
    edges = ink[:, :, 0].any(1) | ink[:, :, 7].any(1)  # 24 of 32 pixels wide, centred: only thickened
    assert 0.05 < edges.mean() < 0.3  # strokes reach the edge columns (as 14% of the digits do)
    id_ink = digits.digits_8x8("train")[0].mean(axis=(1, 2))
    lo, hi = np.quantile(id_ink, [0.05, 0.95])
    assert lo - 0.05 < np.median(x.mean(axis=(1, 2))) < hi + 0.05
    assert len({r.tobytes() for r in x}) > 0.95 * len(x)  # fonts differ
    id_rows = {r.tobytes() for p in ID_PARTS for r in digits.digits_8x8(p)[0]}
    assert not id_rows & {r.tobytes() for r in x}


def test_digits_shifted_is_covariate_shift():
    """The shifted test digits are other images of the same classes: a classifier trained on
    train loses accuracy on them, but far less than chance."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits.digits_8x8("train")
    clf = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1), y)
    test, y_test = digits.digits_8x8("test")
    shifted, y_shifted = digits.digits_8x8("csid/digits-shifted")
    np.testing.assert_array_equal(y_shifted, y_test)
    assert (np.abs(shifted - test).reshape(len(test), -1).max(1) > 0).all()  # every image shifted
    acc_test = (clf.predict(test.reshape(len(test), -1)) == y_test).mean()
    acc_shifted = (clf.predict(shifted.reshape(len(shifted), -1)) == y_shifted).mean()
    assert 0.5 < acc_shifted < acc_test - 0.05, (acc_test, acc_shifted)


def test_digits_unknown_part():
    with pytest.raises(UsageError):
        open_source("digits:nope", Path("unused"))


def _auroc_msp(clf, x_id, x_ood):
    from sklearn.metrics import roc_auc_score

    s_id = clf.predict_proba(x_id.reshape(len(x_id), -1)).max(1)
    s_ood = clf.predict_proba(x_ood.reshape(len(x_ood), -1)).max(1)
    y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
    return roc_auc_score(y, np.r_[s_id, s_ood])


def test_digits_is_not_trivial():
    """A linear classifier's max-softmax must not separate near-OOD perfectly."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits.digits_8x8("train")
    clf = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1), y)
    x_test = digits.digits_8x8("test")[0]
    aurocs = {p: _auroc_msp(clf, x_test, digits.digits_8x8(p)[0]) for p in OOD_PARTS}
    assert 0.6 < aurocs["ood/near/digits6-9"] < 0.99, aurocs
    assert 0.6 < aurocs["ood/near/letters"] < aurocs["ood/near/digits6-9"], aurocs  # the harder near set
    assert min(aurocs.values()) < 0.99, aurocs


# --- benchmarks --------------------------------------------------------------------------


def test_every_benchmark_loads_and_uses_known_sources():
    from oodcli.data import sources  # noqa: F401  (registers the kinds)

    names = list_benchmarks()
    assert {"digits", "cifar10", "cifar100", "imagenet200", "imagenet", "imagenet-mos"} <= set(names)
    for name in names:
        bench = get_benchmark(name)
        assert bench.name == name and bench.num_classes > 0 and bench.description
        assert bench.split_names("id") and bench.split_names("ood")
        for s in bench.splits:
            assert s.source.partition(":")[0] in base._SOURCES, s
            assert s.is_ood == s.name.startswith("ood/")
            assert bench.split(s.name) is s
        names_list = bench.resolve_class_names()
        assert names_list is None or len(names_list) == bench.num_classes


def test_openood_benchmarks_match_v15():
    c10 = get_benchmark("cifar10")
    assert c10.num_classes == 10
    assert c10.split_names("ood-near") == ["ood/near/cifar100", "ood/near/tin"]
    assert c10.split_names("ood-far") == [f"ood/far/{s}" for s in ("mnist", "svhn", "texture", "places365")]
    assert c10.split("test").source == "imglist:benchmark_imglist/cifar10/test_cifar10.txt@images_classic"
    c100 = get_benchmark("cifar100")
    assert c100.split("ood/near/cifar10").source.endswith("cifar100/test_cifar10.txt@images_classic")
    for name, n in (("imagenet200", 200), ("imagenet", 1000)):
        b = get_benchmark(name)
        assert b.num_classes == n
        assert b.split_names("ood-near") == ["ood/near/ssb_hard", "ood/near/ninco"]
        assert b.split_names("ood-far") == ["ood/far/inaturalist", "ood/far/textures", "ood/far/openimage_o"]
        assert b.split("ood/far/textures").source.endswith("@images_classic")
        assert b.split("train").source.endswith("@images_largescale")


def test_digits_benchmark_opens_every_split():
    bench = get_benchmark("digits")
    assert [s.name for s in bench.splits] == ["train", "val", "test", "ood/val/textures", *OOD_PARTS,
                                              "csid/digits-shifted"]
    assert bench.split("ood/val/textures").role == "ood-val"
    assert bench.split("ood/near/letters").role == "ood-near"
    assert bench.split("csid/digits-shifted").role == "csid" and not bench.split("csid/digits-shifted").optional
    for s in bench.splits:
        ds = bench.open(s.name, Path("unused"))
        assert len(ds) > 0 and ((ds.labels == -1).all() == s.is_ood)


def test_unknown_benchmark_and_split():
    with pytest.raises(UsageError, match="cifar10"):
        get_benchmark("nope")
    with pytest.raises(UsageError, match="ood/near/tin"):
        get_benchmark("cifar10").split("ood/near/nope")
    with pytest.raises(UsageError):
        open_source("nope:x", Path("unused"))


# --- imglist / folder / torchvision sources -----------------------------------------------


def _write_png(path: Path, value: int, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 5), value if mode == "L" else (value, 0, 0)).save(path)


def test_parse_imglist_line():
    assert parse_imglist_line("a/b.png 3") == ("a/b.png", 3)
    assert parse_imglist_line("a/b.png") == ("a/b.png", -1)
    assert parse_imglist_line('a/b.png {"label": 7, "soft": [1]}') == ("a/b.png", 7)
    assert parse_imglist_line("   ") is None


def test_imglist_source(tmp_path):
    lst = tmp_path / "benchmark_imglist" / "toy" / "test_toy.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("toy/a.png 2\ntoy/b.png 0\n\ntoy/c.png\n")
    for i, n in enumerate("abc"):
        _write_png(tmp_path / "images_classic" / "toy" / f"{n}.png", 10 * i)
    ds = open_source("imglist:benchmark_imglist/toy/test_toy.txt", tmp_path)
    assert ds.labels.tolist() == [2, 0, -1]
    assert ds.load(1).size == (6, 5) and ds.load(1).getpixel((0, 0)) == (10, 0, 0)
    assert ds.name == "imglist:benchmark_imglist/toy/test_toy.txt"
    ood = open_source("imglist:benchmark_imglist/toy/test_toy.txt", tmp_path, is_ood=True)
    assert (ood.labels == -1).all()
    # another image folder, given after '@'
    for n in "abc":
        _write_png(tmp_path / "images_largescale" / "toy" / f"{n}.png", 99)
    big = open_source("imglist:benchmark_imglist/toy/test_toy.txt@images_largescale", tmp_path)
    assert big.load(0).getpixel((0, 0)) == (99, 0, 0)


def test_imglist_missing_files(tmp_path):
    with pytest.raises(OodError) as e:
        open_source("imglist:benchmark_imglist/x/none.txt", tmp_path)
    assert "none.txt" in str(e.value) and "\n" not in str(e.value)
    lst = tmp_path / "l.txt"
    lst.write_text("gone.png 1\n")
    with pytest.raises(OodError, match="gone.png"):
        open_source("imglist:l.txt", tmp_path)


def test_folder_source(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _write_png(tmp_path / "toy" / cls / f"{i}.png", 40 * i)
    ds = open_source("folder:toy", tmp_path)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.class_names == ["cat", "dog"]
    assert ds.load(4).getpixel((0, 0)) == (80, 0, 0)
    assert (open_source(f"folder:{tmp_path / 'toy'}", Path("elsewhere"), is_ood=True).labels == -1).all()
    # a flat folder of images is one unlabelled set
    for i in range(2):
        _write_png(tmp_path / "flat" / f"{i}.jpg", 5)
    assert open_source("folder:flat", tmp_path).labels.tolist() == [-1, -1]
    with pytest.raises(OodError, match="missing"):
        open_source("folder:missing", tmp_path)


def test_torchvision_missing_files(tmp_path):
    root = tmp_path / "data"
    for spec in ("cifar10:test", "cifar100:train", "svhn:test", "mnist:test", "fashionmnist:train",
                 "dtd:val", "places365:val"):  # fmt: skip
        with pytest.raises(OodError) as e:
            open_source(f"torchvision:{spec}", root)
        msg = str(e.value)
        assert "\n" not in msg and str(root / spec.split(":")[0]) in msg and "download" in msg
        assert not isinstance(e.value, UsageError)
    with pytest.raises(UsageError):
        open_source("torchvision:cifar10:val", root)
    with pytest.raises(UsageError):
        open_source("torchvision:imagenet:val", root)


def _write_idx(path: Path, arr: np.ndarray):
    """MNIST's idx format: magic (unsigned byte type, ndim), big-endian sizes, data."""
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_torchvision_source_reads_labels_and_grayscale(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 251
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([7, 1, 4]))
    ds = open_source("torchvision:mnist:test", tmp_path)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [7, 1, 4]
    assert ds.name == "torchvision:mnist/test" and len(ds.class_names) == 10
    img = ds.load(2)
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), images[2])
    assert (open_source("torchvision:mnist:test", tmp_path, is_ood=True).labels == -1).all()


def test_folder_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    for i in range(2):
        _write_png(tmp_path / "work" / "imgs" / f"{i}.png", 10)
    monkeypatch.chdir(tmp_path / "work")
    ds = open_source("folder:imgs", tmp_path / "data-root")  # not under the data root: the working directory
    assert len(ds) == 2
    with pytest.raises(OodError) as e:
        open_source("folder:nope", tmp_path / "data-root")
    assert str(tmp_path / "data-root" / "nope") in str(e.value) and str(tmp_path / "work" / "nope") in str(e.value)


def test_folder_walk_survives_link_loops_and_lists_no_image_twice(tmp_path):
    import os

    for cls in ("a", "b"):
        for i in range(2):
            _write_png(tmp_path / "set" / cls / f"{i}.png", 10)
    os.symlink(tmp_path / "set", tmp_path / "set" / "a" / "loop")  # a link back up: a loop
    os.symlink(tmp_path / "set" / "b", tmp_path / "set" / "a" / "again")  # the same images twice
    ds = open_source("folder:set", tmp_path)
    assert ds.labels.tolist() == [0, 0, 1, 1]  # b's images stay b's, the loop is not entered
    assert len({os.path.realpath(f) for f in ds.files}) == len(ds.files) == 4


def test_folder_with_images_beside_class_folders_is_refused(tmp_path):
    _write_png(tmp_path / "mixed" / "a" / "0.png", 1)
    _write_png(tmp_path / "mixed" / "stray.png", 1)
    with pytest.raises(OodError, match="beside class sub-folders"):
        open_source("folder:mixed", tmp_path)


def test_every_format_pil_reads_and_sixteen_bit_images_by_their_range(tmp_path):
    from PIL import Image

    folder = tmp_path / "formats"
    folder.mkdir()
    frames = [Image.new("RGB", (8, 8), (200, 10, 10)), Image.new("RGB", (8, 8), (10, 200, 10))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    deep = np.full((8, 8), 32768, dtype=np.uint16)  # half of the 16-bit range
    Image.fromarray(deep).save(folder / "deep.png")
    ds = open_source("folder:formats", tmp_path)
    names = [f.name for f in ds.files]
    assert names == ["anim.gif", "deep.png"]
    grey = np.asarray(ds.load(names.index("deep.png")).convert("RGB"))
    assert abs(int(grey[0, 0, 0]) - 128) <= 1  # not clipped to 255
