import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import oodcli.backbones.base as registry
import oodcli.extraction as ex
from oodcli.backbones import get_spec
from oodcli.errors import OodError
from oodcli.store import open_store

MODEL = "digits_cnn-tiny"


def _extract(store_path, data, split="train", layers=("logits", "penultimate"), **kw):
    spec = get_spec(kw.pop("model", MODEL))
    with open_store(store_path, "a") as st:
        return ex.extract_split(
            st, spec, kw.pop("weights", None), data, split, "id", "test:data",
            ex.LazyModel(spec, None, ex.resolve_device("cpu")), tuple(layers), **kw,
        )


def _arrays(store_path, split="train", model=MODEL):
    with open_store(store_path) as st:
        node = f"splits/{split}/{model}"
        attrs = st.node_attrs(node)
        done = slice(0, attrs["rows_done"])  # rows past rows_done are not written yet (reading them is an error)
        return {name: st.read(name, done) for name in st.walk_arrays(f"splits/{split}")} | {"attrs": attrs}


def test_extract_writes_declared_layers(tmp_path, images):
    data = images("fake:train", 50)
    r = _extract(tmp_path / "s.zarr", data, batch_size=16)
    assert (r.status, r.rows, r.rows_computed) == ("extracted", 50, 50)
    out = _arrays(tmp_path / "s.zarr")
    assert out["splits/train/digits_cnn-tiny/logits"].shape == (50, 6)
    assert out["splits/train/digits_cnn-tiny/penultimate"].shape == (50, 128)
    assert out["splits/train/digits_cnn-tiny/logits"].dtype == np.float16
    np.testing.assert_array_equal(out["splits/train/labels"], data.labels)
    np.testing.assert_array_equal(out["splits/train/ids"], np.arange(50))
    assert out["attrs"]["complete"] and out["attrs"]["rows_done"] == 50
    # the stored features are the model's own outputs, batch by batch
    spec = get_spec(MODEL)
    net = spec.build(None)
    x = np.stack([spec.preprocess.to_transform()(data.load(i)).numpy() for i in range(50)])
    import torch

    with torch.no_grad():
        ref = net(torch.from_numpy(x), ("logits",))["logits"].numpy()
    np.testing.assert_allclose(out["splits/train/digits_cnn-tiny/logits"], ref.astype(np.float16), rtol=1e-3, atol=1e-3)


def test_head_is_saved_with_the_features(tmp_path, images):
    _extract(tmp_path / "s.zarr", images("fake:train", 20))
    with open_store(tmp_path / "s.zarr") as st:
        w = st.read("backbones/digits_cnn-tiny/head/weight")
        b = st.read("backbones/digits_cnn-tiny/head/bias")
        feats = st.read("splits/train/digits_cnn-tiny/penultimate").astype(np.float32)
        logits = st.read("splits/train/digits_cnn-tiny/logits").astype(np.float32)
    np.testing.assert_allclose(feats @ w.T + b, logits, atol=2e-2)


def test_cache_hit_does_no_work(tmp_path, images, monkeypatch):
    data = images("fake:train", 30)
    _extract(tmp_path / "s.zarr", data)
    spec = get_spec(MODEL)

    def explode(weights):
        raise AssertionError("a cache hit must not build the backbone")

    monkeypatch.setitem(registry._REGISTRY, MODEL, dataclasses.replace(spec, builder=explode))
    r = _extract(tmp_path / "s.zarr", data)
    assert (r.status, r.rows_computed) == ("cached", 0)


def test_fingerprint_mismatch_is_refused_then_overwritten(tmp_path, images):
    data = images("fake:train", 30)
    _extract(tmp_path / "s.zarr", data)
    with pytest.raises(OodError, match="dtype"):
        _extract(tmp_path / "s.zarr", data, dtype="float32")
    r = _extract(tmp_path / "s.zarr", data, layers=("logits",), overwrite=True)
    assert r.status == "extracted"
    out = _arrays(tmp_path / "s.zarr")
    assert "splits/train/digits_cnn-tiny/penultimate" not in out


def test_fewer_layers_are_a_cache_hit_and_more_add_only_the_missing(tmp_path, images, monkeypatch):
    data = images("fake:train", 30)
    store = tmp_path / "s.zarr"
    _extract(store, data, layers=("logits", "penultimate"), batch_size=8, chunk_rows=16)
    before = _arrays(store)
    spec = get_spec(MODEL)

    def explode(weights):
        raise AssertionError("a subset of the stored layers must not build the backbone")

    monkeypatch.setitem(registry._REGISTRY, MODEL, dataclasses.replace(spec, builder=explode))
    r = _extract(store, data, layers=("logits",))
    assert (r.status, r.rows_computed, r.layers) == ("cached", 0, ["logits"])
    monkeypatch.undo()
    # more layers: one pass for the missing one, the kept arrays untouched
    r = _extract(store, data, layers=("logits", "penultimate", "featmap"), batch_size=8, featmap_pool=2)
    assert (r.status, r.rows_computed) == ("extended", 30)
    after = _arrays(store)
    node = f"splits/train/{MODEL}"
    for layer in ("logits", "penultimate"):
        assert np.array_equal(after[f"{node}/{layer}"], before[f"{node}/{layer}"])
    assert after["attrs"]["layers"] == ["featmap", "logits", "penultimate"]
    # the same arrays as extracting all three at once, and the same fingerprint: a cache hit afterwards
    fresh = tmp_path / "fresh.zarr"
    _extract(fresh, data, layers=("logits", "penultimate", "featmap"), batch_size=8, chunk_rows=16, featmap_pool=2)
    once = _arrays(fresh)
    assert np.array_equal(after[f"{node}/featmap"], once[f"{node}/featmap"])
    assert after["attrs"]["fingerprint"] == once["attrs"]["fingerprint"]
    assert _extract(store, data, layers=("featmap", "logits", "penultimate"), featmap_pool=2).status == "cached"
    # a featmap pooled differently is not the same layer: refused as before
    with pytest.raises(OodError, match="featmap_pool"):
        _extract(store, data, layers=("featmap",), featmap_pool=4)


def test_other_data_under_the_same_split_name_is_refused(tmp_path, images):
    _extract(tmp_path / "s.zarr", images("fake:train", 30))
    with pytest.raises(OodError, match="holds other data"):
        _extract(tmp_path / "s.zarr", images("other:train", 30, seed=1))


def test_both_backends_give_identical_arrays(tmp_path, images):
    data = images("fake:train", 40)
    _extract(tmp_path / "s.zarr", data, chunk_rows=16, batch_size=8)
    _extract(tmp_path / "s.h5", data, chunk_rows=16, batch_size=8)
    a, b = _arrays(tmp_path / "s.zarr"), _arrays(tmp_path / "s.h5")
    assert a.keys() == b.keys()
    for k in a:
        if k != "attrs":
            np.testing.assert_array_equal(a[k], b[k])
    assert a["attrs"] == b["attrs"]


def test_interrupt_keeps_whole_chunks_and_resumes(tmp_path, images, monkeypatch):
    data = images("fake:train", 100)
    _extract(tmp_path / "ref.zarr", data, chunk_rows=20, batch_size=10)
    calls = {"n": 0}
    real = ex.run_backbone

    def interrupted(model, x, layers):
        calls["n"] += 1
        if calls["n"] == 6:  # after 5 batches = 50 rows: two whole chunks of 20 and half a chunk
            raise KeyboardInterrupt
        return real(model, x, layers)

    monkeypatch.setattr(ex, "run_backbone", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path / "s.zarr", data, chunk_rows=20, batch_size=10)
    attrs = _arrays(tmp_path / "s.zarr")["attrs"]
    assert (attrs["complete"], attrs["rows_done"]) == (False, 40)
    monkeypatch.setattr(ex, "run_backbone", real)
    r = _extract(tmp_path / "s.zarr", data, chunk_rows=20, batch_size=10)
    assert (r.status, r.rows_computed) == ("resumed", 60)
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "s.zarr")
    for k in a:
        if k != "attrs":
            np.testing.assert_array_equal(a[k], b[k])


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import oodcli.extraction as ex
    from oodcli.backbones import get_spec
    from oodcli.data.digits import digits_part
    from oodcli.store import open_store

    real = ex.run_backbone
    def slow(model, x, layers):
        time.sleep(0.05)
        return real(model, x, layers)
    ex.run_backbone = slow
    spec = get_spec("digits_cnn-tiny")

    def progress(split, total, done):
        def advance(rows):  # called once a chunk is on disk and counted in rows_done
            print("committed", rows, flush=True)
        return advance

    with open_store(sys.argv[1], "a") as st:
        ex.extract_split(st, spec, None, digits_part("train"), "train", "id", "digits:train",
                         ex.LazyModel(spec, None, ex.resolve_device("cpu")), ("logits", "penultimate"),
                         batch_size=16, chunk_rows=64, progress=progress)
    """
)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_killed_extraction_resumes_to_the_same_arrays(tmp_path, suffix):
    """SIGKILL a real extraction mid-way; the re-run resumes and matches an uninterrupted run."""
    from oodcli.data.digits import digits_part

    data = digits_part("train")
    path = tmp_path / f"killed{suffix}"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        done = 0
        while done < 128:  # two whole chunks on disk, then kill it while it computes the third
            line = proc.stdout.readline()
            assert line, "the extraction ended before it could be killed"
            done += int(line.split()[1])
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with open_store(path) as st:
        attrs = st.node_attrs("splits/train/digits_cnn-tiny")
    assert not attrs["complete"] and 128 <= attrs["rows_done"] < len(data)
    r = _extract(path, data, batch_size=16, chunk_rows=64)
    assert r.status == "resumed" and r.rows_computed == len(data) - attrs["rows_done"]
    _extract(tmp_path / f"ref{suffix}", data, batch_size=16, chunk_rows=64)
    a, b = _arrays(tmp_path / f"ref{suffix}"), _arrays(path)
    for k in a:
        if k != "attrs":
            np.testing.assert_array_equal(a[k], b[k])


def test_overwrite_replaces_a_split_of_other_data_with_all_made_from_it(tmp_path, images):
    path = tmp_path / "s.zarr"
    _extract(path, images("fake:train", 30))
    with open_store(path, "r+") as st:
        st.write_array("scores/msp/train", np.zeros(30, np.float32))
        st.write_array("scores/msp/test", np.zeros(3, np.float32))
    r = _extract(path, images("other:train", 20, seed=1), overwrite=True)
    assert (r.status, r.rows) == ("extracted", 20)
    with open_store(path) as st:
        assert st.shape("splits/train/labels") == (20,)
        assert list(st.walk_arrays("scores")) == ["scores/msp/test"]  # the old split's scores went with it


def test_half_made_split_is_redone(tmp_path, images):
    """labels written, ids not (what a kill between the two left before splits became one transaction)."""
    path = tmp_path / "s.zarr"
    with open_store(path, "a") as st:
        st.write_array("splits/train/labels", np.zeros(30, np.int64))
    r = _extract(path, images("fake:train", 30))
    assert (r.status, r.rows) == ("extracted", 30)
    with open_store(path) as st:
        assert st.node_attrs("splits/train")["n"] == 30 and st.shape("splits/train/ids") == (30,)


def test_unreadable_image_is_refused_before_anything_is_written(tmp_path):
    from PIL import Image

    from oodcli.api import extract_splits

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    raw = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(raw[: len(raw) // 2])  # truncated
    (folder / "2.png").write_text("not an image")
    store = tmp_path / "s.zarr"
    with pytest.raises(OodError, match=r"image .*1\.jpg cannot be read .*\(and 1 more\); nothing was written"):
        extract_splits(MODEL, store, data=f"folder:{folder}", splits=["ood/far/x"], device="cpu")
    assert not store.exists()  # a store this call created is gone again


def test_nonfinite_features_are_recorded(tmp_path, images, monkeypatch):
    real = ex.run_backbone

    def poisoned(model, x, layers):
        out = real(model, x, layers)
        out["logits"][0, 0] = float("nan")
        return out

    monkeypatch.setattr(ex, "run_backbone", poisoned)
    _extract(tmp_path / "s.zarr", images("fake:train", 20), batch_size=10)
    assert _arrays(tmp_path / "s.zarr")["attrs"]["nonfinite_rows"] == 2


def test_empty_split_is_refused(tmp_path, images):
    with pytest.raises(OodError, match="no samples"):
        _extract(tmp_path / "s.zarr", images("fake:empty", 0))


def test_dataloader_workers_give_the_same_arrays(tmp_path):
    """Worker processes (the data set and transform pickled into them) change nothing in the store."""
    from oodcli.data.digits import digits_part

    data = digits_part("test")
    _extract(tmp_path / "w0.zarr", data, split="test", batch_size=64)
    _extract(tmp_path / "w2.zarr", data, split="test", batch_size=64, workers=2)
    a, b = _arrays(tmp_path / "w0.zarr", "test"), _arrays(tmp_path / "w2.zarr", "test")
    for k in a:
        if k != "attrs":
            np.testing.assert_array_equal(a[k], b[k])


def test_a_refusal_names_only_what_changed_in_full():
    from oodcli.extraction import _describe_mismatch

    stored = {"preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop": 32},  # JSON: lists
              "layers": ["logits", "penultimate"], "weights": "sha256:" + "a" * 64}
    now = {"preprocess": {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop": 32},  # in memory: tuples
           "layers": ("logits", "penultimate", "featmap"), "weights": "sha256:" + "a" * 64}
    text = _describe_mismatch(stored, now)
    assert "preprocess" not in text  # the same values, only list vs tuple
    assert text == 'layers ["logits", "penultimate"] -> ["logits", "penultimate", "featmap"]'
    now["preprocess"] = {**now["preprocess"], "crop": 28}
    now["weights"] = "sha256:" + "b" * 64
    text = _describe_mismatch(stored, now)
    assert "preprocess.crop 32 -> 28" in text and "mean" not in text
    assert "a" * 64 in text and "b" * 64 in text  # in full, not cut


def test_float16_range_loss_is_said_on_the_first_chunk(tmp_path, images, monkeypatch):
    assert ex.float16_range_notes({"penultimate": np.full((4, 8), 0.5, np.float32)}) == []
    tiny = np.full((4, 8), 1e-6, np.float32)  # below float16's normal range: stored with few bits
    assert "--dtype float32" in ex.float16_range_notes({"penultimate": tiny})[0]
    huge = np.full((4, 8), 1e5, np.float32)
    assert "inf" in ex.float16_range_notes({"logits": huge})[0]
    real = ex.run_backbone

    def scaled(model, x, layers):  # a backbone whose features live around 1e-7
        return {k: v * 1e-7 if k == "penultimate" else v for k, v in real(model, x, layers).items()}

    monkeypatch.setattr(ex, "run_backbone", scaled)
    r = _extract(tmp_path / "s.zarr", images("fake:train", 20))
    assert len(r.notes) == 1 and r.notes[0].startswith("penultimate:") and "float32" in r.notes[0]
    r = _extract(tmp_path / "t.zarr", images("fake:train", 20), dtype="float32")
    assert r.notes == []


def test_replaced_images_are_not_a_cache_hit(tmp_path, capsys):
    """A folder's identity: each file's path, size and mtime and the folder itself; --verify-content its bytes."""
    from PIL import Image

    from conftest import one_line_error, run

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    store = tmp_path / "s.zarr"
    args = ["-q", "extract", "--model", MODEL, "--data", f"folder:{folder}", "--split", "ood/far/mine", "--store", store]
    assert run(capsys, *args, "--verify-content")[0] == 0
    assert run(capsys, *args, "--verify-content")[0] == 0  # same files: a cache hit
    stat = (folder / "3.png").stat()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "3.png")  # new pixels, same name
    code, _, err = run(capsys, *args)
    assert code == 1 and one_line_error(err) and "image files (names, sizes or times) changed" in err
    # the same size and time, other bytes: only --verify-content sees it
    os.utime(folder / "3.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    if (folder / "3.png").stat().st_size == stat.st_size:
        assert run(capsys, *args)[0] == 0
        code, _, err = run(capsys, *args, "--verify-content")
        assert code == 1 and one_line_error(err) and "bytes differ" in err
    # another copy of the same images (same relative paths, sizes and times) under another data root
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(folder, other / "imgs", copy_function=shutil.copy2)
    rel = ["-q", "extract", "--model", MODEL, "--data", "folder:imgs", "--split", "ood/far/x", "--store", tmp_path / "t.zarr"]
    assert run(capsys, *rel, "--data-root", tmp_path)[0] == 0
    code, _, err = run(capsys, *rel, "--data-root", other)
    assert code == 1 and one_line_error(err) and f"folder {folder} -> {other / 'imgs'}" in err


def test_class_folders_are_matched_by_name(tmp_path, capsys):
    """A folder missing a class would shift every later label: refused, naming it; names are stored."""
    from PIL import Image

    from conftest import one_line_error, run
    from oodcli import text

    def folder(name, classes):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / name / c / f"{i}.png")
        return f"folder:{tmp_path / name}"

    store = tmp_path / "s.zarr"
    base = ["-q", "extract", "--model", MODEL, "--store", store]
    assert run(capsys, *base, "--data", folder("train", ["cat", "dog", "fox"]), "--split", "train")[0] == 0
    with open_store(store) as st:
        assert st.node_attrs("splits/train")["class_names"] == ["cat", "dog", "fox"]
        assert text.label_set(st) == ("folders-train", ["cat", "dog", "fox"])  # CLIP methods need no labels file
    code, _, err = run(capsys, *base, "--data", folder("test", ["cat", "fox"]), "--split", "test")
    assert code == 1 and one_line_error(err) and "missing dog" in err and "split 'train'" in err
    code, _, err = run(capsys, *base, "--data", folder("test2", ["cat", "dog", "fox", "owl"]), "--split", "test")
    assert code == 1 and one_line_error(err) and "not in the list owl" in err
    assert run(capsys, *base, "--data", folder("test3", ["cat", "dog", "fox"]), "--split", "test")[0] == 0
    with open_store(store) as st:
        assert not st.exists("splits/test2") and st.read("splits/test/labels").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # a benchmark store: the folders must be the benchmark's classes
    bench = tmp_path / "b.zarr"
    assert run(capsys, "-q", "extract", "--model", MODEL, "--benchmark", "digits", "--split", "test", "--store", bench)[0] == 0
    code, _, err = run(capsys, "-q", "extract", "--model", MODEL, "--data", folder("mine", ["zero", "one"]),
                       "--split", "val2", "--store", bench)
    assert code == 1 and "are not the 6 of split 'test'" in err and "missing two, three, four, five" in err
    # folders named by id (ImageNet's wnids) against a benchmark's class names: their count must match
    from oodcli.api import check_class_folders
    from oodcli.data.base import SplitDef, open_source

    for n in range(5):
        (tmp_path / "wnids" / f"n{n:08d}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "wnids" / f"n{n:08d}" / "a.png")
    ds = open_source(f"folder:{tmp_path / 'wnids'}", tmp_path)
    with pytest.raises(OodError, match="has 5 class folders but benchmark 'digits' has 6 classes"):
        check_class_folders(tmp_path / "none.zarr", "digits", [(SplitDef("train", "id", "x"), ds)])
    # an OOD folder with class folders is fine (its labels are -1)
    assert run(capsys, "-q", "extract", "--model", MODEL, "--data", f"folder:{tmp_path / 'mine'}",
               "--split", "ood/far/mine", "--store", bench)[0] == 0


def test_an_animation_is_read_by_its_first_frame_and_said_once(tmp_path, capsys):
    from PIL import Image

    from conftest import run

    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    frames[1].save(folder / "still.png")
    code, out, err = run(capsys, "extract", "--model", MODEL, "--data", f"folder:{folder}", "--split", "ood/far/x",
                         "--store", tmp_path / "s.zarr")
    assert code == 0 and err.count("animated image") == 1 and "anim.gif" in err and "first frame" in err


def test_small_entries_beside_large_ones_are_no_float16_loss():
    """Post-ReLU rows: a few entries below float16's normal range cost nothing measurable."""
    rows = np.abs(np.random.default_rng(0).normal(0, 1, (16, 64))).astype(np.float32)
    rows[:, :4] = 1e-6
    assert ex.float16_range_notes({"penultimate": rows}) == []
