"""Forgiving pipelines: one method that cannot run does not cost the others their scores;
GROOD makes the gradients of a split added after 'synthesize'; each method finds the
backbone that has what it needs; a backbone short of a split says which extract makes it.

Stores are written through the store API (milliseconds), except one end-to-end run on the
digits benchmark with the tiny random CNN."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal

import numpy as np
import pytest

from conftest import one_line_error, run
from oodcli.store import open_store

DIM, CLASSES, CHUNK = 12, 3, 32
SPLITS = {"train": ("id", 150), "test": ("id", 60), "ood/near/a": ("ood-near", 50), "ood/far/b": ("ood-far", 40)}
APEX_WEIGHTS = "/models/digits-apex.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def add_split(st, split, role, n, rng, source=None):
    labels = np.full(n, -1) if role.startswith("ood") else np.arange(n) % CLASSES
    st.write_array(f"splits/{split}/labels", labels.astype(np.int64))
    st.write_array(f"splits/{split}/ids", np.arange(n, dtype=np.int64))
    st.set_attrs(f"splits/{split}", role=role, n=n, **({"source": source} if source else {}))
    return labels


def add_features(st, split, backbone, labels, rng, logits=True, model_id=None, **attrs):
    """Features as extract writes them: penultimate (+ logits), chunked, with the group attrs."""
    model_id = model_id or f"id-{backbone}"
    centres = np.random.default_rng(7).normal(0, 2.0, (CLASSES, DIM))
    ood = labels < 0
    x = centres[np.maximum(labels, 0)] * (~ood)[:, None] + rng.normal(0, 1.0, (len(labels), DIM)) + 1.5 * ood[:, None]
    layers = {"penultimate": x.astype(np.float32)}
    if logits:
        w = np.random.default_rng(8).normal(0, 0.5, (CLASSES, DIM)).astype(np.float32)
        layers["logits"] = layers["penultimate"] @ w.T
        if not st.exists(f"backbones/{backbone}/head/weight"):
            st.write_array(f"backbones/{backbone}/head/weight", w)
            st.write_array(f"backbones/{backbone}/head/bias", np.zeros(CLASSES, np.float32))
            st.set_attrs(f"backbones/{backbone}", model_id=model_id)
    node = f"splits/{split}/{backbone}"
    for layer, values in layers.items():
        st.create_array(f"{node}/{layer}", values.shape, values.dtype, chunk_rows=CHUNK)
        st.write_rows(f"{node}/{layer}", 0, values)
    st.set_attrs(node, complete=True, rows_done=len(labels), model_id=model_id, fingerprint=f"fp-{split}-{backbone}",
                 parts={"weights": model_id, "preprocess": "none", "dtype": "float16"}, layers=sorted(layers), **attrs)


def make_store(path, backbones=(("m", True),), seed=0):
    """Every split of SPLITS, with each backbone given as (name, has logits and a head)."""
    rng = np.random.default_rng(seed)
    with open_store(path, "a") as st:
        for split, (role, n) in SPLITS.items():
            labels = add_split(st, split, role, n, rng, source=f"folder:/data/{split}")
            for name, logits in backbones:
                add_features(st, split, name, labels, rng, logits=logits)
    return path


def snapshot(path, prefix=""):
    with open_store(path) as st:
        return {n: (st.read(n).tobytes(), st.node_attrs(n)) for n in st.walk_arrays(prefix)}


def by_method(out):
    rows = json.loads(out)
    return {r["method"]: r for r in rows}, rows


# ---- one failing method does not discard the others ---------------------------------------------------


@pytest.fixture
def poisoned(tmp_path, capsys):
    """A store scored once with msp, energy and knn; then a NaN in the OOD penultimate features,
    which knn reads and msp/energy (logits) do not."""
    path = make_store(tmp_path / "s.zarr")
    assert run(capsys, "-q", "score", "msp,energy,knn", "--store", path)[0] == 0
    knn_before = snapshot(path, "scores/knn") | snapshot(path, "fitted/knn")
    with open_store(path, "r+") as st:
        knn_before["fitted-attrs"] = st.node_attrs("fitted/knn")
        st.write_rows("splits/ood/far/b/m/penultimate", 5, np.full((1, DIM), np.nan, np.float32))
    return path, knn_before


def test_a_failing_method_leaves_the_others_written_and_its_old_scores_untouched(capsys, poisoned):
    path, knn_before = poisoned
    code, out, err = run(capsys, "-q", "score", "msp,energy,knn", "--store", path, "--json",
                         "-p", "energy.temperature=2", "-p", "knn.k=3")
    assert code == 1 and one_line_error(err) and "knn" in err and "NaN or inf" in err
    methods, rows = by_method(out)
    assert methods["knn"]["status"] == "skipped" and "NaN or inf" in methods["knn"]["reason"]
    assert methods["knn"]["split"] is None and methods["knn"]["backbone"] == "m"
    written = [r for r in rows if r["status"] == "written"]
    assert {(r["method"], r["split"]) for r in written} == {(m, s) for m in ("msp", "energy") for s in list(SPLITS)[1:]}
    with open_store(path) as st:
        assert st.node_attrs("scores/energy/ood/far/b")["hparams"] == {"temperature": 2.0}  # the new run's
        after = {n: (st.read(n).tobytes(), st.node_attrs(n)) for p in ("scores/knn", "fitted/knn")
                 for n in st.walk_arrays(p)}
        assert after == {k: v for k, v in knn_before.items() if k != "fitted-attrs"}
        assert st.node_attrs("fitted/knn") == knn_before["fitted-attrs"]  # k=3 was fitted, but not kept
        assert not st.exists(".txn")
    # the table says it too
    code, out, _ = run(capsys, "-q", "score", "msp,knn", "--store", path)
    assert code == 1 and "skipped" in out and "written" in out and "NaN or inf" in out


def test_exit_codes_named_against_all(capsys, poisoned):
    path, _ = poisoned
    code, out, err = run(capsys, "-q", "score", "all", "--store", path, "--json")
    assert code == 0 and not err.strip()
    methods, _ = by_method(out)
    assert methods["knn"]["status"] == "skipped" and methods["msp"]["status"] == "written"
    assert {"mahalanobis", "vim", "react"} <= {m for m, r in methods.items() if r["status"] == "skipped"}
    assert not {"mcm", "grood", "apex", "palm", "coop"} & set(methods)  # not served by this store: not listed
    code, _, err = run(capsys, "score", "knn", "--store", path)  # named alone: its error, one line
    assert code == 1 and one_line_error(err) and "NaN or inf" in err
    assert run(capsys, "-q", "score", "msp,energy", "--store", path)[0] == 0
    before = snapshot(path)
    for args, code, needle in ((["all", "-p", "knn.k=abc"], 2, "knn"),
                               (["msp,bogus"], 2, "unknown method 'bogus'"),
                               (["all", "-p", "knn.k=100000"], 2, "knn.k=100000"),
                               (["all", "--id", "nope"], 1, "no split 'nope'")):
        got, _, err = run(capsys, "score", *args, "--store", path)
        assert got == code and one_line_error(err) and needle in err, (args, err)
        assert snapshot(path) == before, args  # before any work: nothing written


def test_ctrl_c_keeps_the_methods_written_before_it(capsys, tmp_path, monkeypatch, ctrl_c):
    import oodcli.scorers.logits as logits

    path = make_store(tmp_path / "s.zarr")
    real = logits.Energy.score_batch
    sent = []

    def interrupt(self, batch):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(logits.Energy, "score_batch", interrupt)
    code, _, err = run(capsys, "score", "msp,energy", "--store", path)
    assert sent and code == 130 and err.strip().startswith("interrupted") and len(err.strip().splitlines()) == 1
    with open_store(path) as st:
        assert st.children("scores") == ["msp"] and len(list(st.walk_arrays("scores/msp"))) == 3
        assert not st.exists(".txn")


# ---- GROOD gradients of a split added after synthesize ------------------------------------------------


def test_grood_on_a_split_added_after_synthesize_equals_synthesize(capsys, tmp_path):
    from oodcli import index as faiss_index
    from oodcli.synth.grood import synthesize_grood

    path = make_store(tmp_path / "g.zarr", backbones=(("m", False),))
    with open_store(path, "r+") as st:
        synthesize_grood(st, ood_prototype="mean")
        faiss_index.build_in_store(st, "grads/grood/train")
        rng = np.random.default_rng(3)
        labels = add_split(st, "ood/near/new", "ood-near", 70, rng)  # extracted after synthesize
        add_features(st, "ood/near/new", "m", labels, rng, logits=False)
    index_before = snapshot(path, "index")
    other = tmp_path / "other.zarr"
    shutil.copytree(path, other)

    code, out, err = run(capsys, "score", "grood,grood-gradnorm,grood-distance", "--store", path, "--json")
    assert code == 0, err
    assert "wrote grads/grood/ood/near/new" in err and "synthesize" not in err.replace("no synthesize needed", "")
    methods, _ = by_method(out)
    assert any("grads/grood/ood/near/new" in n for n in methods["grood"]["notes"])
    assert snapshot(path, "index") == index_before  # the index over the train gradients serves the new split

    with open_store(other, "r+") as st:  # the other way: synthesize again writes the missing gradients
        result = synthesize_grood(st, ood_prototype="mean")
        assert result["status"] == "cached"
        assert {g["split"]: g["status"] for g in result["gradients"]}["ood/near/new"] == "written"
    assert run(capsys, "-q", "score", "grood,grood-gradnorm,grood-distance", "--store", other)[0] == 0
    assert snapshot(path, "grads") == snapshot(other, "grads")
    mine, theirs = snapshot(path, "scores"), snapshot(other, "scores")
    assert mine == theirs and "scores/grood/ood/near/new" in mine
    # the second run finds the gradients current
    code, out, err = run(capsys, "score", "grood", "--store", path, "--json")
    assert code == 0 and "wrote grads" not in err and by_method(out)[0]["grood"]["notes"] == []


# ---- which backbone ----------------------------------------------------------------------------------


def test_the_only_backbone_with_logits_is_picked_and_said(capsys, tmp_path):
    path = make_store(tmp_path / "two.zarr", backbones=(("cnn", True), ("emb", False)))
    code, out, err = run(capsys, "score", "msp,energy", "--store", path, "--json")
    assert code == 0
    assert "using backbone 'cnn' for msp, energy" in err and "--backbone" in err
    methods, _ = by_method(out)
    assert methods["msp"]["backbone"] == "cnn" and "only backbone" in methods["msp"]["picked"]
    with open_store(path) as st:
        assert st.node_attrs("scores/msp/test")["backbone"] == "cnn"
    code, _, err = run(capsys, "-q", "score", "msp", "--store", path)
    assert code == 0 and not err.strip()  # -q: no line
    # penultimate: both backbones have it, so knn asks
    code, _, err = run(capsys, "score", "knn", "--store", path)
    assert code == 2 and one_line_error(err) and "several backbones" in err and "cnn, emb" in err
    code, out, err = run(capsys, "-q", "score", "msp,knn", "--store", path, "--json")
    methods, _ = by_method(out)
    assert code == 1 and methods["msp"]["status"] == "written" and methods["knn"]["status"] == "skipped"
    assert "--backbone" in methods["knn"]["reason"]
    code, out, _ = run(capsys, "-q", "score", "all", "--store", path, "--json")
    methods, _ = by_method(out)
    assert code == 0 and methods["vim"]["backbone"] == "cnn" and methods["mahalanobis"]["status"] == "skipped"
    code, out, _ = run(capsys, "-q", "score", "knn", "--store", path, "--backbone", "emb", "--json")
    assert code == 0 and by_method(out)[0]["knn"]["backbone"] == "emb"
    code, _, err = run(capsys, "score", "knn", "--store", path, "--backbone", "nope")
    assert code == 1 and one_line_error(err) and "no 'nope' features" in err


def test_a_missing_split_names_the_extract_command(capsys, tmp_path):
    """The classifier extracted a new OOD set; the APEX model, extracted as a backbone, did not:
    APEX and PALM are skipped with the command, the rest score the new set on the classifier."""
    path = make_store(tmp_path / "apex.zarr", backbones=(("cnn", True),))
    rng = np.random.default_rng(5)
    with open_store(path, "r+") as st:
        for split in SPLITS:
            labels = st.read(f"splits/{split}/labels")
            add_features(st, split, "apex", labels, rng, logits=False, weights_source=APEX_WEIGHTS)
        k = 2 * CLASSES
        st.write_array("backbones/apex/prototypes/vectors", rng.normal(size=(k, DIM)).astype(np.float32))
        st.write_array("backbones/apex/prototypes/classes", np.repeat(np.arange(CLASSES), 2))
        st.write_array("backbones/apex/prototypes/q_c", rng.uniform(0.2, 0.9, k).astype(np.float32))
        st.write_array("backbones/apex/prototypes/q_s", rng.uniform(0.0, 1.5, k).astype(np.float32))
        st.set_attrs("backbones/apex", model_id="id-apex")
        labels = add_split(st, "ood/near/x", "ood-near", 30, rng, source="folder:/data/new sets/x")
        add_features(st, "ood/near/x", "cnn", labels, rng)
    command = (f"oodcli extract --model apex --weights {APEX_WEIGHTS} --data 'folder:/data/new sets/x' "
               f"--split ood/near/x --layers penultimate --store {path}")
    code, out, err = run(capsys, "score", "all", "--store", path, "--json")
    assert code == 0, err
    methods, rows = by_method(out)
    for method in ("apex", "palm"):
        assert methods[method]["status"] == "skipped" and methods[method]["backbone"] == "apex"
        assert methods[method]["reason"].endswith(command), methods[method]["reason"]
    assert {r["split"] for r in rows if r["method"] == "knn"} == {"test", "ood/near/a", "ood/far/b", "ood/near/x"}
    assert methods["knn"]["backbone"] == methods["msp"]["backbone"] == "cnn"
    code, _, err = run(capsys, "score", "apex", "--store", path)
    assert code == 1 and one_line_error(err) and command in err
    code, out, _ = run(capsys, "report", "--store", path, "--json")
    assert code == 0 and "ood/near/x" in json.loads(out)["methods"]["knn"]["sets"]


def test_new_ood_folder_then_score_all_and_report_end_to_end(capsys, tmp_path):
    """digits (train, test) with the tiny CNN and GROOD made; then an image folder, the only OOD
    set, extracted with another model only. Every reason gives the extract command for the CNN;
    running it makes 'score all' serve every method on the new set (GROOD's gradients made on
    the way, the index unchanged) and the report show it."""
    from PIL import Image

    store = tmp_path / "d.zarr"
    assert run(capsys, "-q", "extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--split", "train",
               "--split", "test", "--store", store)[0] == 0
    assert run(capsys, "-q", "synthesize", "grood", "--store", store, "--ood-prototype", "mean")[0] == 0
    assert run(capsys, "-q", "index", "--store", store, "--source", "grads/grood/train")[0] == 0
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert run(capsys, "-q", "extract", "--model", "vit-tiny", "--data", f"folder:{folder}", "--split", "ood/near/x",
               "--store", store)[0] == 0
    code, out, err = run(capsys, "-q", "score", "all", "--store", store, "--json")
    assert code == 1, err  # nothing could be written: every method's backbone lacks the new set
    reasons = {r["reason"] for r in json.loads(out) if r["method"] != "ensemble"}  # it asks for its members
    command = f"oodcli extract --model digits_cnn-tiny --data folder:{folder} --split ood/near/x --store {store}"
    assert all(reason.endswith(command) for reason in reasons), reasons
    assert run(capsys, "-q", *shlex.split(command)[1:])[0] == 0
    code, out, err = run(capsys, "score", "all", "--store", store, "--json")
    assert code == 0, err
    methods, rows = by_method(out)
    assert {"msp", "knn", "grood", "grood-gradnorm"} <= {m for m, r in methods.items() if r["status"] == "written"}
    assert methods.pop("ensemble")["status"] == "skipped"  # two backbones, no members named
    assert all(r["status"] == "written" and r["backbone"] == "digits_cnn-tiny" for r in methods.values()), rows
    assert "using backbone 'digits_cnn-tiny'" in err and "wrote grads/grood/ood/near/x" in err
    code, out, _ = run(capsys, "report", "--store", store, "--json")
    report = json.loads(out)
    assert code == 0 and all("ood/near/x" in report["methods"][m]["sets"] for m in ("msp", "knn", "grood"))
