"""The command line end to end on the embedded digits benchmark, and its bad-input paths."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import one_line_error, run
from oodcli.cli import main
from oodcli.store import open_store


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """Train a 2-epoch digits CNN and extract every digits split through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    ckpt, store = root / "cnn.safetensors", root / "digits.zarr"
    assert main(["-q", "train", "classifier", "--out", str(ckpt), "--epochs", "6"]) == 0
    assert main(["-q", "extract", "--model", "digits_cnn", "--weights", str(ckpt), "--benchmark", "digits",
                 "--store", str(store)]) == 0
    assert main(["-q", "score", "msp,energy", "--store", str(store)]) == 0
    return ckpt, store


def test_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("extract", "select-k", "synthesize", "train", "index", "score", "report", "store"):
        assert command in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "oodcli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("oodcli ")


def test_pipeline_extract_score_report(capsys, digits_store):
    ckpt, store = digits_store
    code, out, _ = run(capsys, "-q", "extract", "--model", "digits_cnn", "--weights", ckpt, "--benchmark", "digits",
                       "--store", store, "--json")
    assert code == 0
    assert [r["status"] for r in json.loads(out)] == ["cached"] * 9  # the second run does no work (7 test splits + 2 validation splits)
    code, out, _ = run(capsys, "-q", "score", "all", "--store", store, "--json")
    assert code == 0
    scored = json.loads(out)
    assert {r["method"] for r in scored} >= {"msp", "maxlogit", "energy"}
    written = {r["split"] for r in scored if r["status"] == "written"}  # ensemble is skipped: one backbone
    assert written == {"test", "ood/near/digits6-9", "ood/near/letters", "ood/far/textures", "ood/far/noise",
                       "csid/digits-shifted"}
    code, out, _ = run(capsys, "report", "--store", store, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ood_splits"] == {"ood/far/noise": "far", "ood/far/textures": "far", "ood/near/digits6-9": "near",
                                    "ood/near/letters": "near"}
    msp = report["methods"]["msp"]
    assert set(msp["averages"]) == {"near", "far"}
    for m in msp["sets"].values():
        assert 0.5 < m["auroc"] <= 1.0 and 0.0 <= m["fpr95"] <= 1.0
    assert 0.5 < report["id_accuracy"] <= 1.0
    for fmt, marker in (("table", "near avg"), ("markdown", "| method |"), ("csv", "method,ood_set,group")):
        code, out, _ = run(capsys, "report", "--store", store, "--format", fmt)
        assert code == 0 and marker in out


def test_report_numbers_match_the_metrics_module(capsys, digits_store):
    from scipy.special import softmax

    from oodcli.metrics import ood_metrics

    _, store = digits_store
    assert run(capsys, "-q", "score", "msp", "--store", store)[0] == 0
    with open_store(store) as st:
        test = st.read("splits/test/digits_cnn/logits").astype(np.float64)
        noise = st.read("splits/ood/far/noise/digits_cnn/logits").astype(np.float64)
    expected = ood_metrics(softmax(test, 1).max(1), softmax(noise, 1).max(1))
    _, out, _ = run(capsys, "report", "--store", store, "--methods", "msp", "--json")
    got = json.loads(out)["methods"]["msp"]["sets"]["ood/far/noise"]
    assert got["auroc"] == pytest.approx(expected.auroc, abs=1e-6)
    assert got["fpr95"] == pytest.approx(expected.fpr95, abs=1e-6)


def test_store_info_and_verify(capsys, digits_store):
    _, store = digits_store
    code, out, _ = run(capsys, "store", "info", store, "--json")
    assert code == 0
    info = json.loads(out)
    train = info["splits"]["train"]
    assert train["role"] == "id" and train["backbones"]["digits_cnn"]["complete"]
    assert train["backbones"]["digits_cnn"]["layers"]["logits"]["shape"][1] == 6
    code, out, _ = run(capsys, "store", "info", store)
    assert code == 0 and "digits6-9" in out
    code, out, _ = run(capsys, "store", "verify", store)
    assert code == 0 and "0 problem" in out


def test_verify_finds_a_partial_split(capsys, tmp_path, digits_store):
    import shutil

    _, store = digits_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with open_store(copy, "r+") as st:
        st.set_attrs("splits/test/digits_cnn", complete=False, rows_done=64)
    code, out, _ = run(capsys, "store", "verify", copy)
    assert code == 1 and "incomplete" in out
    code, _, err = run(capsys, "score", "msp", "--store", copy)
    assert code == 1 and one_line_error(err) and "partly extracted" in err


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_verify_finds_a_lost_score_array_foreign_id_labels_and_an_empty_split(capsys, tmp_path, suffix):
    from test_scorers import make_store, write_split

    path = make_store(tmp_path / f"s{suffix}")
    assert run(capsys, "-q", "score", "msp", "--store", path)[0] == 0
    code, out, _ = run(capsys, "store", "verify", path)
    assert code == 0 and "0 problem" in out
    with open_store(path, "r+") as st:
        st.delete("scores/msp/ood/near/a")  # one split's scores gone, the others left
        labels = st.read("splits/test/labels")
        labels[:3] = 17  # no class of the train split (0-3)
        st.write_array("splits/test/labels", labels)
        write_split(st, "ood/far/empty", np.zeros(0, dtype=np.int64) - 1, {"penultimate": np.zeros((0, 24), np.float32)},
                    role="ood-far")
    code, out, _ = run(capsys, "store", "verify", path)
    assert code == 1
    assert "scores/msp/ood/near/a is gone" in out
    assert "labels 17 are no class of the train split" in out
    assert "ood/far/empty: 0 rows" in out


def test_extract_into_hdf5_gives_the_same_features(capsys, tmp_path, digits_store):
    ckpt, store = digits_store
    h5 = tmp_path / "digits.h5"
    code, _, _ = run(capsys, "-q", "extract", "--model", "digits_cnn", "--weights", ckpt, "--benchmark", "digits",
                     "--split", "test", "--store", h5)
    assert code == 0
    with open_store(store) as a, open_store(h5) as b:
        for layer in ("logits", "penultimate"):
            name = f"splits/test/digits_cnn/{layer}"
            np.testing.assert_array_equal(a.read(name), b.read(name))


def test_extract_custom_data_source(capsys, tmp_path, digits_store):
    """--data with an image folder becomes an OOD split that scores and reports beside the benchmark's."""
    import shutil

    from PIL import Image

    ckpt, store = digits_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    folder = tmp_path / "imgs" / "blobs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    code, _, err = run(capsys, "-q", "extract", "--model", "digits_cnn", "--weights", ckpt,
                       "--data", f"folder:{tmp_path / 'imgs'}", "--split", "ood/far/blobs", "--store", copy)
    assert code == 0, err
    with open_store(copy) as st:
        assert st.node_attrs("splits/ood/far/blobs")["role"] == "ood-far"
        assert (st.read("splits/ood/far/blobs/labels") == -1).all()
    assert run(capsys, "-q", "score", "msp", "--store", copy)[0] == 0
    _, out, _ = run(capsys, "report", "--store", copy, "--json")
    assert "ood/far/blobs" in json.loads(out)["methods"]["msp"]["sets"]


def test_other_weights_are_refused_across_splits(capsys, tmp_path, digits_store):
    """A split extracted with another checkpoint cannot be scored against the rest."""
    import shutil

    ckpt, store = digits_store
    other = tmp_path / "other.safetensors"
    assert run(capsys, "-q", "train", "classifier", "--out", other, "--epochs", "1", "--seed", "1")[0] == 0
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    code, _, err = run(capsys, "-q", "extract", "--model", "digits_cnn", "--weights", other, "--benchmark", "digits",
                       "--split", "ood/far/noise", "--store", copy)
    assert code == 1 and one_line_error(err) and "weights" in err and "--overwrite" in err
    code, _, _ = run(capsys, "-q", "extract", "--model", "digits_cnn", "--weights", other, "--benchmark", "digits",
                     "--split", "ood/far/noise", "--store", copy, "--overwrite")
    assert code == 0
    before = sorted(open_store(copy).walk_arrays("scores"))
    code, _, err = run(capsys, "score", "msp", "--store", copy)
    assert code == 1 and one_line_error(err) and "different 'digits_cnn' weights" in err
    assert sorted(open_store(copy).walk_arrays("scores")) == before  # nothing written


BAD = [
    (["score", "msp", "--store", "{tmp}/missing.zarr"], 1, "no store at"),
    (["report", "--store", "{tmp}/missing.zarr"], 1, "no store at"),
    (["store", "info", "{tmp}/missing.h5"], 1, "no store at"),
    (["score", "msp", "--store", "{store}", "--id", "nope"], 1, "no split 'nope'"),
    (["score", "bogus", "--store", "{store}"], 2, "unknown method 'bogus'"),
    (["score", "msp", "--store", "{store}", "--param", "msp.tau=3"], 2, "has no parameter tau"),
    (["report", "--store", "{store}", "--format", "xml"], 2, "unknown --format"),
    (["report", "--store", "{store}", "--methods", "nothing"], 2, "no scores for nothing"),
    (["extract", "--model", "nope", "--benchmark", "digits", "--store", "{tmp}/n.zarr"], 2, "unknown model 'nope'"),
    (["extract", "--model", "digits_cnn", "--benchmark", "digits", "--store", "{tmp}/n.zarr"], 2, "needs --weights"),
    (["extract", "--model", "digits_cnn-tiny", "--benchmark", "nope", "--store", "{tmp}/n.zarr"], 2, "unknown benchmark"),
    (["extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--split", "valid", "--store", "{tmp}/n.zarr"],
     2, "valid"),
    (["extract", "--model", "digits_cnn-tiny", "--data", "folder:x", "--store", "{tmp}/n.zarr"], 2, "--split"),
    (["extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--layers", "fc9", "--store", "{tmp}/n.zarr"],
     2, "no layer fc9"),
    (["extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--dtype", "int8", "--store", "{tmp}/n.zarr"],
     2, "--dtype"),
    (["extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--device", "cuda:0" if False else "tpu",
      "--store", "{tmp}/n.zarr"], 2, "--device"),
    (["extract", "--model", "cifar_resnet18", "--weights", "{tmp}/none.pt", "--benchmark", "digits", "--store",
      "{tmp}/n.zarr"], 1, "not found"),
    (["extract", "--model", "resnet18-tiny", "--benchmark", "cifar10", "--split", "test", "--data-root", "{tmp}",
      "--store", "{tmp}/n.zarr"], 1, "not found"),
    (["score", "msp", "--store", "{store}", "--bogus-option"], 2, "No such option"),
]


@pytest.mark.parametrize("args,code,message", BAD, ids=[" ".join(b[0][:3]) + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gives_one_line_and_writes_nothing(capsys, tmp_path, digits_store, args, code, message):
    _, store = digits_store
    before = sorted(open_store(store).walk_arrays())
    args = [a.format(tmp=tmp_path, store=store) for a in args]
    got, out, err = run(capsys, *args)
    assert got == code, err
    assert one_line_error(err), err
    assert message in err
    assert not (tmp_path / "n.zarr").exists()  # a failed extract leaves no half-made store
    assert sorted(open_store(store).walk_arrays()) == before


def test_typer_runner_gives_the_same_exit_codes(tmp_path, digits_store):
    """The Typer app itself (not only main()) turns user errors into one line and an exit code."""
    from typer.testing import CliRunner

    from oodcli.cli import app

    _, store = digits_store
    runner = CliRunner()
    result = runner.invoke(app, ["score", "msp", "--store", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1 and one_line_error(result.stderr) and result.exception is None or isinstance(
        result.exception, SystemExit
    )
    result = runner.invoke(app, ["report", "--store", str(store), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["id_split"] == "test"


def test_list_models_and_benchmarks(capsys):
    from oodcli.backbones import all_specs

    code, out, _ = run(capsys, "extract", "--list-models")
    assert code == 0 and all(name in out for name in all_specs())
    code, out, _ = run(capsys, "extract", "--list-benchmarks")
    assert code == 0 and "digits" in out and "ood/near/digits6-9" in out and "imagenet200" in out


def test_scores_saved_under_another_name_sit_beside_the_method(capsys, tmp_path, digits_store):
    import shutil

    _, store = digits_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    code, _, err = run(capsys, "-q", "score", "energy", "--store", copy, "-p", "energy.temperature=10",
                       "--as", "energy-t10")
    assert code == 0, err
    _, out, _ = run(capsys, "report", "--store", copy, "--json")
    methods = json.loads(out)["methods"]
    assert methods["energy-t10"]["hparams"] == {"temperature": 10.0}
    assert methods["energy"]["hparams"] == {"temperature": 1.0}
    assert methods["energy-t10"]["sets"]["ood/far/noise"] != methods["energy"]["sets"]["ood/far/noise"]
    code, _, err = run(capsys, "score", "msp,energy", "--store", copy, "--as", "x")
    assert code == 2 and one_line_error(err) and "single METHOD" in err


def test_a_method_for_another_kind_of_backbone_says_so(capsys, digits_store):
    _, store = digits_store
    code, _, err = run(capsys, "score", "mcm", "--store", store)
    assert code == 1 and one_line_error(err)
    assert "backbone 'digits_cnn' has no layer image_embeds" in err


def _store_state(path):
    with open_store(path) as st:
        return {n: (st.read(n).tobytes(), st.node_attrs(n)) for n in st.walk_arrays()}


@pytest.mark.parametrize("when", ["scoring", "writing"])
def test_ctrl_c_during_score_gives_130_one_line_and_the_store_as_before(capsys, tmp_path, digits_store, monkeypatch,
                                                                       when, ctrl_c):
    """A real SIGINT, sent while a method scores or while the results are being written:
    exit 130, one line on stderr, and not one array or attribute changed."""
    import os
    import shutil
    import signal

    import oodcli.scorers.logits as logits
    from oodcli.store import Store

    _, store = digits_store
    path = tmp_path / "s.zarr"
    shutil.copytree(store, path)
    before = _store_state(path)
    sent = []

    def interrupt_once():
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    if when == "scoring":
        real = logits.Energy.score_batch
        monkeypatch.setattr(logits.Energy, "score_batch", lambda self, b: (interrupt_once(), real(self, b))[1])
    else:
        real_write = Store.write_rows

        def write_rows(self, name, start, data):
            if name.startswith(".txn/"):
                interrupt_once()  # lands inside the write: held back until the operation is done
            real_write(self, name, start, data)

        monkeypatch.setattr(Store, "write_rows", write_rows)
    code, out, err = run(capsys, "score", "msp,energy", "--store", path, "-p", "energy.temperature=3")
    assert sent and code == 130
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith("interrupted") and "Traceback" not in err
    assert _store_state(path) == before
    assert not (path / ".txn").exists()
