"""A user's own data (oodcli.data.external): a dataset written by ``save_to_disk``, three WebDataset
shards and a CSV list of PNG files, each extracted with a tiny model into a store, cached, resumed
after an interruption, scored and reported; and the bad inputs each refuses in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import oodcli.extraction as ex
from conftest import one_line_error, run
from oodcli.api import extract_splits
from oodcli.data import open_source
from oodcli.data.external import labels_from_values, split_columns, with_columns
from oodcli.errors import OodError, UsageError
from oodcli.store import open_store

MODEL = "digits_cnn-tiny"
CLASSES = ["ant", "bee", "cat"]
N_ID, N_OOD = 18, 10


def _pictures(n: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _id_labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 7 % len(CLASSES)


# ---- the three kinds of source, made in tmp_path: (ID test spec, OOD spec) -----------------------


def make_hf(folder):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=CLASSES),
                                  "note": datasets.Value("string")})
    def table(n, seed):
        return datasets.Dataset.from_dict(
            {"img": _pictures(n, seed), "y": _id_labels(n).tolist(), "note": ["x"] * n}, features=features)
    datasets.DatasetDict({"train": table(12, 1), "test": table(N_ID, 2)}).save_to_disk(str(folder / "mine"))
    ood = datasets.Dataset.from_dict({"picture": _pictures(N_OOD, 3)}, features=datasets.Features({"picture": datasets.Image()}))
    ood.save_to_disk(str(folder / "other"))
    return f"hf:{folder / 'mine'}:test", f"hf:{folder / 'other'}:train"


def make_webdataset(folder):
    import webdataset as wds

    labels, pictures = _id_labels(N_ID), _pictures(N_ID, 4)
    for s in range(3):  # 6 samples a shard
        with wds.TarWriter(str(folder / f"shards-{s:03d}.tar")) as sink:
            for i in range(s * 6, s * 6 + 6):
                sink.write({"__key__": f"sample{i:04d}", "png": _png(pictures[i]), "cls": int(labels[i])})
    with wds.TarWriter(str(folder / "ood-000.tar")) as sink:
        for i, img in enumerate(_pictures(N_OOD, 5)):
            sink.write({"__key__": f"o{i}", "png": _png(img), "json": {"i": i}})
    return f"webdataset:{folder}/shards-{{000..002}}.tar", f"webdataset:{folder}/ood-000.tar"


def make_csv(folder):
    (folder / "img").mkdir()
    rows = []
    for i, (img, y) in enumerate(zip(_pictures(N_ID, 6), _id_labels(N_ID))):
        img.save(folder / "img" / f"{i:03d}.png")
        rows.append({"path": f"img/{i:03d}.png", "label": CLASSES[y]})  # names: numbered in sorted order
    with open(folder / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for i, img in enumerate(_pictures(N_OOD, 7)):
        img.save(folder / "img" / f"ood{i}.png")
        lines.append(json.dumps({"path": f"img/ood{i}.png"}))
    (folder / "ood.jsonl").write_text("\n".join(lines) + "\n")
    return f"csv:{folder / 'list.csv'}", f"jsonl:{folder / 'ood.jsonl'}"


MAKERS = {"hf": make_hf, "webdataset": make_webdataset, "csv": make_csv}


@pytest.fixture(params=sorted(MAKERS))
def source(request, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return MAKERS[request.param](folder)


def _extract(capsys, store, data, split, *extra):
    code, out, err = run(capsys, "-q", "extract", "--model", MODEL, "--store", store, "--data", data, "--split", split,
                         "--device", "cpu", "--json", *extra)
    assert code == 0, err
    return json.loads(out)[0]


def _arrays(store, split):
    with open_store(store) as st:
        return {name: st.read(name) for name in st.walk_arrays(f"splits/{split}")}


# ---- each source end to end --------------------------------------------------------------------


def test_extract_cache_hit_score_and_report(source, tmp_path, capsys, one_thread):
    id_spec, ood_spec = source
    store = tmp_path / "s.zarr"
    first = [_extract(capsys, store, id_spec, "test"), _extract(capsys, store, ood_spec, "ood/far/mine")]
    assert [(r["status"], r["rows"]) for r in first] == [("extracted", N_ID), ("extracted", N_OOD)]
    before = {s: _arrays(store, s) for s in ("test", "ood/far/mine")}
    np.testing.assert_array_equal(before["test"]["splits/test/labels"], _id_labels(N_ID))
    np.testing.assert_array_equal(before["ood/far/mine"]["splits/ood/far/mine/labels"], np.full(N_OOD, -1))
    np.testing.assert_array_equal(before["test"]["splits/test/ids"], np.arange(N_ID))

    again = [_extract(capsys, store, id_spec, "test"), _extract(capsys, store, ood_spec, "ood/far/mine")]
    assert [r["status"] for r in again] == ["cached", "cached"]
    for split, arrays in before.items():
        after = _arrays(store, split)
        for name, array in arrays.items():
            np.testing.assert_array_equal(after[name], array)

    code, _, err = run(capsys, "-q", "score", "msp", "--store", store)
    assert code == 0, err
    code, out, err = run(capsys, "-q", "report", "--store", store, "--format", "json")
    assert code == 0, err
    entry = json.loads(out)["methods"]["msp"]["sets"]["ood/far/mine"]
    assert 0.0 <= entry["auroc"] <= 1.0


def test_interrupted_extraction_resumes_identically(source, tmp_path, monkeypatch, one_thread):
    id_spec, _ = source
    options = dict(data=id_spec, splits=["test"], device="cpu", batch_size=4, chunk_rows=8)
    extract_splits(MODEL, tmp_path / "ref.zarr", **options)
    real, calls = ex.run_backbone, {"n": 0}

    def interrupted(model, x, layers):
        calls["n"] += 1
        if calls["n"] == 4:  # after 3 batches = 12 rows: one whole chunk of 8 on disk
            raise KeyboardInterrupt
        return real(model, x, layers)

    monkeypatch.setattr(ex, "run_backbone", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_splits(MODEL, tmp_path / "s.zarr", **options)
    with open_store(tmp_path / "s.zarr") as st:
        attrs = st.node_attrs(f"splits/test/{MODEL}")
    assert (attrs["complete"], attrs["rows_done"]) == (False, 8)
    monkeypatch.setattr(ex, "run_backbone", real)
    [r] = extract_splits(MODEL, tmp_path / "s.zarr", **options)
    assert (r.status, r.rows_computed) == ("resumed", N_ID - 8)
    a, b = _arrays(tmp_path / "ref.zarr", "test"), _arrays(tmp_path / "s.zarr", "test")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_ids_are_stable_and_name_the_rows(source, tmp_path):
    id_spec, _ = source
    a, b = open_source(id_spec, tmp_path), open_source(id_spec, tmp_path)
    assert a.identity() == b.identity()
    np.testing.assert_array_equal(a.labels, _id_labels(N_ID))
    assert np.asarray(a.load(5)).shape == (8, 8, 3)
    if hasattr(a, "keys"):
        assert len(set(a.keys)) == N_ID and a.keys == b.keys


def test_class_names_come_from_the_data(tmp_path):
    specs = {}
    for kind, make in MAKERS.items():
        (tmp_path / kind).mkdir()
        specs[kind] = make(tmp_path / kind)[0]
    assert open_source(specs["hf"], tmp_path).class_names == CLASSES  # the ClassLabel's names
    assert open_source(specs["csv"], tmp_path).class_names == CLASSES  # label names, sorted
    assert open_source(specs["webdataset"], tmp_path).class_names is None  # .cls holds integers
    assert open_source(specs["csv"], tmp_path, is_ood=True).labels.tolist() == [-1] * N_ID


def test_webdataset_keys_are_shard_and_key(tmp_path):
    spec, _ = make_webdataset(tmp_path)
    data = open_source(spec, tmp_path)
    assert data.keys[0] == f"{tmp_path}/shards-000.tar/sample0000"
    assert data.keys[-1] == f"{tmp_path}/shards-002.tar/sample0017"
    assert data.name.endswith("?image=png&label=cls")


def test_named_columns_are_part_of_the_identity(tmp_path):
    id_spec, _ = make_hf(tmp_path)
    found = open_source(id_spec, tmp_path)
    named = open_source(with_columns(id_spec, "img", "y"), tmp_path)
    assert named.identity() == found.identity()  # the same columns read: the same data
    unlabelled = open_source(f"{id_spec}?image=img&label=note", tmp_path)  # names: 'x' is one class
    assert unlabelled.identity() != found.identity() and unlabelled.labels.tolist() == [0] * N_ID


def test_relative_paths_start_at_the_list_or_the_data_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _pictures(1, 0)[0].save(root / "a.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.csv").write_text("file,class\na.png,3\n")
    data = open_source(f"csv:{tmp_path / 'lists' / 'l.csv'}", root)
    assert data.files == [root / "a.png"] and data.labels.tolist() == [3]
    (tmp_path / "lists" / "a.png").write_bytes((root / "a.png").read_bytes())
    assert open_source(f"csv:{tmp_path / 'lists' / 'l.csv'}", root).files == [tmp_path / "lists" / "a.png"]


def test_column_options_and_labels():
    assert split_columns("d:train?image=img&label=y") == ("d:train", {"image": "img", "label": "y"})
    assert with_columns("hf:d:train", "img", None) == "hf:d:train?image=img"
    assert with_columns("csv:l.csv?label=y", "p", "y") == "csv:l.csv?image=p&label=y"
    with pytest.raises(UsageError, match="disagrees"):
        with_columns("csv:l.csv?label=y", None, "z")
    with pytest.raises(UsageError, match="go with --data"):
        with_columns("folder:x", "img", None)
    with pytest.raises(UsageError, match="bad column option"):
        split_columns("d:train?colour=red")
    assert labels_from_values(["2", 0, "", None], "t")[0].tolist() == [2, 0, -1, -1]
    labels, names = labels_from_values(["dog", "cat", "", "dog"], "t")
    assert (labels.tolist(), names) == ([1, 0, -1, 1], ["cat", "dog"])
    with pytest.raises(OodError, match="negative"):
        labels_from_values(["-3"], "t")


def test_opening_a_list_or_shards_imports_no_datasets_webdataset_or_torch(tmp_path):
    csv_spec, _ = make_csv(tmp_path)
    wds_spec = make_webdataset(tmp_path)[0]
    code = (f"import sys; from oodcli.data import open_source; open_source({csv_spec!r}, '.').identity(); "
            f"open_source({wds_spec!r}, '.').identity(); "
            "print([m for m in ('datasets', 'webdataset', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- bad input: one line, non-zero exit, nothing written ----------------------------------------------


def _refused(capsys, store, data, *extra, split="test"):
    capsys.readouterr()  # what making the data printed
    code, _, err = run(capsys, "extract", "--model", MODEL, "--store", store, "--data", data, "--split", split,
                       "--device", "cpu", *extra)
    assert one_line_error(err), err
    return code, err


def test_dataset_without_an_image_column(tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"x": [1, 2, 3], "y": [0, 1, 0]}).save_to_disk(str(tmp_path / "plain"))
    code, err = _refused(capsys, tmp_path / "s.zarr", f"hf:{tmp_path / 'plain'}:train")
    assert code == 1 and "no image column" in err and "x: Value('int64')" in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_unknown_column_name(kind, tmp_path, capsys):
    id_spec, _ = MAKERS[kind](tmp_path)
    code, err = _refused(capsys, tmp_path / "s.zarr", id_spec, "--label-column", "nope")
    assert code == 2 and "nope" in err
    assert not (tmp_path / "s.zarr").exists()


def test_a_column_that_holds_no_images(tmp_path, capsys):
    id_spec, _ = make_hf(tmp_path)
    code, err = _refused(capsys, tmp_path / "s.zarr", id_spec, "--image-column", "note")
    assert code == 2 and "not images" in err and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_shard(damage, tmp_path, capsys):
    spec, _ = make_webdataset(tmp_path)
    shard = tmp_path / "shards-001.tar"
    raw = shard.read_bytes()
    shard.write_bytes(b"not a tar file" * 100 if damage == "garbage" else raw[: len(raw) // 2])
    code, err = _refused(capsys, tmp_path / "s.zarr", spec)
    assert code == 1 and "shards-001.tar cannot be read" in err
    assert not (tmp_path / "s.zarr").exists()


def test_missing_shard_and_corrupt_image_member(tmp_path, capsys):
    import webdataset as wds

    spec, _ = make_webdataset(tmp_path)
    code, err = _refused(capsys, tmp_path / "s.zarr", spec.replace("002", "003"))
    assert code == 1 and "shards-003.tar not found" in err
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "k0", "png": b"\x89PNG broken", "cls": 0})
    code, err = _refused(capsys, tmp_path / "s.zarr", f"webdataset:{tmp_path}/bad.tar")
    assert code == 1 and "bad.tar/k0 cannot be read" in err and "nothing was written" in err
    assert not (tmp_path / "s.zarr").exists()


def test_csv_paths_that_do_not_exist(tmp_path, capsys, one_thread):
    id_spec, ood_spec = make_csv(tmp_path)
    store = tmp_path / "s.zarr"
    code, err = _refused(capsys, store, f"csv:{tmp_path / 'nothing.csv'}")
    assert code == 1 and "nothing.csv not found" in err and not store.exists()
    _extract(capsys, store, ood_spec, "ood/far/mine")  # a store with a split already
    files = sorted(p.relative_to(store) for p in store.rglob("*"))
    os.remove(tmp_path / "img" / "004.png")
    code, err = _refused(capsys, store, id_spec)
    assert code == 1 and "004.png cannot be read (not found)" in err
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == files  # nothing written


def test_columns_refused_where_they_do_not_apply(tmp_path, capsys):
    code, _, err = run(capsys, "extract", "--model", MODEL, "--store", tmp_path / "s.zarr", "--benchmark", "digits",
                       "--image-column", "img")
    assert code == 2 and one_line_error(err) and "go with --data" in err
    code, err = _refused(capsys, tmp_path / "s.zarr", f"folder:{tmp_path}", "--image-column", "img")
    assert code == 2 and "folder:" in err
    assert not (tmp_path / "s.zarr").exists()


def test_bad_hf_specs(tmp_path, capsys):
    id_spec, _ = make_hf(tmp_path)
    code, err = _refused(capsys, tmp_path / "s.zarr", id_spec.replace(":test", ":dev"))
    assert code == 2 and "no split 'dev'" in err and "train, test" in err
    code, err = _refused(capsys, tmp_path / "s.zarr", f"hf:{tmp_path}/missing:train")
    assert code == 1 and "not found" in err
    code, err = _refused(capsys, tmp_path / "s.zarr", "hf:onlyname")
    assert code == 2 and "hf:DATASET:SPLIT" in err
    assert not (tmp_path / "s.zarr").exists()
