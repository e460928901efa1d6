"""Bad inputs through the whole command line, one table.

Every case copies one digits store (built once per module), damages the copy or the
command line, runs ``oodcli.cli.main`` in-process and asserts:

- the exit code (1: the work failed, 2: bad usage) and no traceback anywhere;
- stderr is one line ``error: ...`` naming the problem and stdout is empty
  (``store verify`` instead prints ``problem:`` lines and its summary on stdout);
- nothing on disk changed: every file under the test's folder (so every node's
  attributes and every array chunk of the store, and whatever sits beside it) has the
  same bytes as before, a store that did not exist still does not, no ``.txn`` staging
  group is left in the store; the only file allowed to appear is the store's writer lock
  ``.<store name>.lock``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import one_line_error
from oodcli.cli import main
from oodcli.store import open_store

LOGITS = "splits/test/digits_cnn/logits"
CHUNK = f"{LOGITS}/c/0/0"  # the only chunk of the ID test logits (325 x 6 float16)
SCORE_CHUNK = "scores/msp/test/c/0"
NOISE = "splits/ood/far/noise"
REPAIR = "oodcli store verify"  # every damage message says how to look further


# ---- the store every case starts from ------------------------------------------------------------


class Base:
    """The module's digits store and checkpoint; other weights and an HDF5 store are made on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpt = root / "cnn.safetensors"
        self.store = root / "digits.zarr"
        self._other: Path | None = None
        self._h5: Path | None = None

    def other_ckpt(self) -> Path:
        """Other weights for the same network: the checkpoint with every float tensor scaled by 1 + 1% noise
        from seed 1 (training a second one, 'train classifier --seed 1', takes ~10 s on a small CPU box;
        multiplying keeps BatchNorm's running variances positive)."""
        if self._other is None:
            import torch
            from safetensors.torch import load_file, save_file

            gen = torch.Generator().manual_seed(1)
            tensors = {k: v * (1 + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point()
                       else v for k, v in load_file(self.ckpt).items()}
            other = self.root / "cnn-other.safetensors"
            save_file(tensors, other)
            self._other = other
        return self._other

    def h5(self) -> Path:
        """A small HDF5 store (test and noise splits)."""
        if self._h5 is None:
            path = self.root / "digits.h5"
            assert main(["-q", "extract", "--model", "digits_cnn", "--weights", str(self.ckpt), "--benchmark", "digits",
                         "--split", "test", "--split", "ood/far/noise", "--store", str(path)]) == 0
            self._h5 = path
        return self._h5


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    b = Base(tmp_path_factory.mktemp("bad_input"))
    assert main(["-q", "train", "classifier", "--out", str(b.ckpt), "--epochs", "2"]) == 0
    assert main(["-q", "extract", "--model", "digits_cnn", "--weights", str(b.ckpt), "--benchmark", "digits",
                 "--store", str(b.store)]) == 0
    assert main(["-q", "score", "msp,energy", "--store", str(b.store)]) == 0
    assert not (b.store / ".txn").exists()
    return b


# ---- what a case can do to its copy -----------------------------------------------------------------


@dataclass
class Ctx:
    tmp: Path  # the test's folder: everything below it is compared before and after
    base: Base
    cleanups: list = field(default_factory=list)

    @property
    def sdir(self) -> Path:
        return self.tmp / "s"

    @property
    def store(self) -> Path:
        return self.sdir / "digits.zarr"

    def fmt(self, arg: str) -> str:
        return arg.format(store=self.store, sdir=self.sdir, tmp=self.tmp, ckpt=self.base.ckpt, imgs=self.tmp / "imgs")


def _png_bytes(seed: int, size: int = 20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(seed: int, size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def image_folder(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png_bytes(i))
    return folder


def rm(rel: str):
    def damage(c: Ctx) -> None:
        path = c.store / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def truncate(rel: str):
    def damage(c: Ctx) -> None:
        path = c.store / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return damage


def flip(rel: str):
    def damage(c: Ctx) -> None:
        path = c.store / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))

    return damage


def garble(rel: str):
    def damage(c: Ctx) -> None:
        assert (c.store / rel).is_file()
        (c.store / rel).write_text("{not json")

    return damage


def drop_n_attr(rel: str):
    """Remove one attribute from a node's zarr.json (the Store API only adds attributes)."""

    def damage(c: Ctx) -> None:
        meta_file = c.store / rel / "zarr.json"
        meta = json.loads(meta_file.read_text())
        del meta["attributes"]["n"]
        meta_file.write_text(json.dumps(meta))

    return damage


def new_split_without_n(c: Ctx) -> None:
    """labels and ids written, but the split's attributes lack ``n`` (an extract that died in between)."""
    with open_store(c.store, "r+") as st:
        st.write_array("splits/ood/far/half/labels", np.full(5, -1, np.int64))
        st.write_array("splits/ood/far/half/ids", np.arange(5, dtype=np.int64))
        st.set_attrs("splits/ood/far/half", role="ood-far")


def empty_split(c: Ctx) -> None:
    with open_store(c.store, "r+") as st:
        st.write_array("splits/ood/far/empty/labels", np.zeros(0, np.int64))
        st.write_array("splits/ood/far/empty/ids", np.zeros(0, np.int64))
        st.set_attrs("splits/ood/far/empty", role="ood-far", n=0)


def nan_row(node: str):
    def damage(c: Ctx) -> None:
        with open_store(c.store, "r+") as st:
            row = np.full((1, *st.shape(node)[1:]), np.nan, dtype=st.dtype(node))
            st.write_rows(node, 3, row)

    return damage


def hold_lock(c: Ctx) -> None:
    """Another writer: this process holds the store open for writing while the command runs."""
    st = open_store(c.store, "r+")
    c.cleanups.append(st.close)


def other_weights(c: Ctx) -> None:
    """ood/far/noise re-extracted with another checkpoint (--overwrite)."""
    code = main(["-q", "extract", "--model", "digits_cnn", "--weights", str(c.base.other_ckpt()), "--benchmark",
                 "digits", "--split", "ood/far/noise", "--store", str(c.store), "--overwrite"])
    assert code == 0


def bad_images(kind: str):
    def damage(c: Ctx) -> None:
        folder = image_folder(c.tmp / "bad")
        if kind == "png":
            data = _png_bytes(99, size=64)
            (folder / "broken.png").write_bytes(data[: len(data) // 2])
        elif kind == "jpeg":
            data = _jpeg_bytes(99)
            (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
        else:
            (folder / "x.png").write_text("this is not an image\n")

    return damage


def foreign_zarr(with_array: bool):
    def damage(c: Ctx) -> None:
        import zarr

        group = zarr.open_group(c.sdir / "foreign.zarr", mode="w", zarr_format=3)
        group.attrs["owner"] = "someone else"
        if with_array:
            group.create_array("data", shape=(4,), dtype="int64")[:] = np.arange(4)

    return damage


def write_file(rel: str, data: bytes = b"not a store\n"):
    def damage(c: Ctx) -> None:
        path = c.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return damage


def make_dir(rel: str):
    def damage(c: Ctx) -> None:
        (c.tmp / rel).mkdir(parents=True, exist_ok=True)

    return damage


def truncated_h5(c: Ctx) -> None:
    """A real HDF5 store cut in half."""
    target = c.sdir / "digits.h5"
    data = c.base.h5().read_bytes()
    target.write_bytes(data[: len(data) // 2])


# ---- the table ------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]  # formatted with {store} {sdir} {tmp} {ckpt} {imgs}
    code: int
    expect: tuple[str, ...]  # all of these in the error line (in stdout for verify)
    damage: Callable[[Ctx], None] | None = None
    verify: bool = False  # 'store verify': problem lines on stdout instead of one error line
    watch: str = "s/digits.zarr"  # the store (relative to the test folder) whose lock file may appear
    fast: bool = False  # must fail before any training


S = ["--store", "{store}"]
EXTRACT = ["extract", "--model", "digits_cnn", "--weights", "{ckpt}"]
FOLDER = [*EXTRACT, "--data", "folder:{imgs}", *S, "--split"]
VERIFY = ["store", "verify", "{store}"]
DAMAGED = ("is damaged", REPAIR)

CASES = [
    # -- Zarr damage: a missing chunk
    Case("missing-chunk-score", ["score", "msp", *S], 1, (*DAMAGED, LOGITS, "chunk 0", "missing"), rm(CHUNK)),
    Case("missing-chunk-report", ["report", *S], 1, (*DAMAGED, LOGITS, "missing"), rm(CHUNK)),
    Case("missing-chunk-verify", VERIFY, 1, (f"problem: {LOGITS}: 1 chunk(s) missing",), rm(CHUNK), verify=True),
    Case("missing-score-chunk-report", ["report", *S], 1, (*DAMAGED, "scores/msp/test", "missing"), rm(SCORE_CHUNK)),
    Case("missing-score-chunk-verify", VERIFY, 1, ("problem: scores/msp/test: 1 chunk(s) missing",),
         rm(SCORE_CHUNK), verify=True),
    # -- a truncated chunk
    Case("truncated-chunk-score", ["score", "msp", *S], 1, (*DAMAGED, LOGITS), truncate(CHUNK)),
    Case("truncated-chunk-report", ["report", *S], 1, (*DAMAGED, LOGITS), truncate(CHUNK)),
    Case("truncated-chunk-verify", VERIFY, 1, (f"problem: {LOGITS}: unreadable",), truncate(CHUNK), verify=True),
    # -- one flipped byte (the crc32c checksum catches it)
    Case("flipped-byte-score", ["score", "msp", *S], 1, (*DAMAGED, LOGITS), flip(CHUNK)),
    Case("flipped-byte-report", ["report", *S], 1, (*DAMAGED, LOGITS), flip(CHUNK)),
    Case("flipped-byte-verify", VERIFY, 1, (f"problem: {LOGITS}: unreadable",), flip(CHUNK), verify=True),
    Case("flipped-score-byte-report", ["report", *S], 1, (*DAMAGED, "scores/msp/test"), flip(SCORE_CHUNK)),
    # -- garbled or missing metadata
    Case("garbled-array-json-score", ["score", "msp", *S], 1, (*DAMAGED, LOGITS), garble(f"{LOGITS}/zarr.json")),
    Case("garbled-array-json-verify", VERIFY, 1, ("splits/test/digits_cnn", "unreadable"), garble(f"{LOGITS}/zarr.json"),
         verify=True),
    # (zarr reads a group's members' metadata to list them, so the parent of the garbled node is named)
    Case("garbled-group-json-score", ["score", "msp", *S], 1, (*DAMAGED, "splits/test"),
         garble("splits/test/digits_cnn/zarr.json")),
    Case("garbled-group-json-verify", VERIFY, 1, ("problem: test: unreadable", "splits/test"),
         garble("splits/test/digits_cnn/zarr.json"), verify=True),
    Case("garbled-split-json-score", ["score", "msp", *S], 1, (*DAMAGED, "splits/ood/far"),
         garble(f"{NOISE}/zarr.json")),
    Case("garbled-split-json-report", ["report", *S], 1, (*DAMAGED, "splits/ood/far"), garble(f"{NOISE}/zarr.json")),
    Case("garbled-split-json-verify", VERIFY, 1, ("splits/ood/far",), garble(f"{NOISE}/zarr.json"), verify=True),
    Case("garbled-scores-json-report", ["report", *S], 1, (*DAMAGED, "scores/msp"),
         garble("scores/msp/test/zarr.json")),
    Case("deleted-array-json-score", ["score", "msp", *S], 1, (*DAMAGED, "splits/test/digits_cnn' lost its layer logits"), rm(f"{LOGITS}/zarr.json")),
    Case("deleted-array-json-verify", VERIFY, 1, ("layer 'logits' promised by its attributes is missing",),
         rm(f"{LOGITS}/zarr.json"), verify=True),
    Case("garbled-root-json-score", ["score", "msp", *S], 1, ("cannot open store",), garble("zarr.json")),
    Case("garbled-root-json-report", ["report", *S], 1, ("cannot open store",), garble("zarr.json")),
    Case("garbled-root-json-info", ["store", "info", "{store}"], 1, ("cannot open store",), garble("zarr.json")),
    Case("garbled-root-json-verify", VERIFY, 1, ("cannot open store",), garble("zarr.json")),  # nothing to list
    # -- half-made splits
    Case("no-ids-score", ["score", "msp", *S], 1, ("half-made", "ood/far/noise", "oodcli store rm"), rm(f"{NOISE}/ids")),
    Case("no-ids-score-named", ["score", "msp", *S, "--ood", "ood/far/noise"], 1,
         ("half-made", "ood/far/noise", "oodcli store rm"), rm(f"{NOISE}/ids")),
    Case("no-ids-report", ["report", *S], 1, ("half-made", "ood/far/noise", "oodcli store rm"), rm(f"{NOISE}/ids")),
    Case("no-ids-verify", VERIFY, 1, ("problem: ood/far/noise: half-made split", "oodcli store rm"),
         rm(f"{NOISE}/ids"), verify=True),
    Case("no-n-new-split-score", ["score", "msp", *S], 1, ("half-made", "ood/far/half", "oodcli store rm"),
         new_split_without_n),
    Case("no-n-new-split-report", ["report", *S], 1, ("half-made", "ood/far/half"), new_split_without_n),
    Case("no-n-attr-score", ["score", "msp", *S], 1, ("half-made", "ood/far/noise", "oodcli store rm"),
         drop_n_attr(NOISE)),
    Case("no-n-attr-verify", VERIFY, 1, ("problem: ood/far/noise: half-made split",), drop_n_attr(NOISE), verify=True),
    # -- an empty split
    Case("empty-split-score", ["score", "msp", *S], 1, ("'ood/far/empty'", "is empty"), empty_split),
    Case("empty-split-report", ["report", *S], 1, ("'ood/far/empty'", "is empty"), empty_split),
    # -- names that cannot become nodes
    *[
        Case(f"split-name-{i}", [*FOLDER, name], 2, ("--split", "is not a valid name"))
        for i, name in enumerate(["", "ood//far/x", "ood/far/x/", "/ood/far/x", "ood/../x", "ood/./x", ".hidden",
                                  "ood/far/.x", " ood/x", "ood/far/x ", "ood/far/x\\y", "ood/far/x\ty", "zarr.json",
                                  "ood/c/x"])
    ],
    Case("split-nests-above", [*FOLDER, "ood/far"], 2, ("would nest", "ood/far/noise")),
    Case("split-nests-below", [*FOLDER, "ood/far/noise/sub"], 2, ("would nest", "ood/far/noise", "'ood/far/noise-sub'")),
    Case("split-nests-test", [*FOLDER, "test/sub", "--role", "ood"], 2, ("would nest", "e.g. 'test-sub'")),
    Case("id-split-without-labels", [*FOLDER, "val2", "--role", "id"], 1, ("'val2'", "no labels", "--role ood")),
    Case("split-newline", [*FOLDER, "ood/far/a\nb"], 2, ("'ood/far/a\\nb'", "control character")),
    Case("shard-huge", [*FOLDER, "ood/far/x", "--shard", "1/1000000000000"], 2, ("at most 100000 shards",)),
    Case("collisions-nan", ["analyze", "collisions", *S, "--threshold", "nan"], 2, ("--threshold nan", "[0, 2]")),
    Case("split-other-data", [*FOLDER, "test", "--role", "ood"], 1, ("'test'", "holds other data", "--overwrite")),
    Case("as-slash", ["score", "msp", *S, "--as", "a/b"], 2, ("--as", "'a/b'")),
    Case("as-empty", ["score", "msp", *S, "--as", ""], 2, ("--as", "is not a valid name", "empty")),
    Case("as-dotdot", ["score", "msp", *S, "--as", ".."], 2, ("--as", "is not a valid name")),
    Case("index-name", ["index", *S, "--source", "grads/grood/train", "--name", "a//b"], 2,
         ("--name", "is not a valid name")),
    Case("score-id-unknown", ["score", "msp", *S, "--id", "nope"], 1, ("no split 'nope'",)),
    Case("score-id-bad-name", ["score", "msp", *S, "--id", "../test"], 2, ("--id", "is not a valid name")),
    Case("score-ood-unknown", ["score", "msp", *S, "--ood", "ood/far/nope"], 1, ("no split 'ood/far/nope'",)),
    Case("score-train-empty-name", ["score", "knn", *S, "--train", ""], 2, ("--train", "is not a valid name")),
    Case("report-id-unknown", ["report", *S, "--id", "nope"], 1, ("no split 'nope'",)),
    Case("rm-unknown", ["store", "rm", "{store}", "nope"], 2, ("no split, method or node 'nope'",)),
    Case("rm-bad-name", ["store", "rm", "{store}", "splits/../x"], 2, ("is not a valid name",)),
    # -- images that cannot be decoded: one line naming the file, the split never appears
    Case("truncated-png", [*EXTRACT, "--data", "folder:{tmp}/bad", *S, "--split", "ood/far/bad"], 1,
         ("broken.png", "cannot be read", "nothing was written"), bad_images("png")),
    Case("truncated-jpeg", [*EXTRACT, "--data", "folder:{tmp}/bad", *S, "--split", "ood/far/bad"], 1,
         ("broken.jpg", "cannot be read"), bad_images("jpeg")),
    Case("text-as-png", [*EXTRACT, "--data", "folder:{tmp}/bad", *S, "--split", "ood/far/bad"], 1,
         ("/x.png", "cannot be read"), bad_images("text")),
    Case("truncated-png-new-store", [*EXTRACT, "--data", "folder:{tmp}/bad", "--store", "{sdir}/new.zarr", "--split",
                                     "ood/far/bad"], 1, ("broken.png", "cannot be read"), bad_images("png"),
         watch="s/new.zarr"),
    Case("image-folder-missing", [*EXTRACT, "--data", "folder:{tmp}/nowhere", *S, "--split", "ood/far/x"], 1,
         ("nowhere", "not found")),
    Case("image-folder-empty", [*EXTRACT, "--data", "folder:{tmp}/empty", *S, "--split", "ood/far/x"], 1,
         ("no images",), make_dir("empty")),
    # -- output paths that cannot be written: refused before any training
    Case("train-out-under-file", ["train", "classifier", "--out", "{tmp}/file/x.safetensors", "--epochs", "2"], 2,
         ("--out", "is a file, not a folder"), write_file("file"), fast=True),
    Case("train-out-folder", ["train", "classifier", "--out", "{tmp}/folder", "--epochs", "2"], 2,
         ("--out", "is a folder"), make_dir("folder"), fast=True),
    Case("report-html-folder", ["report", *S, "--html", "{tmp}/folder"], 2, ("--html", "is a folder"),
         make_dir("folder"), fast=True),
    Case("report-html-under-file", ["report", *S, "--html", "{tmp}/file/r.html"], 2, ("--html", "is a file"),
         write_file("file"), fast=True),
    Case("report-plots-file", ["report", *S, "--plots", "{tmp}/file"], 2, ("--plots", "is a file"),
         write_file("file"), fast=True),
    Case("palm-out-folder", ["train", "palm", "--head-only", *S, "--k", "2", "--epochs", "1", "--out", "{tmp}/folder"],
         2, ("--out", "is a folder"), make_dir("folder"), fast=True),
    Case("palm-out-under-file", ["train", "palm", "--head-only", *S, "--k", "2", "--epochs", "1", "--out",
                                 "{tmp}/file/p.safetensors"], 2, ("--out", "is a file"), write_file("file"), fast=True),
    # -- missing stores and things that are not stores
    Case("store-missing-score", ["score", "msp", "--store", "{sdir}/nope.zarr"], 1, ("no store at",),
         watch="s/nope.zarr"),
    Case("store-missing-report", ["report", "--store", "{sdir}/nope.zarr"], 1, ("no store at",), watch="s/nope.zarr"),
    Case("store-missing-verify", ["store", "verify", "{sdir}/nope.zarr"], 1, ("no store at",), watch="s/nope.zarr"),
    Case("store-missing-rm", ["store", "rm", "{sdir}/nope.zarr", "x"], 1, ("no store at",), watch="s/nope.zarr"),
    Case("store-is-file", ["score", "msp", "--store", "{sdir}/f.zarr"], 1, ("is a file, not a Zarr store",),
         write_file("s/f.zarr"), watch="s/f.zarr"),
    Case("store-is-file-extract", [*EXTRACT, "--benchmark", "digits", "--store", "{sdir}/f.zarr"], 1,
         ("is a file, not a Zarr store",), write_file("s/f.zarr"), watch="s/f.zarr"),
    Case("foreign-zarr-score", ["score", "msp", "--store", "{sdir}/foreign.zarr"], 1, ("not an oodcli store",),
         foreign_zarr(True), watch="s/foreign.zarr"),
    Case("foreign-zarr-extract", [*EXTRACT, "--benchmark", "digits", "--store", "{sdir}/foreign.zarr"], 1,
         ("not an oodcli store",), foreign_zarr(True), watch="s/foreign.zarr"),
    Case("foreign-empty-zarr-score", ["score", "msp", "--store", "{sdir}/foreign.zarr"], 1, ("not an oodcli store",),
         foreign_zarr(False), watch="s/foreign.zarr"),
    Case("foreign-empty-zarr-report", ["report", "--store", "{sdir}/foreign.zarr"], 1, ("not an oodcli store",),
         foreign_zarr(False), watch="s/foreign.zarr"),
    Case("garbage-h5-score", ["score", "msp", "--store", "{sdir}/g.h5"], 1, ("cannot open store",),
         write_file("s/g.h5", b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8), watch="s/g.h5"),
    Case("garbage-h5-report", ["report", "--store", "{sdir}/g.h5"], 1, ("cannot open store",),
         write_file("s/g.h5", b"garbage" * 100), watch="s/g.h5"),
    Case("garbage-h5-extract", [*EXTRACT, "--benchmark", "digits", "--store", "{sdir}/g.h5"], 1,
         ("cannot open store",), write_file("s/g.h5", b"garbage" * 100), watch="s/g.h5"),
    # -- wrong options
    Case("unknown-method", ["score", "bogus", *S], 2, ("unknown method 'bogus'",)),
    Case("param-unknown", ["score", "msp", *S, "-p", "msp.bogus=1"], 2, ("has no parameter bogus",)),
    Case("param-not-a-number", ["score", "knn", *S, "-p", "knn.k=abc"], 2, ("knn", "abc")),
    Case("param-out-of-range", ["score", "knn", *S, "-p", "knn.k=0"], 2, ("knn", "k must be")),
    Case("param-too-big", ["score", "knn", *S, "-p", "knn.k=100000"], 2, ("knn.k=100000",)),
    Case("param-no-value", ["score", "msp", *S, "-p", "msp"], 2, ("not KEY=VALUE",)),
    Case("param-energy-text", ["score", "energy", *S, "-p", "energy.temperature=hot"], 2, ("energy", "hot")),
    Case("param-int-given-fraction", ["score", "knn", *S, "-p", "knn.k=1.5"], 2, ("knn.k", "integer")),
    Case("param-float-given-flag", ["score", "energy", *S, "-p", "energy.temperature=true"], 2, ("energy.temperature", "number")),
    Case("param-negative-temperature", ["score", "energy", *S, "-p", "energy.temperature=-1"], 2, ("temperature must be > 0",)),
    Case("param-nan", ["score", "energy", *S, "-p", "energy.temperature=nan"], 2, ("finite",)),
    Case("param-other-method", ["score", "msp", *S, "-p", "energy.temperature=2"], 2, ("'energy'", "not being scored")),
    Case("param-twice", ["score", "energy", *S, "-p", "energy.temperature=2", "-p", "energy.temperature=3"], 2, ("twice",)),
    Case("param-empty-key", ["score", "energy", *S, "-p", "=5"], 2, ("not KEY=VALUE",)),
    Case("report-format", ["report", *S, "--format", "xml"], 2, ("unknown --format 'xml'",)),
    Case("report-methods-unknown", ["report", *S, "--methods", "msp,nothing"], 2, ("no scores for nothing",)),
    Case("score-backbone-unknown", ["score", "msp", *S, "--backbone", "nope"], 1, ("nope",)),
    Case("score-train-ood-knn", ["score", "knn", *S, "--train", "ood/far/noise"], 1, ("OOD rows",)),
    Case("score-train-ood-mahalanobis", ["score", "mahalanobis", *S, "--train", "ood/far/noise"], 1, ("OOD rows",)),
    Case("score-ood-is-id", ["score", "msp", *S, "--ood", "test"], 2, ("--ood", "'test'")),
    Case("extract-dtype", [*EXTRACT, "--benchmark", "digits", *S, "--dtype", "float8"], 2, ("--dtype",)),
    Case("extract-device", [*EXTRACT, "--benchmark", "digits", *S, "--device", "tpu"], 2, ("--device",)),
    Case("extract-model", ["extract", "--model", "nope", "--benchmark", "digits", *S], 2, ("unknown model 'nope'",)),
    Case("extract-benchmark", [*EXTRACT, "--benchmark", "nope", *S], 2, ("unknown benchmark",)),
    Case("extract-layers", [*EXTRACT, "--benchmark", "digits", *S, "--layers", "nope"], 2, ("no layer nope",)),
    Case("extract-split-of-benchmark", [*EXTRACT, "--benchmark", "digits", *S, "--split", "ood/far/nope"], 2,
         ("ood/far/nope",)),
    Case("extract-weights-missing", ["extract", "--model", "digits_cnn", "--weights", "{tmp}/none.safetensors",
                                     "--benchmark", "digits", *S], 1, ("not found",)),
    Case("extract-weights-garbage", ["extract", "--model", "digits_cnn", "--weights", "{tmp}/junk.safetensors",
                                     "--data", "folder:{imgs}", *S, "--split", "ood/far/new"], 1, ("junk.safetensors",),
         write_file("junk.safetensors", b"\x00" * 64)),
    Case("extract-batch-size", [*EXTRACT, "--benchmark", "digits", *S, "--batch-size", "0"], 2, ("--batch-size",)),
    Case("score-unknown-option", ["score", "msp", *S, "--batch", "3"], 2, ("No such option: --batch",)),
    Case("report-id-empty", ["report", *S, "--id", ""], 2, ("--id", "is not a valid name")),
    Case("select-k-range", ["select-k", *S, "--k-range", "5..2"], 2, ("--k-range",)),
    Case("select-k-covariance", ["select-k", *S, "--covariance", "bogus"], 2, ("--covariance",)),
    Case("grood-prototype", ["synthesize", "grood", *S, "--ood-prototype", "bogus"], 2, ("--ood-prototype",)),
    Case("index-source-missing", ["index", *S, "--source", f"{LOGITS}x"], 1, (f"no array '{LOGITS}x'",)),
    Case("index-kind", ["index", *S, "--source", LOGITS, "--kind", "bogus"], 2, ("unknown index kind 'bogus'",)),
    Case("apex-without-select-k", ["train", "apex", "--head-only", *S, "--epochs", "1"], 1, ("no select-k result",)),
    Case("collisions-without-prototypes", ["analyze", "collisions", *S], 1, ("holds no prototypes",)),
    Case("extract-benchmark-and-data", [*EXTRACT, "--benchmark", "digits", "--data", "folder:{imgs}", *S], 2,
         ("either --benchmark or --data",)),
    # -- another writer holds the store
    Case("locked-score", ["score", "msp", *S], 1, ("another oodcli command is writing",), hold_lock),
    Case("locked-rm", ["store", "rm", "{store}", "ood/far/noise"], 1, ("another oodcli command is writing",), hold_lock),
    Case("locked-extract", [*FOLDER, "ood/far/new"], 1, ("another oodcli command is writing",), hold_lock),
    # -- splits whose features came from other weights
    Case("other-weights-score", ["score", "msp", *S], 1, ("different 'digits_cnn' weights",), other_weights),
    # -- NaN features (written behind the attributes' back)
    Case("nan-features-score", ["score", "msp", *S], 1, ("NaN", "ood/far/noise"), nan_row(f"{NOISE}/digits_cnn/logits")),
    Case("nan-features-verify", VERIFY, 1, ("ood/far/noise/digits_cnn/logits: holds NaN or inf",),
         nan_row(f"{NOISE}/digits_cnn/logits"), verify=True),
    # -- HDF5
    Case("truncated-h5-score", ["score", "msp", "--store", "{sdir}/digits.h5"], 1, ("cannot open store",),
         truncated_h5, watch="s/digits.h5"),
    Case("truncated-h5-verify", ["store", "verify", "{sdir}/digits.h5"], 1, ("cannot open store",),
         truncated_h5, watch="s/digits.h5"),
]


# ---- running and comparing ------------------------------------------------------------------------


def snapshot(root: Path, skip: set[Path]) -> dict[str, str]:
    """Every path below ``root``: 'dir', or the sha256 of the file's bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path in skip:
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def describe_changes(before: dict[str, str], after: dict[str, str]) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added[:8]}, removed {removed[:8]}, changed {changed[:8]}"


def run_cli(capsys, argv: list[str]) -> tuple[int | None, str, str]:
    try:
        code = main(argv)
        tb = ""
    except BaseException:  # anything main() lets escape is a bug: show it as the traceback it is
        code, tb = None, traceback.format_exc()
    captured = capsys.readouterr()
    return code, captured.out, captured.err + tb


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, base: Base, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default output would land in the compared folder
    ctx = Ctx(tmp_path, base)
    ctx.sdir.mkdir()
    shutil.copytree(base.store, ctx.store)
    image_folder(tmp_path / "imgs")
    try:
        if case.damage is not None:
            case.damage(ctx)
        capsys.readouterr()
        watched = tmp_path / case.watch
        lock = watched.parent / f".{watched.name}.lock"
        existed = watched.exists()
        before = snapshot(tmp_path, {lock})
        argv = [ctx.fmt(a) for a in case.argv]
        t0 = time.perf_counter()
        code, out, err = run_cli(capsys, argv)
        seconds = time.perf_counter() - t0
        after = snapshot(tmp_path, {lock})
    finally:
        for cleanup in reversed(ctx.cleanups):
            cleanup()

    shown = f"argv {argv}\nexit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, shown
    assert code == case.code, shown
    if case.verify:
        lines = [line for line in out.splitlines() if line.strip()]
        assert err.strip() == "", shown
        assert lines and all(line.startswith("problem: ") for line in lines[:-1]), shown
        assert lines[-1].endswith(f"{len(lines) - 1} problem(s)"), shown
        assert all(text in out for text in case.expect), shown
    else:
        assert one_line_error(err), shown
        assert out.strip() == "", shown
        line = err.strip()
        assert all(text in line for text in case.expect), shown
    assert watched.exists() == existed, f"{watched} {'appeared' if not existed else 'vanished'}\n{shown}"
    if watched.is_dir():
        assert not (watched / ".txn").exists(), f"staging group left in {watched}\n{shown}"
    assert after == before, f"files changed: {describe_changes(before, after)}\n{shown}"
    if case.fast:
        assert seconds < 5, f"took {seconds:.1f} s: the output path was not checked before the work\n{shown}"


def test_a_successful_write_leaves_no_staging(base: Base, tmp_path: Path, capsys):
    """A command that wrote through a transaction leaves no '.txn' group: its presence makes every later
    reader take the writer lock and change the store, and 'store verify' on a held store report it."""
    copy = tmp_path / "digits.zarr"
    shutil.copytree(base.store, copy)
    assert main(["-q", "score", "msp", "--store", str(copy), "--as", "again"]) == 0
    capsys.readouterr()
    assert not (copy / ".txn").exists()


def test_overwritten_features_take_their_scores_with_them(base: Base, tmp_path: Path, capsys):
    """'extract --overwrite' with other weights replaces ood/far/noise's features: the scores made from the
    old ones go too, and the report says the set is not scored rather than showing the old numbers."""
    c = Ctx(tmp_path, base)
    shutil.copytree(base.store, c.store)
    other_weights(c)
    capsys.readouterr()
    with open_store(c.store) as st:
        assert not st.exists("scores/msp/ood/far/noise") and st.exists("scores/msp/ood/far/textures")
    assert main(["report", "--store", str(c.store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    msp = report["methods"]["msp"]
    assert msp["missing"] == ["ood/far/noise"] and "ood/far/noise" not in msp["sets"]
    assert "far" not in msp["averages"] and "near" in msp["averages"]  # no far average over fewer sets


def test_hdf5_store_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    """h5py's create error carries no file name; the refusal names the store, and nothing is left."""
    import h5py

    from conftest import one_line_error, run

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Unable to synchronously create file (unable to open file)")

    monkeypatch.setattr(h5py, "File", refuse)
    store = tmp_path / "ro" / "s.h5"
    code, out, err = run(capsys, "extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--split", "test",
                         "--store", store)
    assert code == 1 and one_line_error(err) and f"cannot create store {store}: Permission denied" in err
    assert not store.exists() and not any(p.name.endswith(".new") for p in (tmp_path / "ro").iterdir())


def test_ctrl_c_while_the_command_line_loads_is_one_line_and_130():
    import subprocess
    import sys

    code = ("import builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'typer':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from oodcli.__main__ import run; run()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted" and "Traceback" not in proc.stderr
