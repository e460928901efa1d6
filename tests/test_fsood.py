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
