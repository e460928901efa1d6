"""fDBD, NNGuide, NCI, Relation, VRA and the class-conditional GMM against references
written from their formulas in plain numpy (loops where the formula is a sum), their
published defaults, streaming, the fitted-state cache and the command line."""

import json

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from conftest import one_line_error, run
from oodcli.scorers import describe_scorers
from oodcli.scoring import score_store
from oodcli.store import Store, open_store
from test_scorers import BACKBONE, CHUNK, SPLITS, arrays, make_store

NEW = ["fdbd", "gmm", "nci", "nnguide", "relation", "vra"]
EVAL = ("test", "ood/near/a", "ood/far/b")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("detectors") / "s.zarr")


def scored(path, method, hparams=None, split="test"):
    with open_store(path, "r+") as st:
        score_store(st, [method], hparams={method: hparams or {}})
        return st.read(f"scores/{method}/{split}")


def energy(logits):
    return logsumexp(logits, axis=1)


def unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---- references ----------------------------------------------------------------------------


def ref_fdbd(train, data, normalizer="mean"):
    x, W, b = data["penultimate"], data["W"], data["b"]
    mu = train["penultimate"].mean(0)
    out = []
    for z in x:
        logits = W @ z + b
        f = int(np.argmax(logits))
        dists = [abs(logits[f] - logits[j]) / np.linalg.norm(W[f] - W[j]) for j in range(len(b)) if j != f]
        out.append(np.mean(dists) / np.linalg.norm(z - mu if normalizer == "mean" else z))
    return np.array(out)


def ref_nci(train, data, alpha=1e-4):
    x, W, b = data["penultimate"], data["W"], data["b"]
    mu = train["penultimate"].mean(0)
    out = []
    for z in x:
        f = int(np.argmax(W @ z + b))
        out.append(W[f] @ (z - mu) / np.linalg.norm(z - mu) + alpha * np.sum(np.abs(z)))
    return np.array(out)


def ref_vra(train, data, low=60, high=90, below="zero"):
    a, bmax = np.percentile(train["penultimate"].ravel(), [low, high])
    x = data["penultimate"]
    rectified = np.select([x < a, x > bmax], [0.0 if below == "zero" else a, bmax], default=x)
    return energy(rectified @ data["W"].T + data["b"])


def ref_nnguide(train, data, k=100, fraction=0.01):
    stride = round(1 / fraction)
    bank = train["penultimate"][::stride]
    guides = unit(bank) * energy(train["logits"][::stride])[:, None]
    sims = unit(data["penultimate"]) @ guides.T
    k = min(k, len(bank))
    top = -np.sort(-sims, axis=1)[:, :k]
    return energy(data["logits"]) * top.mean(1)


def ref_relation(train, data, power=1.0, threshold=0.03):
    cos = np.maximum(unit(data["penultimate"]) @ unit(train["penultimate"]).T, 0)
    rel = cos * (softmax(data["logits"]) @ softmax(train["logits"]).T)
    return np.sum(np.where(rel > threshold, rel, 0) ** power, axis=1)


def ref_gmm(train, data, components=5, dim=50, stride=1):
    """PCA by SVD, then one scikit-learn mixture per class refitted here; max class log-likelihood."""
    from sklearn.mixture import GaussianMixture

    x = train["penultimate"]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[: min(dim, x.shape[1])].T
    y, labels = ((x - mean) @ basis)[::stride], train["labels"][::stride]
    query = (data["penultimate"] - mean) @ basis
    per_class = [GaussianMixture(min(components, int(np.sum(labels == c))), covariance_type="tied",
                                 random_state=0).fit(y[labels == c]).score_samples(query)
                 for c in np.unique(labels)]
    return np.max(per_class, axis=0)


def ref_gmm_openood(train, data, components=50, dim=50):
    """OpenOOD's gmm: one tied mixture over all train features after PCA, its log density."""
    from sklearn.mixture import GaussianMixture

    x = train["penultimate"]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[: min(dim, x.shape[1])].T
    mixture = GaussianMixture(components, covariance_type="tied", random_state=0).fit((x - mean) @ basis)
    return mixture.score_samples((data["penultimate"] - mean) @ basis)


REFERENCES = {
    "fdbd": ref_fdbd,
    "nci": ref_nci,
    "vra": ref_vra,
    "nnguide": ref_nnguide,
    "relation": ref_relation,
    "gmm": ref_gmm,
}


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_every_new_detector_matches_its_reference(tmp_path, monkeypatch, suffix):
    """...fitted and scored chunk by chunk, then scored again from the cached fitted state."""
    path = make_store(tmp_path / f"s{suffix}")
    biggest = {}
    real = Store.read

    def spy(self, name, rows=None):
        n = self.shape(name)[0] if rows is None else rows.stop - rows.start
        if f"/{BACKBONE}/" in name:
            biggest[name] = max(biggest.get(name, 0), n)
        return real(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    with open_store(path, "r+") as st:
        results = score_store(st, NEW)
    monkeypatch.undo()
    assert {r.method for r in results} == set(NEW) and {r.fit for r in results} == {"fitted"}
    assert biggest and max(biggest.values()) == CHUNK  # never a whole split (300 rows)
    train = arrays(path, "train")
    first = {}
    for split in EVAL:
        data = arrays(path, split)
        with open_store(path) as st:
            for method in NEW:
                got = first[method, split] = st.read(f"scores/{method}/{split}")
                assert got.dtype == np.float32 and got.shape == (SPLITS[split],)
                want = REFERENCES[method](train, data)
                atol = 1e-5 if method == "nnguide" else 1e-6  # faiss searches in float32
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=f"{method} on {split}")
    with open_store(path, "r+") as st:
        assert {r.fit for r in score_store(st, NEW)} == {"cached"}
        for (method, split), values in first.items():
            np.testing.assert_array_equal(st.read(f"scores/{method}/{split}"), values)


VARIANTS = [
    ("fdbd", {"normalizer": "norm"}, lambda t, d: ref_fdbd(t, d, "norm")),
    ("nci", {"alpha": 0.01}, lambda t, d: ref_nci(t, d, 0.01)),
    ("vra", {"low": 10, "high": 95}, lambda t, d: ref_vra(t, d, 10, 95)),
    ("vra", {"low": 10, "below": "clip"}, lambda t, d: ref_vra(t, d, 10, 90, "clip")),  # OpenOOD's rule
    ("nnguide", {"k": 7, "bank_fraction": 0.1}, lambda t, d: ref_nnguide(t, d, 7, 0.1)),
    ("nnguide", {"bank_fraction": 0.25}, lambda t, d: ref_nnguide(t, d, 100, 0.25)),
    ("relation", {"pow": 2.0, "threshold": 0.1}, lambda t, d: ref_relation(t, d, 2.0, 0.1)),
    ("gmm", {"components": 3, "dim": 8}, lambda t, d: ref_gmm(t, d, 3, 8)),
    ("gmm", {"components": 10, "dim": 8, "class_conditional": False}, lambda t, d: ref_gmm_openood(t, d, 10, 8)),
]


@pytest.mark.parametrize("method,hparams,reference", VARIANTS,
                         ids=[f"{v[0]}-{'-'.join(map(str, v[1].values()))}" for v in VARIANTS])
def test_hyperparameters_change_the_formula_as_written(store, tmp_path, method, hparams, reference):
    got = scored(store, method, hparams, split="ood/far/b")
    want = reference(arrays(store, "train"), arrays(store, "ood/far/b"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 if method == "nnguide" else 1e-6)


def test_gmm_density_is_the_normalised_mixture_of_its_fitted_state(store):
    """The stored state scored with scipy's Gaussian density: the score code is the formula."""
    got = scored(store, "gmm", {"dim": 8})
    with open_store(store) as st:
        state = {k: st.read(f"fitted/gmm/{k}") for k in st.children("fitted/gmm")}
    y = (arrays(store, "test")["penultimate"] - state["mean"]) @ state["basis"]
    per_class = []
    for c, chol in enumerate(state["precision_cholesky"]):
        covariance = np.linalg.inv(chol @ chol.T)
        comps = np.flatnonzero(state["component_class"] == c)
        dens = [np.log(state["weights"][k]) + multivariate_normal(state["means"][k], covariance).logpdf(y)
                for k in comps]
        per_class.append(logsumexp(dens, axis=0))
    np.testing.assert_allclose(got, np.max(per_class, axis=0), rtol=1e-5, atol=1e-6)
    assert state["basis"].shape == (24, 8) and np.allclose(state["basis"].T @ state["basis"], np.eye(8))
    assert len(state["classes"]) == 4 and np.isclose(state["weights"].sum(), 4.0)


def test_gmm_subsamples_rows_above_its_cap(tmp_path, monkeypatch):
    import oodcli.scorers.gmm as gmm

    monkeypatch.setattr(gmm, "MAX_VALUES", 2000)  # 300 rows x 24 dims -> every 4th row
    path = make_store(tmp_path / "s.zarr")
    got = scored(path, "gmm", {"components": 2})
    with open_store(path) as st:
        assert st.node_attrs("fitted/gmm")["scalars"]["row_stride"] == 4
    np.testing.assert_allclose(got, ref_gmm(arrays(path, "train"), arrays(path, "test"), 2, 50, stride=4),
                               rtol=1e-5, atol=1e-6)


def test_nnguide_keeps_its_bank_and_caps_k(store):
    scored(store, "nnguide", {"bank_fraction": 0.1})
    with open_store(store) as st:
        node = "fitted/nnguide"
        assert st.shape(f"{node}/bank") == (30, 24)  # every 10th of 300 train rows
        scalars = st.node_attrs(node)["scalars"]
    assert scalars == {"row_stride": 10, "k_used": 30}


def test_registry_lists_published_defaults():
    params = {r["method"]: r["params"] for r in describe_scorers()}
    assert params["fdbd"] == {"normalizer": "mean"}  # distance to the train mean (paper, OpenOOD)
    assert params["nnguide"] == {"k": 100, "bank_fraction": 0.01}  # OpenOOD's K and alpha
    assert params["nci"] == {"alpha": 1e-4}  # OpenOOD's nci.yml
    assert params["relation"] == {"pow": 1.0, "threshold": 0.03}  # OpenOOD / the authors' code
    assert params["vra"] == {"low": 60.0, "high": 90.0, "below": "zero"}  # the paper's CIFAR-10 VRA
    assert params["gmm"] == {"components": 5, "dim": 50, "seed": 0, "class_conditional": True}  # OpenOOD's PCA-50, 50 clusters / 10 classes
    summaries = {r["method"]: r["summary"] for r in describe_scorers()}
    for method, cite in [("fdbd", "Liu & Qin, 2024"), ("nnguide", "Park et al., 2023"), ("nci", "Liu & Qin, 2025"),
                         ("relation", "Kim et al., 2023"), ("vra", "Xu et al., 2023"), ("gmm", "OpenOOD")]:
        assert cite in summaries[method]


# ---- the command line ------------------------------------------------------------------------


def test_cli_scores_each_detector_and_all_includes_them(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr")
    train, test = arrays(path, "train"), arrays(path, "test")
    for method in NEW:
        code, out, err = run(capsys, "-q", "score", method, "--store", path, "--json")
        assert code == 0, err
        assert {(r["method"], r["split"], r["fit"]) for r in json.loads(out)} == {(method, s, "fitted") for s in EVAL}
        with open_store(path) as st:
            got = st.read(f"scores/{method}/test")
            assert st.node_attrs(f"scores/{method}/test")["method"] == method
        np.testing.assert_allclose(got, REFERENCES[method](train, test), rtol=1e-5, atol=1e-5, err_msg=method)
    code, out, err = run(capsys, "-q", "score", "all", "--store", path, "--json")
    assert code == 0, err
    rows = [r for r in json.loads(out) if r["method"] in NEW]
    assert {(r["method"], r["status"], r["fit"]) for r in rows} == {(m, "written", "cached") for m in NEW}
    code, out, _ = run(capsys, "score", "--list")
    assert code == 0 and all(m in out for m in NEW)


BAD = [
    ("fdbd", "fdbd.normalizer=origin", "normalizer must be one of mean, norm"),
    ("nci", "nci.alpha=-1", "alpha must be"),
    ("vra", "vra.low=95", "need 0 <= low < high <= 100"),
    ("vra", "vra.below=drop", "below must be one of zero, clip"),
    ("nnguide", "nnguide.k=0", "k must be >= 1"),
    ("nnguide", "nnguide.bank_fraction=0", "bank_fraction must be in (0, 1]"),
    ("relation", "relation.pow=0", "pow must be > 0"),
    ("relation", "relation.threshold=1.5", "threshold must be in [0, 1)"),
    ("gmm", "gmm.components=0", "components must be >= 1"),
    ("gmm", "gmm.dim=abc", "gmm.dim='abc': expects an integer"),
]


@pytest.mark.parametrize("method,param,message", BAD, ids=[b[1] for b in BAD])
def test_bad_parameter_values_give_one_line(capsys, store, method, param, message):
    code, _, err = run(capsys, "score", method, "--store", store, "-p", param)
    assert code == 2 and one_line_error(err), err
    assert message in err


def test_a_single_class_head_is_refused_by_fdbd(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with open_store(path, "r+") as st:
        st.write_array(f"backbones/{BACKBONE}/head/weight", st.read(f"backbones/{BACKBONE}/head/weight")[:1])
        st.write_array(f"backbones/{BACKBONE}/head/bias", st.read(f"backbones/{BACKBONE}/head/bias")[:1])
    code, _, err = run(capsys, "score", "fdbd", "--store", path)
    assert code == 1 and one_line_error(err) and "at least 2 classes" in err
