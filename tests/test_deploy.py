"""Deployment: thresholds recorded from an ID split, and a Detector that scores new images with a
store's fitted method (the same numbers ``score`` stored), refusing what no longer matches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from oodcli import deploy
from oodcli.cli import main
from oodcli.errors import OodError
from oodcli.metrics import fpr_at_tpr, id_threshold
from oodcli.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SPLITS = ["--split", "train", "--split", "val", "--split", "test", "--split", "ood/near/digits6-9"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 1-epoch digits CNN, its store (train, val, test, digits 6-9), knn/msp/mahalanobis scored on
    test and OOD, and on val with the same settings."""
    root = tmp_path_factory.mktemp("deploy")
    ckpt, store = root / "cnn.safetensors", root / "digits.zarr"
    assert main(["-q", "train", "classifier", "--out", str(ckpt), "--epochs", "1"]) == 0
    assert main(["-q", "extract", "--model", "digits_cnn", "--weights", str(ckpt), "--benchmark", "digits",
                 "--layers", "logits,penultimate", "--store", str(store), *SPLITS]) == 0
    for extra in ([], ["--id", "val"]):
        assert main(["-q", "score", "knn,msp,mahalanobis", "--store", str(store), "-p", "knn.k=3", *extra]) == 0
    return {"root": root, "ckpt": ckpt, "store": store}


def _copy(digits, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(digits["store"], copy)
    return copy


def _read(store, node):
    with open_store(store) as st:
        return st.read(node).astype(np.float64)


# ---- the threshold ------------------------------------------------------------------------------


def test_threshold_keeps_exactly_the_share_asked_for_and_ties_are_kept_together():
    scores = np.random.default_rng(0).permutation(np.arange(200, dtype=np.float64))
    t = id_threshold(scores, 0.95)
    assert np.mean(scores >= t) == 0.95 and t == 10.0
    assert np.mean(scores >= id_threshold(scores, 0.5)) == 0.5
    assert id_threshold(scores, 1.0) == 0.0
    # ties at the threshold: all of them kept (the share kept is then more than asked for)
    tied = np.array([10.0] * 10 + list(range(10)), dtype=np.float64)  # 20 rows, the top 10 tied
    assert id_threshold(tied, 0.3) == 10.0 and np.mean(tied >= 10.0) == 0.5
    # it is the threshold report's FPR@95 (ID positive) uses
    ood = np.random.default_rng(1).normal(50, 60, 500)
    assert fpr_at_tpr(scores, ood) == np.mean(ood >= t)
    with pytest.raises(OodError):
        id_threshold(np.array([1.0, np.nan]))


def test_record_threshold_on_the_validation_split(digits, tmp_path):
    store = _copy(digits, tmp_path)
    result = deploy.record_threshold(store, "knn")
    val = _read(store, "scores/knn/val")
    assert result.split == "val" and result.tpr == 0.95 and result.rows == len(val)
    assert result.value == id_threshold(val, 0.95) and result.kept == np.mean(val >= result.value) >= 0.95
    assert result.identity["hparams"]["k"] == 3 and result.identity["backbone"] == "digits_cnn"
    with open_store(store) as st:
        attrs = st.node_attrs("fitted/thresholds/knn")
        assert attrs["value"] == result.value and attrs["split_fingerprint"] == \
            st.node_attrs("splits/val/digits_cnn").get("fingerprint")
        assert deploy.read_threshold(st, "knn").value == result.value
    # the test split only when named
    named = deploy.record_threshold(store, "msp", split="test", tpr=0.9)
    assert named.split == "test" and named.value == id_threshold(_read(store, "scores/msp/test"), 0.9)


def test_threshold_refuses_what_does_not_fit(digits, tmp_path):
    store = _copy(digits, tmp_path)
    with pytest.raises(OodError, match="has role 'ood-near'"):
        deploy.record_threshold(store, "knn", split="ood/near/digits6-9")
    with pytest.raises(OodError, match="in \\(0, 1\\]"):
        deploy.record_threshold(store, "knn", tpr=1.5)
    with pytest.raises(OodError, match="no threshold recorded for 'msp'"):
        with open_store(store) as st:
            deploy.read_threshold(st, "msp")
    # val scores missing: the command that makes them, with the test scores' settings
    assert main(["-q", "store", "rm", str(store), "scores/knn/val"]) == 0
    with pytest.raises(OodError, match="-p knn.k=3") as info:
        deploy.record_threshold(store, "knn")
    assert f"oodcli score knn --store {store} --id val --backbone digits_cnn" in str(info.value)
    # val scored with other settings than test
    assert main(["-q", "score", "knn", "--store", str(store), "--id", "val", "-p", "knn.k=5"]) == 0
    assert main(["-q", "score", "knn", "--store", str(store), "-p", "knn.k=3"]) == 0
    with pytest.raises(OodError, match="other hparams"):
        deploy.record_threshold(store, "knn")
    # a threshold set, then the method re-scored differently: no longer valid
    deploy.record_threshold(store, "mahalanobis")
    assert main(["-q", "score", "knn", "--store", str(store), "--id", "val", "-p", "knn.k=3"]) == 0
    deploy.record_threshold(store, "knn")
    assert main(["-q", "score", "knn", "--store", str(store), "-p", "knn.k=4"]) == 0
    with open_store(store) as st:
        with pytest.raises(OodError, match="set it again"):
            deploy.read_threshold(st, "knn")
        assert deploy.read_threshold(st, "mahalanobis").method == "mahalanobis"
    # no validation split
    assert main(["-q", "store", "rm", str(store), "val"]) == 0
    with pytest.raises(OodError, match="no ID validation split"):
        deploy.record_threshold(store, "msp")


def test_threshold_imports_no_torch(digits, tmp_path):
    store = _copy(digits, tmp_path)
    code = ("import sys; from oodcli.deploy import record_threshold; "
            f"r = record_threshold({str(store)!r}, 'knn'); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r.value)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == id_threshold(_read(store, "scores/knn/val"))


# ---- the Detector -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["knn", "msp", "mahalanobis"])
def test_detector_gives_the_stored_scores_on_the_images_of_a_split(digits, method):
    store = digits["store"]
    det = deploy.Detector.from_store(store, method, threshold=None, batch_size=128)
    stored = _read(store, f"scores/{method}/test").astype(np.float32)
    assert np.array_equal(det.score("digits:test"), stored)
    # the user's own features: the stored ones give the stored scores
    with open_store(store) as st:
        feats = {layer: st.read(f"splits/test/digits_cnn/{layer}") for layer in ("logits", "penultimate")}
    assert np.array_equal(det.score_features(feats), stored)
    # a tensor batch, preprocessed as the store records: the same numbers
    import torch

    from oodcli.data.base import open_source

    data = open_source("digits:test", digits["root"])
    transform = det.spec.preprocess.to_transform()
    batch = torch.stack([transform(data.load(i)) for i in range(20)])
    assert np.array_equal(det.score(batch), stored[:20])


def test_predict_decides_at_the_recorded_threshold(digits, tmp_path):
    store = _copy(digits, tmp_path)
    recorded = deploy.record_threshold(store, "knn")
    det = deploy.Detector.from_store(store, "knn", batch_size=100)
    pred = det.predict("digits:ood/near/digits6-9")
    ood = _read(store, "scores/knn/ood/near/digits6-9").astype(np.float32)
    assert np.array_equal(pred.scores, ood) and pred.threshold == recorded.value
    assert np.array_equal(pred.is_id, ood >= recorded.value)
    # the share of OOD kept at the threshold is report's FPR at it
    assert pred.is_id.mean() == pytest.approx(np.mean(ood >= recorded.value))
    val = np.sort(_read(store, "scores/knn/val"))
    assert np.allclose(pred.percentile, 100 * np.searchsorted(val, ood.astype(np.float64), side="right") / len(val))
    logits = _read(store, "splits/ood/near/digits6-9/digits_cnn/logits")
    assert np.array_equal(pred.predicted, logits.argmax(1))
    rows = list(pred.rows())
    assert rows[0]["decision"] in ("in", "out") and rows[0]["class"] in ("zero", "one", "two", "three", "four", "five")
    assert 0 < rows[0]["probability"] <= 1
    # a fixed threshold, or none
    assert deploy.Detector.from_store(store, "knn", threshold=-1e9).predict("digits:test").is_id.all()
    assert deploy.Detector.from_store(store, "knn", threshold=None).predict("digits:test").is_id is None


def test_detector_in_a_fresh_process_gives_the_same_scores(digits, tmp_path):
    out = tmp_path / "scores.npy"
    code = ("import numpy as np; from oodcli.deploy import Detector; "
            f"d = Detector.from_store({str(digits['store'])!r}, 'mahalanobis', threshold=None); "
            f"np.save({str(out)!r}, d.score('digits:ood/near/digits6-9'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(out), _read(digits["store"], "scores/mahalanobis/ood/near/digits6-9").astype(np.float32))


def test_unreadable_images_are_listed_and_the_rest_predicted(digits, tmp_path):
    from PIL import Image

    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    det = deploy.Detector.from_store(digits["store"], "msp", threshold=None)
    pred = det.predict(folder)
    assert len(pred.scores) == 3 and [f for f, _ in pred.failed] == [str((folder / "broken.png").resolve())]
    assert all(str(i).endswith(".png") for i in pred.ids)
    with pytest.raises(OodError, match="could not be read"):
        det.score(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OodError):
        det.predict(empty)


def test_detector_refuses_changed_weights_and_methods_without_scores(digits, tmp_path):
    ckpt = tmp_path / "cnn.safetensors"
    shutil.copy(digits["ckpt"], ckpt)
    store = tmp_path / "small.zarr"
    assert main(["-q", "extract", "--model", "digits_cnn", "--weights", str(ckpt), "--benchmark", "digits",
                 "--split", "train", "--split", "test", "--split", "ood/far/noise", "--store", str(store)]) == 0
    assert main(["-q", "score", "msp", "--store", str(store)]) == 0
    assert deploy.Detector.from_store(store, "msp", threshold=None).score("digits:test").shape == (325,)
    with pytest.raises(OodError, match="run 'oodcli score knn' first"):
        deploy.Detector.from_store(store, "knn", threshold=None)
    assert main(["-q", "train", "classifier", "--out", str(tmp_path / "other.safetensors"), "--epochs", "1",
                 "--seed", "7"]) == 0
    shutil.copy(tmp_path / "other.safetensors", ckpt)
    with pytest.raises(OodError, match="no longer match"):
        deploy.Detector.from_store(store, "msp", threshold=None)
    ckpt.unlink()
    with pytest.raises(OodError, match="cannot be loaded"):
        deploy.Detector.from_store(store, "msp", threshold=None)


def test_report_shows_the_decision_at_the_recorded_threshold(digits, tmp_path, capsys):
    import csv
    import io

    from conftest import run

    store = _copy(digits, tmp_path)
    t = deploy.record_threshold(store, "knn").value
    code, out, _ = run(capsys, "report", "--store", store, "--format", "json")
    entry = json.loads(out)["methods"]["knn"]["threshold"]
    test, ood = _read(store, "scores/knn/test"), _read(store, "scores/knn/ood/near/digits6-9")
    assert code == 0 and entry["value"] == t and entry["split"] == "val"
    assert entry["tpr"] == np.mean(test >= t) and entry["fpr"]["ood/near/digits6-9"] == np.mean(ood >= t)
    assert "threshold" not in json.loads(out)["methods"]["msp"]
    code, out, _ = run(capsys, "report", "--store", store, "--format", "csv")
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r["method"] == "knn" and r["ood_set"] == "ood/near/digits6-9"]
    assert float(rows[0]["fpr_at_threshold"]) == pytest.approx(np.mean(ood >= t))
    code, out, _ = run(capsys, "report", "--store", store, "--format", "markdown")
    assert "at the recorded thresholds" in out and f"FPR digits6-9 {100 * np.mean(ood >= t):.1f}%" in out
    # re-scored with other settings: the report says the threshold no longer holds
    assert run(capsys, "-q", "score", "knn", "--store", store, "-p", "knn.k=4")[0] == 0
    code, out, _ = run(capsys, "report", "--store", store, "--format", "json")
    assert "set it again" in json.loads(out)["methods"]["knn"]["threshold"]["stale"]


# ---- the commands -------------------------------------------------------------------------------


def test_threshold_and_predict_commands(digits, tmp_path, capsys):
    from conftest import one_line_error, run

    store = _copy(digits, tmp_path)
    code, out, err = run(capsys, "threshold", "knn", "--store", store, "--json")
    assert code == 0, err
    recorded = json.loads(out)
    assert recorded["value"] == id_threshold(_read(store, "scores/knn/val")) and recorded["split"] == "val"
    # JSON lines on stdout: the stored scores, decided at the recorded threshold
    code, out, err = run(capsys, "-q", "predict", "knn", "--store", store, "--data", "digits:ood/near/digits6-9")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    ood = _read(store, "scores/knn/ood/near/digits6-9").astype(np.float32)
    assert [r["id"] for r in rows] == list(range(len(ood)))
    assert np.array_equal(np.array([r["score"] for r in rows], np.float32), ood)
    assert [r["decision"] for r in rows] == ["in" if s >= recorded["value"] else "out" for s in ood]
    # a CSV file, a fixed threshold
    target = tmp_path / "out" / "pred.csv"
    code, _, err = run(capsys, "-q", "predict", "msp", "--store", store, "--data", "digits:test", "--threshold", "0.5",
                       "--out", target)
    assert code == 0, err
    lines = target.read_text().splitlines()
    assert lines[0] == "id,score,decision,percentile,class,probability" and len(lines) == 326
    # unreadable images: listed, the rest written, exit 1
    from PIL import Image

    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"broken")
    listed = tmp_path / "new.jsonl"
    code, _, err = run(capsys, "-q", "predict", "msp", "--store", store, "--data", folder, "--threshold", "none",
                       "--out", listed)
    assert code == 1 and "unreadable: " in err and "b.png" in err and "1 of 2 images could not be read" in err
    assert [json.loads(line)["id"] for line in listed.read_text().splitlines()] == [str((folder / "a.png").resolve())]
    # bad input: one line each, nothing written
    (tmp_path / "empty").mkdir()
    for args, what in (
        (["predict", "msp", "--store", store, "--data", tmp_path / "empty", "--threshold", "none"], "no images found"),
        (["predict", "msp", "--store", store, "--data", "digits:test"], "no threshold recorded for 'msp'"),
        (["predict", "vim", "--store", store, "--data", "digits:test"], "run 'oodcli score vim' first"),
        (["predict", "msp", "--store", store, "--data", "digits:test", "--out", tmp_path / "x.txt"], ".jsonl or .csv"),
        (["threshold", "knn", "--store", store, "--split", "ood/near/digits6-9"], "has role 'ood-near'"),
        (["threshold", "knn", "--store", store, "--tpr", "0"], "in (0, 1]"),
    ):
        code, out, err = run(capsys, *args)
        assert code != 0 and one_line_error(err) and what in err, (args, err)
    assert not (tmp_path / "x.txt").exists()


def test_threshold_command_imports_no_torch(digits, tmp_path):
    store = _copy(digits, tmp_path)
    code = ("import sys; from oodcli.cli import main; "
            f"rc = main(['-q', 'threshold', 'msp', '--store', {str(store)!r}]); "
            "assert rc == 0 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- the public API -----------------------------------------------------------------------------


def test_public_api_gives_what_the_commands_give(digits, tmp_path, capsys):
    import oodcli
    from conftest import run

    store = _copy(digits, tmp_path)
    code, out, _ = run(capsys, "report", "--store", store, "--format", "json")
    assert code == 0 and oodcli.report(store) == json.loads(out)
    frame = oodcli.report_frame(store)
    data = oodcli.report(store)
    assert list(frame.columns) == ["FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert frame.loc[("knn", "ood/near/digits6-9"), "AUROC"] == 100 * data["methods"]["knn"]["sets"]["ood/near/digits6-9"]["auroc"]
    assert frame.loc[("msp", "near_average"), "FPR@95"] == 100 * data["methods"]["msp"]["averages"]["near"]["fpr95"]
    assert oodcli.report_frame(store, fpr="openood").loc[("msp", "ood/near/digits6-9"), "FPR@95"] == \
        100 * data["methods"]["msp"]["sets"]["ood/near/digits6-9"]["fpr95_openood"]
    # scoring through the API writes what the command writes
    results = oodcli.score(store, "energy", params={"energy": {"temperature": 2.0}})
    assert {r.split for r in results} == {"test", "ood/near/digits6-9"}
    assert run(capsys, "-q", "score", "energy", "--store", store, "-p", "energy.temperature=2", "--as", "energy-cli")[0] == 0
    assert np.array_equal(_read(store, "scores/energy/test"), _read(store, "scores/energy-cli/test"))
    # the same one-line errors
    code, _, err = run(capsys, "score", "nope", "--store", store)
    with pytest.raises(oodcli.UsageError) as info:
        oodcli.score(store, "nope")
    assert err.strip() == f"error: {info.value}"
    assert oodcli.threshold(store, "knn").value == id_threshold(_read(store, "scores/knn/val"))
    assert {"Detector", "open_store", "report_frame", "threshold"} <= set(oodcli.__all__)


def test_import_oodcli_is_light(digits):
    code = ("import sys, oodcli; r = oodcli.report(%r); assert r['methods']; "
            "assert 'torch' not in sys.modules, 'torch imported'" % str(digits["store"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_predict_split_adds_the_images_as_an_ordinary_split(digits, tmp_path, capsys):
    from conftest import run

    store = _copy(digits, tmp_path)
    code, out, err = run(capsys, "-q", "predict", "knn", "--store", store, "--data", "digits:ood/far/noise",
                         "--threshold", "none", "--split", "ood/far/noise")
    assert code == 0, err
    scores = np.array([json.loads(line)["score"] for line in out.splitlines()], np.float32)
    with open_store(store) as st:
        assert st.node_attrs("splits/ood/far/noise")["role"] == "ood-far"
        assert np.array_equal(st.read("scores/knn/ood/far/noise").astype(np.float32), scores)
        assert st.node_attrs("scores/knn/ood/far/noise")["hparams"]["k"] == 3


# ---- checkpoints side by side (extract --as) --------------------------------------------------------


def test_extract_as_keeps_two_checkpoints_of_one_model_side_by_side(digits, tmp_path, capsys):
    """A second digits CNN stored under its own name: the first one's features stay, the ensemble
    reads both, a re-run is a cache hit, and the Detector builds the second network again."""
    from conftest import one_line_error, run
    from oodcli.scorers.logits import softmax

    copy, other = _copy(digits, tmp_path), tmp_path / "seed1.safetensors"
    assert main(["-q", "train", "classifier", "--out", str(other), "--epochs", "1", "--seed", "1"]) == 0
    extract = ["-q", "extract", "--model", "digits_cnn", "--weights", str(other), "--benchmark", "digits",
               "--layers", "logits,penultimate", "--store", str(copy), "--split", "test", "--split", "ood/near/digits6-9"]
    code, _, err = run(capsys, *extract)  # the same name: refused, and the way out is named
    assert code == 1 and one_line_error(err) and "--as NAME" in err
    first = _read(copy, "splits/test/digits_cnn/logits")
    code, out, _ = run(capsys, *extract, "--as", "digits_cnn-seed1", "--json")
    assert code == 0 and {r["backbone"] for r in json.loads(out)} == {"digits_cnn-seed1"}
    code, out, _ = run(capsys, *extract, "--as", "digits_cnn-seed1", "--json")
    assert code == 0 and {r["status"] for r in json.loads(out)} == {"cached"}
    with open_store(copy) as st:
        attrs = st.node_attrs("splits/test/digits_cnn-seed1")
        assert attrs["model_source"] == {"model": "digits_cnn", "name": "digits_cnn-seed1"}
        assert st.is_array("backbones/digits_cnn-seed1/head/weight")
    second = _read(copy, "splits/test/digits_cnn-seed1/logits")
    assert np.array_equal(_read(copy, "splits/test/digits_cnn/logits"), first)  # untouched
    assert not np.allclose(first, second, atol=1e-2)  # another network

    assert main(["-q", "score", "ensemble", "--store", str(copy), "--backbone", "digits_cnn,digits_cnn-seed1"]) == 0
    want = (softmax(first, 1) + softmax(second, 1)).max(1) / 2
    np.testing.assert_allclose(_read(copy, "scores/ensemble/test"), want, rtol=1e-6)
    # a member without the split is named with the extract command that makes it, under its name
    code, _, err = run(capsys, "score", "ensemble", "--id", "val", "--store", copy, "--backbone", "digits_cnn,digits_cnn-seed1")
    assert code == 1 and one_line_error(err), err
    assert "--model digits_cnn" in err and "--as digits_cnn-seed1" in err and "--split val" in err

    assert main(["-q", "score", "msp", "--as", "msp-seed1", "--store", str(copy), "--backbone", "digits_cnn-seed1"]) == 0
    det = deploy.Detector.from_store(copy, "msp-seed1", threshold=None, batch_size=128)
    assert det.spec.name == "digits_cnn-seed1"
    assert np.array_equal(det.score("digits:test"), _read(copy, "scores/msp-seed1/test").astype(np.float32))
    # predict --split adds the images as a split: extracted under the member's name, then scored
    code, _, _ = run(capsys, "predict", "msp-seed1", "--store", copy, "--data", "digits:ood/far/noise",
                     "--threshold", "none", "--split", "ood/far/noise", "--out", tmp_path / "p.jsonl")
    assert code == 0
    with open_store(copy) as st:
        assert st.node_attrs("splits/ood/far/noise/digits_cnn-seed1")["model_source"]["name"] == "digits_cnn-seed1"
        assert not st.exists("splits/ood/far/noise/digits_cnn")
        assert st.is_array("scores/msp-seed1/ood/far/noise")

    for bad in ("a/b", "a,b", " x", "labels"):
        code, _, err = run(capsys, *extract, "--as", bad)
        assert code == 2 and one_line_error(err) and "a backbone name is one word" in err
    code, _, err = run(capsys, *extract, "--as", ".hidden")  # the store's own rule for node names
    assert code == 2 and one_line_error(err) and "is not a valid name" in err
