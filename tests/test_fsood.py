"""Full-spectrum OOD: the csid role (covariate-shifted ID), report --fsood, cs-ID accuracy,
OpenOOD's CSV shape and the summary heatmap."""

import json

import numpy as np
import pytest

from conftest import run
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
