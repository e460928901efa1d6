"""select-k: BIC over per-class GMMs recovers the number of clusters, and the command's store I/O."""

import json

import numpy as np
import pytest

from conftest import one_line_error, run
from oodcli.errors import UsageError
from oodcli.select_k import parse_k_range, read_k, select_k_arrays
from oodcli.store import open_store

TRUE_K = {0: 1, 1: 2, 2: 3, 3: 5}


def mixtures(dim=128, n=400, sep=8.0, seed=0):
    """Each class a mixture of TRUE_K[c] isotropic Gaussians whose means are ~sep apart."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, k in TRUE_K.items():
        means = rng.normal(size=(k, dim))
        means *= sep / np.sqrt(2) / np.linalg.norm(means, axis=1, keepdims=True)
        means += rng.normal(0, 5, dim)  # classes sit apart too
        xs.append(means[rng.integers(0, k, n)] + rng.normal(size=(n, dim)))
        ys.append(np.full(n, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def test_bic_recovers_the_true_k():
    x, y = mixtures(dim=768, n=500)  # the shape of DINOv2-B features of a CIFAR class
    result = select_k_arrays(x, y, k_range=(1, 7))
    assert dict(zip(result.classes.tolist(), result.k.tolist())) == TRUE_K
    assert result.bic.shape == (4, 7) and (result.dims == 8).all()
    assert all(np.nanargmin(row) + 1 == k for row, k in zip(result.bic, TRUE_K.values()))


def test_full_covariance_without_reduction_is_blind():
    """Why the default reduces first: one full 64-d component has 2,144 parameters, so BIC
    never pays for a second one on 300 points, even with three clear clusters."""
    x, y = mixtures(dim=64, n=300)
    result = select_k_arrays(x[y == 2], y[y == 2], k_range=(1, 4), covariance="full", pca_dim=0, n_init=1)
    assert result.k.tolist() == [1]


def test_parse_k_range():
    assert parse_k_range("1..10") == (1, 10) and parse_k_range("3..3") == (3, 3)
    for bad in ("0..4", "5..2", "1-4", "a..b"):
        with pytest.raises(UsageError):
            parse_k_range(bad)


def make_store(path, x, y, ood_rows=0):
    with open_store(path, "a") as st:
        labels = np.concatenate([y, -np.ones(ood_rows, np.int64)])
        feats = np.concatenate([x, np.zeros((ood_rows, x.shape[1]), np.float32)])
        st.write_array("splits/train/labels", labels)
        st.write_array("splits/train/ids", np.arange(len(labels)))
        st.set_attrs("splits/train", role="id", n=len(labels))
        st.create_array("splits/train/m/penultimate", feats.shape, np.float32, chunk_rows=100)
        st.write_rows("splits/train/m/penultimate", 0, feats)
        st.set_attrs("splits/train/m", complete=True, rows_done=len(labels), model_id="m1", fingerprint="fp")
    return path


def test_cli_writes_k_per_class(tmp_path, capsys):
    x, y = mixtures(dim=32, n=200)
    path = make_store(tmp_path / "s.zarr", x, y)
    code, out, _ = run(capsys, "-q", "select-k", "--store", path, "--k-range", "1..6", "--json")
    assert code == 0
    data = json.loads(out)
    assert {r["class"]: r["k"] for r in data["classes"]} == TRUE_K
    assert data["settings"]["layer"] == "penultimate" and data["total_prototypes"] == sum(TRUE_K.values())
    with open_store(path) as st:
        assert read_k(st) == TRUE_K
        assert st.node_attrs("fitted/select_k")["complete"] and st.read("fitted/select_k/bic").shape == (4, 6)
    code, out, _ = run(capsys, "-q", "select-k", "--store", path, "--model", "m", "--k-range", "1..6")
    assert code == 0 and "K*" in out and "11 prototypes" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    x, y = mixtures(dim=16, n=50)
    path = make_store(tmp_path / "s.zarr", x, y)
    code, _, err = run(capsys, "select-k", "--store", path, "--k-range", "4..2")
    assert code == 2 and one_line_error(err)
    code, _, err = run(capsys, "select-k", "--store", path, "--split", "val")
    assert code == 1 and one_line_error(err) and "no split 'val'" in err
    code, _, err = run(capsys, "select-k", "--store", path, "--covariance", "round")
    assert code == 2 and one_line_error(err) and "covariance" in err
    code, _, err = run(capsys, "select-k", "--store", tmp_path / "none.zarr")
    assert code == 1 and one_line_error(err)
    with open_store(path) as st:
        assert not st.exists("fitted/select_k")  # nothing half-written
    ood = make_store(tmp_path / "ood.zarr", x, y, ood_rows=5)
    code, _, err = run(capsys, "select-k", "--store", ood)
    assert code == 1 and "OOD rows" in err
