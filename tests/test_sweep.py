"""``oodcli sweep``: hyperparameters chosen on validation splits from stored features, the
record under fitted/sweeps/, ``score --from-sweep``, and validation splits kept out of tests."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import one_line_error, run
from oodcli.store import Store, open_store
from oodcli.sweeping import DEFAULT_GRIDS, grid_settings, parse_grid
from test_scorers import BACKBONE, write_split

DIM, CLUSTERS, PER_CLUSTER, SINGLETONS = 16, 20, 5, 40
TEST_SPLITS = ("test", "ood/near/a", "ood/far/b")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_sweep_store(path, seed=0):
    """Features where knn's k = 5 (the cluster size) clearly wins on the validation splits.

    Train: 20 tight clusters of 5 points (classes 0-3) and 40 lone points far from them. ID val
    sits in the clusters; OOD val sits on the lone points. k = 1 sees OOD as ID (its nearest
    train point is its own lone point); k = 20 reaches past the own cluster for ID rows too;
    k = 5 keeps ID close and OOD far. Logits from a random head, so that every method can run.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(np.abs(rng.normal(size=(CLUSTERS, DIM))))  # positive, like post-ReLU features
    lone = _unit(np.abs(rng.normal(size=(SINGLETONS, DIM))))
    weight = rng.normal(0, 0.5, (4, DIM)).astype(np.float32)
    bias = rng.normal(0, 0.5, 4).astype(np.float32)

    def near(points, n, spread):
        idx = rng.integers(0, len(points), n)
        return _unit(np.abs(points[idx] + rng.normal(0, spread, (n, DIM)))), idx

    train_c = _unit(np.abs(np.repeat(centres, PER_CLUSTER, axis=0) + rng.normal(0, 0.02, (CLUSTERS * PER_CLUSTER, DIM))))
    train = np.concatenate([train_c, lone])
    train_labels = np.r_[np.repeat(np.arange(CLUSTERS) % 4, PER_CLUSTER), np.arange(SINGLETONS) % 4]
    val, val_idx = near(centres, 60, 0.02)
    splits = {
        "train": (train, train_labels, "id"),
        "val": (val, val_idx % 4, "id"),
        "ood/val/lone": (near(lone, 50, 0.01)[0], None, "ood-val"),
        "test": (near(centres, 40, 0.02)[0], None, "id"),
        "ood/near/a": (near(lone, 30, 0.01)[0], None, "ood-near"),
        "ood/far/b": (_unit(np.abs(rng.normal(size=(30, DIM)))), None, "ood-far"),
    }
    with open_store(path, "a") as st:
        for name, (x, labels, role) in splits.items():
            if labels is None:
                labels = np.full(len(x), -1) if role != "id" else rng.integers(0, 4, len(x))
            x = x.astype(np.float32)
            write_split(st, name, labels, {"penultimate": x, "logits": x @ weight.T + bias}, role=role)
        st.write_array(f"backbones/{BACKBONE}/head/weight", weight)
        st.write_array(f"backbones/{BACKBONE}/head/bias", bias)
        st.set_attrs(f"backbones/{BACKBONE}", model_id="model-1")
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    path = make_sweep_store(tmp_path_factory.mktemp("sweep") / "s.zarr")
    from oodcli.cli import main

    assert main(["-q", "sweep", "knn", "--store", str(path), "--grid", "k=1,5,20"]) == 0
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A store for tests whose sweeps may overwrite each other's records."""
    return make_sweep_store(tmp_path_factory.mktemp("sweep") / "scratch.zarr")


def knn_reference(train, x, k):
    """minus the distance to the k-th nearest normalised train row, by brute force."""
    t, q = _unit(train.astype(np.float64)), _unit(x.astype(np.float64))
    d = np.sqrt(np.maximum(((q[:, None, :] - t[None, :, :]) ** 2).sum(-1), 0))
    return -np.sort(d, axis=1)[:, k - 1]


def test_sweep_picks_the_setting_that_wins_and_records_the_grid(swept):
    with open_store(swept) as st:
        record = st.node_attrs("fitted/sweeps/knn")
        aurocs = st.read("fitted/sweeps/knn/auroc")
        train = st.read(f"splits/train/{BACKBONE}/penultimate")
        val = st.read(f"splits/val/{BACKBONE}/penultimate")
        ood = st.read(f"splits/ood/val/lone/{BACKBONE}/penultimate")
    assert record["grid"] == {"k": [1, 5, 20]}
    assert record["best_hparams"] == {"k": 5} and record["best"] == 1
    assert record["val_id"] == "val" and record["val_ood"] == ["ood/val/lone"]
    for row, value in zip(record["settings"], aurocs):
        k = row["hparams"]["k"]
        s_id, s_ood = knn_reference(train, val, k), knn_reference(train, ood, k)
        want = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
        assert row["auroc"] == pytest.approx(want, abs=1e-6) and value == pytest.approx(want, abs=1e-6)
        threshold = np.sort(s_id)[::-1][int(np.ceil(0.95 * len(s_id))) - 1]
        assert row["fpr95"] == pytest.approx(np.mean(s_ood >= threshold - 1e-6), abs=1e-6)
    assert record["settings"][1]["auroc"] > 0.95 > max(record["settings"][0]["auroc"], record["settings"][2]["auroc"])


def test_from_sweep_scores_equal_scoring_with_the_chosen_parameters(capsys, swept):
    code, _, err = run(capsys, "score", "knn", "--store", swept, "--from-sweep")
    assert code == 0, err
    code, _, err = run(capsys, "score", "knn", "--store", swept, "-p", "knn.k=5", "--as", "knn-k5")
    assert code == 0, err
    with open_store(swept) as st:
        for split in TEST_SPLITS:
            np.testing.assert_array_equal(st.read(f"scores/knn/{split}"), st.read(f"scores/knn-k5/{split}"))
        attrs = st.node_attrs("scores/knn/test")
        assert attrs["hparams"] == {"k": 5} and attrs["sweep"] == "fitted/sweeps/knn"
        # validation splits are no test sets: score leaves them out, report does too
        assert not st.exists("scores/knn/ood/val/lone") and not st.exists("scores/knn/val")
    code, out, _ = run(capsys, "report", "--store", swept, "--json")
    assert code == 0 and set(json.loads(out)["ood_splits"]) == {"ood/near/a", "ood/far/b"}
    # 'all': the swept method with its choice, the others with their defaults
    code, out, err = run(capsys, "score", "all", "--store", swept, "--from-sweep", "--json")
    rows = {r["method"]: r for r in json.loads(out)}
    assert code == 0 and "swept knn; the other methods run with their defaults" in err
    with open_store(swept) as st:
        assert st.node_attrs("scores/knn/test")["hparams"] == {"k": 5}
        assert st.node_attrs("scores/react/test")["hparams"] == {"percentile": 90.0} and "react" in rows


def test_sweep_reads_no_test_split(monkeypatch, tmp_path):
    path = make_sweep_store(tmp_path / "s.zarr")
    touched = []
    for name in ("read", "shape", "chunk_rows", "node_attrs"):
        original = getattr(Store, name)

        def spy(self, node, *args, _original=original, _name=name):
            touched.append((_name, node))
            return _original(self, node, *args)

        monkeypatch.setattr(Store, name, spy)
    from oodcli.sweeping import run_sweep

    with open_store(path, "r+") as st:
        record = run_sweep(st, "react", {"percentile": [80, 90, 99]})
    assert record["best_hparams"]["percentile"] in (80, 90, 99)
    assert ("read", f"splits/val/{BACKBONE}/penultimate") in touched
    assert ("read", f"splits/train/{BACKBONE}/penultimate") in touched
    on_test = [(what, n) for what, n in touched for s in TEST_SPLITS if n.startswith(f"splits/{s}/")]
    # of the ID test and test OOD splits only what tells which splits the store holds (the row
    # counts of labels and ids): no features, no labels, no attributes of their features
    assert {what for what, _ in on_test} <= {"shape"}, on_test
    assert {n.rsplit("/", 1)[-1] for _, n in on_test} <= {"labels", "ids"}, on_test


def test_ties_go_to_the_first_setting_in_grid_order(capsys, scratch):
    path = scratch
    # gen uses every class once top_m >= the 4 classes: top_m 10 and 4 score alike
    for grid, want in (("top_m=10,4", 10), ("top_m=4,10", 4)):
        code, out, err = run(capsys, "sweep", "gen", "--store", path, "--grid", grid, "--json")
        assert code == 0, err
        record = json.loads(out)
        a, b = (r["auroc"] for r in record["settings"])
        assert a == b and record["best_hparams"] == {"top_m": want}


def test_grid_parsing_and_cartesian_order():
    assert parse_grid("k=1,10;", "knn") == {"k": [1, 10]}  # a trailing ';' is harmless
    grid = parse_grid("gamma=0.1, 1 ;top_m=3,6", "gen")
    assert grid == {"gamma": [0.1, 1], "top_m": [3, 6]}
    assert grid_settings(grid) == [{"gamma": 0.1, "top_m": 3}, {"gamma": 0.1, "top_m": 6},
                                   {"gamma": 1, "top_m": 3}, {"gamma": 1, "top_m": 6}]
    assert parse_grid("knn.k=5", "knn") == {"k": [5]}
    from oodcli.scorers.base import scorer_params

    for method, grid in DEFAULT_GRIDS.items():  # OpenOOD's sweeps name parameters our scorers take
        assert set(grid) <= set(scorer_params(method)), method


def test_infeasible_settings_are_listed_and_skipped(capsys, scratch):
    path = scratch
    code, out, err = run(capsys, "sweep", "knn", "--store", path, "--grid", "k=5,1000", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["best_hparams"] == {"k": 5}
    assert record["settings"][1]["status"] == "skipped" and "only 140 rows" in record["settings"][1]["reason"]
    code, out, _ = run(capsys, "sweep", "knn", "--store", path, "--grid", "k=5,1000")
    assert code == 0 and "chosen" in out and "pick a smaller k" in out


@pytest.mark.parametrize("grid, words", [
    ("k", "not NAME=V1"),
    ("k=", "empty value"),
    ("k=1,,5", "empty value"),
    ("=1", "not NAME=V1"),
    (" ; ", "no setting"),
    ("nope=1,2", "no parameter 'nope'"),
    ("k=1;k=2", "twice"),
    ("k=1,1", "repeats"),
    ("k=0,5", "bad parameter"),
    ("k=abc", "expects an integer"),
    ("k=1.5,5", "expects an integer"),
])
def test_bad_grids_are_one_line(capsys, swept, grid, words):
    code, _, err = run(capsys, "sweep", "knn", "--store", swept, "--grid", grid)
    assert code == 2 and one_line_error(err) and words in err, err


def test_bad_sweeps_are_one_line(capsys, tmp_path, swept):
    code, _, err = run(capsys, "sweep", "msp", "--store", swept)
    assert code == 2 and one_line_error(err) and "no default grid" in err
    code, _, err = run(capsys, "sweep", "nope", "--store", swept)
    assert code == 2 and one_line_error(err) and "unknown method" in err
    code, _, err = run(capsys, "sweep", "knn", "--store", swept, "--val-ood", "ood/near/a", "--grid", "k=1")
    assert code == 2 and one_line_error(err) and "test split" in err
    code, _, err = run(capsys, "sweep", "knn", "--store", swept, "--val-id", "test", "--grid", "k=1")
    assert code == 2 and one_line_error(err) and "validation data only" in err
    code, _, err = run(capsys, "sweep", "knn", "--store", swept, "--val-ood", "ood/val/none", "--grid", "k=1")
    assert code == 1 and one_line_error(err) and "no split 'ood/val/none'" in err
    # a store without validation splits
    from test_scorers import make_store

    plain = make_store(tmp_path / "plain.zarr")
    code, _, err = run(capsys, "sweep", "knn", "--store", plain, "--grid", "k=1")
    assert code == 1 and one_line_error(err) and "no ID validation split 'val'" in err
    with open_store(plain, "a") as st:
        write_split(st, "val", np.zeros(10, np.int64), {"penultimate": np.ones((10, 24), np.float32)})
    code, _, err = run(capsys, "sweep", "knn", "--store", plain, "--grid", "k=1")
    assert code == 1 and one_line_error(err) and "no OOD validation split" in err
    # --from-sweep without a sweep, or together with -p
    code, _, err = run(capsys, "score", "knn", "--store", plain, "--from-sweep")
    assert code == 1 and one_line_error(err) and "no sweep of 'knn'" in err
    code, _, err = run(capsys, "score", "knn", "--store", swept, "--from-sweep", "-p", "knn.k=3")
    assert code == 2 and one_line_error(err) and "give one of them" in err


def test_from_sweep_refuses_a_sweep_made_on_other_features(capsys, tmp_path):
    path = make_sweep_store(tmp_path / "s.zarr")
    code, _, err = run(capsys, "sweep", "react", "--store", path, "--grid", "percentile=80,90")
    assert code == 0, err
    with open_store(path, "a") as st:  # the train split re-extracted since: another fingerprint
        st.set_attrs(f"splits/train/{BACKBONE}", fingerprint="fp-train-other")
    code, _, err = run(capsys, "score", "react", "--store", path, "--from-sweep")
    assert code == 1 and one_line_error(err) and "other train features" in err
    with open_store(path, "a") as st:
        st.set_attrs("fitted/sweeps/react", model_id="model-0")
    code, _, err = run(capsys, "score", "react", "--store", path, "--from-sweep")
    assert code == 1 and one_line_error(err) and "other 'm' features" in err


def test_sweep_table_and_json_agree(capsys, swept):
    code, out, _ = run(capsys, "sweep", "knn", "--store", swept, "--grid", "k=1,5,20")
    assert code == 0 and "chosen" in out and "ties go to the first" in out
    code, out, _ = run(capsys, "sweep", "knn", "--store", swept, "--grid", "k=1,5,20", "--json")
    record = json.loads(out)
    assert [r["hparams"]["k"] for r in record["settings"]] == [1, 5, 20] and record["best_hparams"] == {"k": 5}


def test_digits_validation_splits_leave_the_test_splits_as_they_were():
    from oodcli.data import digits
    from oodcli.data.benchmarks import get_benchmark

    # the ID test split's identity from before the validation splits existed
    assert digits.digits_part("test").identity() == "digits:test:n=325:labels=9d523386cfbe9ffc"
    assert len(digits.digits_labels("ood/far/textures")) == digits.N_TEXTURES
    val = {r.tobytes() for r in digits.digits_8x8("ood/val/textures")[0]}
    far = {r.tobytes() for r in digits.digits_8x8("ood/far/textures")[0]}
    assert len(val & far) <= 2  # fresh crops (a flat crop may repeat by chance), not the test set
    y = digits.digits_labels("val")
    assert np.bincount(y).min() >= 20  # stratified: every class
    for name in ("cifar10", "cifar100", "imagenet200", "imagenet"):
        bench = get_benchmark(name)
        (val_ood,) = bench.split_names("ood-val")
        assert bench.split("val").role == "id" and "/val_" in bench.split(val_ood).source
        assert val_ood not in bench.split_names("ood-near") + bench.split_names("ood-far")


def test_store_rm_of_a_method_removes_its_sweep_too(capsys, tmp_path):
    path = make_sweep_store(tmp_path / "s.zarr")
    assert run(capsys, "-q", "sweep", "knn", "--store", path, "--grid", "k=1,5")[0] == 0
    assert run(capsys, "-q", "score", "knn", "--store", path, "--from-sweep")[0] == 0
    code, out, err = run(capsys, "store", "rm", path, "knn", "--json")
    assert code == 0, err
    with open_store(path) as st:
        assert not st.exists("fitted/sweeps/knn") and not st.exists("scores/knn") and not st.exists("fitted/knn")


def test_sweep_scores_the_layer_score_will_use(tmp_path):
    """ASH with layer=auto shapes the featmap when the splits have one: the sweep must choose on
    that layer (it used to sweep the pooled vector and then score the map)."""
    from oodcli.metrics import auroc
    from oodcli.scorers import get_scorer
    from oodcli.sweeping import run_sweep

    path = make_sweep_store(tmp_path / "fm.zarr")
    rng = np.random.default_rng(5)
    with open_store(path, "a") as st:
        for split in ("train", "val", "ood/val/lone", "test", "ood/near/a", "ood/far/b"):
            n = st.shape(f"splits/{split}/{BACKBONE}/penultimate")[0]
            fmap = np.abs(rng.normal(size=(n, DIM, 2, 2))).astype(np.float32)
            st.write_array(f"splits/{split}/{BACKBONE}/featmap", fmap)
        record = run_sweep(st, "ash-s", {"percentile": [70, 90], "layer": ["auto"]}, write=False)
        for row in record["settings"]:
            scorer = get_scorer("ash-s", percentile=row["hparams"]["percentile"], layer="featmap")
            scorer.complete_inputs(st, BACKBONE, ["val", "ood/val/lone"])
            scorer.prepare(st, BACKBONE, "train", "model-1")
            want = auroc(scorer.score(st, BACKBONE, "val"), scorer.score(st, BACKBONE, "ood/val/lone"))
            assert row["auroc"] == pytest.approx(want, abs=1e-9)
