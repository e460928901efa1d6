"""Full-spectrum OOD: the csid role (covariate-shifted ID), report --fsood, cs-ID accuracy,
OpenOOD's CSV shape and the summary heatmap."""

import csv
import io
import json

import numpy as np
import pytest

import oodcli
from conftest import one_line_error, run
from oodcli.cli import main
from oodcli.data.base import role_from_name
from oodcli.store import open_store
from test_scorers import BACKBONE, CLASSES, DIM, make_store, write_split

METHODS = ["msp", "energy", "maxlogit"]
CSID = {"csid/shifted": 80, "csid/noisy": 70}


def add_csid(path, seed=1):
    """Two cs-ID splits beside the ID test split: the train classes' labels, features shifted
    part of the way towards OOD, logits from the store's head."""
    rng = np.random.default_rng(seed)
    with open_store(path, "a") as st:
        weight = st.read(f"backbones/{BACKBONE}/head/weight")
        bias = st.read(f"backbones/{BACKBONE}/head/bias")
        for i, (split, n) in enumerate(CSID.items()):
            labels = rng.integers(0, CLASSES, n)
            x = np.exp(rng.normal(0.3 + 0.1 * i, 0.5, (n, DIM))).astype(np.float32)
            write_split(st, split, labels, {"penultimate": x, "logits": x @ weight.T + bias}, role="csid")
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    path = add_csid(make_store(tmp_path_factory.mktemp("fsood") / "s.zarr"))
    assert main(["-q", "score", ",".join(METHODS), "--store", str(path)]) == 0
    return path


def test_csid_role_from_name():
    assert role_from_name("csid/imagenet_v2") == "csid"
    assert role_from_name("csid/cifar10c/fog") == "csid"
    assert role_from_name("ood/near/csid") == "ood-near"
    assert role_from_name("test") == "id"
    assert role_from_name("synthetic/synood") == "synthetic"


def test_score_scores_csid_splits_and_verify_accepts_their_labels(capsys, scored):
    with open_store(scored) as st:
        for method in METHODS:
            for split, n in CSID.items():
                assert st.read(f"scores/{method}/{split}").shape == (n,)
        assert (st.read("splits/csid/shifted/labels") >= 0).all()
    code, out, err = run(capsys, "store", "verify", scored)
    assert code == 0, out + err


def test_openood_csid_sets_are_optional_splits_with_their_labels(tmp_path):
    from oodcli.api import resolve_splits
    from oodcli.data.benchmarks import get_benchmark

    want = {"cifar10": ["csid/cifar10c"], "imagenet200": ["csid/imagenet_v2", "csid/imagenet_c", "csid/imagenet_r"],
            "imagenet": ["csid/imagenet_v2", "csid/imagenet_c", "csid/imagenet_r"]}
    for name, csids in want.items():
        bench = get_benchmark(name)
        assert bench.split_names("csid") == csids
        assert all(bench.split(s).optional for s in csids)
        everything = [d.name for d in resolve_splits(name, None, None, None)]
        assert not set(csids) & set(everything) and {"train", "test"} <= set(everything)
        assert [d.name for d in resolve_splits(name, None, csids[:1], None)] == csids[:1]
    assert get_benchmark("imagenet200").split("csid/imagenet_r").source == \
        "imglist:benchmark_imglist/imagenet200/test_imagenet200_r.txt@images_largescale"
    # an OpenOOD list with class labels: a cs-ID split keeps them (an OOD split would read -1)
    lst = tmp_path / "benchmark_imglist" / "cifar10" / "test_cifar10c.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("cifar10c/a.png 3\ncifar10c/b.png 7\n")
    (tmp_path / "images_classic" / "cifar10c").mkdir(parents=True)
    for f in ("a", "b"):
        (tmp_path / "images_classic" / "cifar10c" / f"{f}.png").write_bytes(b"")
    assert get_benchmark("cifar10").open("csid/cifar10c", tmp_path).labels.tolist() == [3, 7]


def _id_and_csid(st, method):
    return np.concatenate([st.read(f"scores/{method}/{s}") for s in ["test", *CSID]])


def test_fsood_counts_csid_as_id_in_every_metric(capsys, scored):
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

    code, out, _ = run(capsys, "report", "--store", scored, "--fsood", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["fsood"] and report["csid_splits"] == sorted(CSID)
    assert report["ood_splits"] == {"ood/far/b": "far", "ood/near/a": "near"}
    with open_store(scored) as st:
        for method in METHODS:
            pos = _id_and_csid(st, method)
            for split in report["ood_splits"]:
                neg = st.read(f"scores/{method}/{split}")
                y, score = np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]
                cell = report["methods"][method]["sets"][split]
                assert cell["auroc"] == pytest.approx(roc_auc_score(y, score))
                fpr, tpr, _ = roc_curve(1 - y, -score)  # OpenOOD: OOD positive, first threshold at 95% recall
                assert cell["fpr95_openood"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
                precision, recall, _ = precision_recall_curve(y, score)
                assert cell["aupr_in_openood"] == pytest.approx(auc(recall, precision))
                # ID positive: share of OOD at or above the score that keeps 95% of ID + cs-ID
                t = np.sort(pos)[int(np.floor(0.05 * len(pos)))]
                assert cell["fpr95"] == pytest.approx(np.mean(neg >= t), abs=1.5 / len(neg))
    code, out, _ = run(capsys, "report", "--store", scored, "--json")
    plain = json.loads(out)  # without --fsood the cs-ID rows count nowhere (OpenOOD's plain OOD evaluation)
    assert plain["csid_not_counted"] == sorted(CSID) and "csid_accuracy" not in plain
    with open_store(scored) as st:
        id_only = roc_auc_score(np.r_[np.ones(120), np.zeros(100)],
                                np.r_[st.read("scores/msp/test"), st.read("scores/msp/ood/near/a")])
    assert plain["methods"]["msp"]["sets"]["ood/near/a"]["auroc"] == pytest.approx(id_only)
    assert plain["methods"]["msp"]["sets"]["ood/near/a"]["auroc"] != report["methods"]["msp"]["sets"]["ood/near/a"]["auroc"]


def test_csid_accuracy_in_every_format(capsys, scored):
    with open_store(scored) as st:
        right = {}
        for split in ["test", *CSID]:
            logits, labels = st.read(f"splits/{split}/{BACKBONE}/logits"), st.read(f"splits/{split}/labels")
            right[split] = (logits.argmax(1) == labels)
    pooled = np.concatenate(list(right.values())).mean()
    code, out, _ = run(capsys, "report", "--store", scored, "--fsood", "--json")
    report = json.loads(out)
    assert report["id_accuracy"] == pytest.approx(right["test"].mean())
    assert report["csid_accuracy"] == pytest.approx({s: right[s].mean() for s in CSID})
    assert report["fsood_accuracy"] == pytest.approx(pooled)
    shown = f"{100 * right['csid/shifted'].mean():.1f}%"
    code, out, _ = run(capsys, "report", "--store", scored, "--fsood")
    assert code == 0 and f"csid/shifted {shown}" in " ".join(out.split())
    code, out, _ = run(capsys, "report", "--store", scored, "--fsood", "--format", "markdown")
    assert f"csid/shifted {100 * right['csid/shifted'].mean():.2f}%" in out and "`csid/noisy`" in out
    code, out, _ = run(capsys, "report", "--store", scored, "--fsood", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    acc = {r["ood_set"]: float(r["accuracy"]) for r in rows if r["method"] == "msp" and r["group"] in ("id", "csid")}
    assert acc == pytest.approx({"test": right["test"].mean(), **{s: right[s].mean() for s in CSID}}, abs=1e-6)
    near = [float(r["accuracy"]) for r in rows if r["group"] == "near"]
    assert near and np.allclose(near, pooled, atol=1e-6)  # OpenOOD's FS-OOD ACC: ID and cs-ID pooled
    frame = oodcli.report_frame(scored, fsood=True)
    assert frame.loc[("msp", "near_average"), "ACC"] == pytest.approx(100 * pooled)
    page = tmp_html(scored, capsys)
    assert f"{100 * right['csid/noisy'].mean():.2f}" in page and "ID + cs-ID" in page


def tmp_html(store, capsys, methods="msp"):
    out = store.parent / "r.html"
    code, _, err = run(capsys, "-q", "report", "--store", store, "--fsood", "--html", out, "--methods", methods)
    assert code == 0, err
    return out.read_text()


def test_fsood_without_csid_splits_or_scores_is_one_line(capsys, tmp_path):
    path = make_store(tmp_path / "plain.zarr")
    assert run(capsys, "-q", "score", "msp", "--store", path)[0] == 0
    code, out, err = run(capsys, "report", "--store", path, "--fsood")
    assert code == 1 and one_line_error(err) and "cs-ID" in err
    add_csid(path)  # cs-ID splits without scores: the method is left out with the command that scores it
    assert run(capsys, "-q", "score", "energy", "--store", path)[0] == 0
    code, out, err = run(capsys, "report", "--store", path, "--fsood", "--json")
    report = json.loads(out)
    assert code == 0 and list(report["methods"]) == ["energy"]
    assert "--ood csid/noisy --ood csid/shifted" in report["left_out"]["msp"]
    code, out, err = run(capsys, "report", "--store", path, "--csv-style", "openood")
    assert code == 2 and one_line_error(err) and "--format csv" in err


def test_openood_csv_shape(capsys, scored):
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "csv", "--csv-style", "openood")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "method,dataset,FPR@95,AUROC,AUPR_IN,AUPR_OUT,ACC"
    report = json.loads(run(capsys, "report", "--store", scored, "--json")[1])
    per_method = {}
    for row in csv.reader(lines[1:]):
        per_method.setdefault(row[0], []).append(row)
    assert list(per_method) == list(report["methods"])
    for method, rows in per_method.items():
        assert [r[1] for r in rows] == ["a", "nearood", "b", "farood"]  # OpenOOD's order and names
        data = report["methods"][method]
        for name, cell in (("a", data["sets"]["ood/near/a"]), ("farood", data["averages"]["far"])):
            row = next(r for r in rows if r[1] == name)
            want = [cell["fpr95_openood"], cell["auroc"], cell["aupr_in_openood"], cell["aupr_out_openood"],
                    report["id_accuracy"]]
            assert row[2:] == [f"{100 * v:.2f}" for v in want]
    fs = run(capsys, "report", "--store", scored, "--fsood", "--format", "csv", "--csv-style", "openood")[1]
    fs_report = json.loads(run(capsys, "report", "--store", scored, "--fsood", "--json")[1])
    assert next(csv.reader(fs.splitlines()[1:2]))[-1] == f"{100 * fs_report['fsood_accuracy']:.2f}"


def test_heatmap_rows_follow_mean_rank(capsys, scored, tmp_path):
    from oodcli.reporting import SUMMARY_PNG, mean_ranks, rank_order

    report = json.loads(run(capsys, "report", "--store", scored, "--json")[1])
    ranks = {}
    for split in report["ood_splits"]:  # rank 1 = highest AUROC on the set, mean over sets
        order = sorted(report["methods"], key=lambda m: -report["methods"][m]["sets"][split]["auroc"])
        for i, m in enumerate(order, 1):
            ranks.setdefault(m, []).append(i)
    want = {m: np.mean(r) for m, r in ranks.items()}
    assert mean_ranks(report) == pytest.approx(want)
    assert rank_order(report) == sorted(want, key=lambda m: want[m])
    # ties keep the report's order; a method without sets goes last
    fake = {"ood_splits": {"s": "far"}, "methods": {
        "none": {"sets": {}}, "b": {"sets": {"s": {"auroc": 0.7}}}, "a": {"sets": {"s": {"auroc": 0.7}}},
        "c": {"sets": {"s": {"auroc": 0.9}}}}}
    assert rank_order(fake) == ["c", "b", "a", "none"]
    code, _, err = run(capsys, "-q", "report", "--store", scored, "--plots", tmp_path / "plots", "--methods", "msp,energy")
    png = (tmp_path / "plots" / SUMMARY_PNG).read_bytes()
    assert code == 0 and png.startswith(b"\x89PNG")
    page = tmp_html(scored, capsys)
    assert 'alt="summary heatmap"' in page
