"""SSD, the Mahalanobis ensemble, RankFeat, NECO, CARef, CADRef and CF-OOD against references
written from their formulas (and the authors' code) in plain numpy / scikit-learn, their
published defaults, streaming, the fitted-state cache and one-line errors."""

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import one_line_error, run
from oodcli.scorers import describe_scorers
from oodcli.scorers.rankfeat import rank_one
from oodcli.scoring import score_store
from oodcli.store import Store, open_store
from test_scorers import BACKBONE, CHUNK, CLASSES, DIM, arrays, write_split

NEW = ["ssd", "mds-ensemble", "rankfeat", "neco", "caref", "cadref", "cfood"]
SPLITS = {"train": 300, "val": 60, "test": 120, "ood/val/v": 50, "ood/near/a": 100, "ood/far/b": 90}
EVAL = ("test", "ood/near/a", "ood/far/b")
EARLY, C, H = 10, DIM, 3  # early-layer width; featmap channels (what the head reads) and side


def make_store(path, seed=0, splits=SPLITS, featmap=True):
    """Positive features with class structure: penultimate, an early vector layer, a [N, C, H, H]
    feature map, logits of the head; OOD rows shifted."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.5, (CLASSES, DIM)).astype(np.float32)
    bias = rng.normal(0, 0.5, CLASSES).astype(np.float32)
    centres, early_centres = rng.normal(0, 0.6, (CLASSES, DIM)), rng.normal(0, 0.6, (CLASSES, EARLY))
    with open_store(path, "a") as st:
        for split, n in splits.items():
            ood = split.startswith("ood")
            labels = np.full(n, -1) if ood else rng.integers(0, CLASSES, n)
            shift, keep = (0.7, 0.0) if ood else (0.0, 1.0)
            x = np.exp(centres[np.maximum(labels, 0)] * keep + rng.normal(shift, 0.5, (n, DIM))).astype(np.float32)
            layers = {"penultimate": x, "logits": x @ weight.T + bias,
                      "early": np.exp(early_centres[np.maximum(labels, 0)] * keep
                                      + rng.normal(shift, 0.4, (n, EARLY))).astype(np.float32)}
            if featmap:
                layers["featmap"] = np.exp(rng.normal(shift, 0.5, (n, C, H, H))
                                           + keep * rng.normal(0, 0.3, (1, C, 1, 1))).astype(np.float32)
            role = "ood-val" if "/val/" in split else "ood-near" if "near" in split else "ood-far" if ood else "id"
            write_split(st, split, labels, layers, role=role)
        st.write_array(f"backbones/{BACKBONE}/head/weight", weight)
        st.write_array(f"backbones/{BACKBONE}/head/bias", bias)
        st.set_attrs(f"backbones/{BACKBONE}", model_id="model-1")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("new_a") / "s.zarr")


def scored(path, method, hparams=None, split="test"):
    with open_store(path, "r+") as st:
        score_store(st, [method], hparams={method: hparams or {}})
        return st.read(f"scores/{method}/{split}")


def unit(v):
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-10)


def neg_min_maha(train_x, groups, x):
    """-min over groups of (x - mu)' pinv(cov_g) (x - mu), each group with its own covariance."""
    d = []
    for g in np.unique(groups):
        rows = train_x[groups == g]
        mu = rows.mean(0)
        inv = np.linalg.pinv(np.cov(rows.T, bias=True))
        d.append(np.einsum("nd,de,ne->n", x - mu, inv, x - mu))
    return -np.min(d, axis=0)


# ---- references ----------------------------------------------------------------------------


def ref_ssd(train, data):
    """The authors' eval_ssd.py with one cluster: normalise, standardise, Mahalanobis."""
    f, q = unit(train["penultimate"]), unit(data["penultimate"])
    m, s = f.mean(0), f.std(0)
    f, q = (f - m) / (s + 1e-10), (q - m) / (s + 1e-10)
    return neg_min_maha(f, np.zeros(len(f)), q)


def shared_conf(train_x, labels, x):
    """Lee et al.'s M(x) = -min_c (x - mu_c)' S^-1 (x - mu_c), S shared by the classes."""
    classes = np.unique(labels)
    means = np.stack([train_x[labels == c].mean(0) for c in classes])
    centred = train_x - means[np.searchsorted(classes, labels)]
    inv = np.linalg.pinv(centred.T @ centred / len(centred))
    return -np.stack([np.einsum("nd,de,ne->n", x - mu, inv, x - mu) for mu in means], 1).min(1)


def layer_confs(train, data, layers):
    return np.stack([shared_conf(pool(train[n]), train["labels"], pool(data[n])) for n in layers], 1)


def pool(x):
    return x.mean(axis=(2, 3)) if x.ndim == 4 else x


def ref_mds_equal(train, data, layers=("penultimate", "early")):
    return layer_confs(train, data, layers).sum(1)


def ref_rankfeat(train, data):
    f = data["featmap"].reshape(len(data["featmap"]), C, -1)
    out = []
    for m in f:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        out.append((m - s[0] * np.outer(u[:, 0], vt[0])).mean(1))
    return logsumexp(np.array(out) @ data["W"].T + data["b"], axis=1)


def ref_neco(train, data, dim=12):
    """The authors' test_all_ood.py for a ResNet: StandardScaler, full PCA, ||first d|| / ||all||."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    ss = StandardScaler().fit(train["penultimate"])
    pca = PCA(train["penultimate"].shape[1]).fit(ss.transform(train["penultimate"]))
    z = ss.transform(data["penultimate"])
    return np.linalg.norm(pca.transform(z)[:, :dim], axis=1) / np.linalg.norm(z, axis=1)


def class_means_by_prediction(train):
    x = train["penultimate"]
    pred = (x @ train["W"].T + train["b"]).argmax(1)
    return np.stack([x[pred == c].mean(0) for c in range(CLASSES)])


def ref_caref(train, data):
    means = class_means_by_prediction(train)
    out = []
    for z in data["penultimate"]:
        f = int(np.argmax(data["W"] @ z + data["b"]))
        out.append(-np.sum(np.abs(means[f] - z)) / np.sum(np.abs(z)))
    return np.array(out)


def ref_cadref(train, data):
    means = class_means_by_prediction(train)
    mean_energy = logsumexp(train["penultimate"] @ train["W"].T + train["b"], axis=1).mean()
    out = []
    for z in data["penultimate"]:
        logits = data["W"] @ z + data["b"]
        f = int(np.argmax(logits))
        d = (z - means[f]) * np.sign(data["W"][f])
        pos, neg = np.sum(d[d > 0]) / np.sum(np.abs(z)), -np.sum(d[d < 0]) / np.sum(np.abs(z))
        out.append(-(pos / logsumexp(logits) + neg / mean_energy))
    return np.array(out)


def ref_cfood(train, data, rho=0.01, fraction=0.1, seed=0):
    """OpenOOD's CFOODPostprocessor loop, with the reference rows drawn as oodcli draws them."""
    rows = len(train["penultimate"])
    n = int(fraction * rows)
    ref = unit(train["penultimate"][np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))])
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = np.stack([np.sort(np.sum((r - ref) ** 2, 1))[kpos + 1] for r in ref])
    out = []
    for v in unit(data["penultimate"]):
        dst = np.sum((v - ref) ** 2, 1)
        count = (knndst >= dst[:, None]).sum(0) / n
        pos = np.flatnonzero(count >= rho)
        out.append(-(kval[pos[0]] if len(pos) else 1.0))
    return np.array(out)


REFERENCES = {"ssd": ref_ssd, "rankfeat": ref_rankfeat, "neco": ref_neco, "caref": ref_caref, "cadref": ref_cadref,
              "cfood": ref_cfood}


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_every_new_detector_matches_its_reference(tmp_path, monkeypatch, suffix):
    """...fitted and scored chunk by chunk (no read above one chunk), then again from the cache."""
    path = make_store(tmp_path / f"s{suffix}")
    methods = list(REFERENCES)
    hparams = {"neco": {"dim": 12}}
    biggest = {}
    real = Store.read

    def spy(self, name, rows=None):
        n = self.shape(name)[0] if rows is None else rows.stop - rows.start
        if f"/{BACKBONE}/" in name:
            biggest[name] = max(biggest.get(name, 0), n)
        return real(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    with open_store(path, "r+") as st:
        results = score_store(st, methods, hparams=hparams)
    monkeypatch.undo()
    assert {r.method for r in results} == set(methods)
    assert {r.fit for r in results if r.method != "rankfeat"} == {"fitted"}
    assert biggest and max(biggest.values()) == CHUNK  # never a whole split (300 rows)
    train, first = arrays(path, "train"), {}
    for split in EVAL:
        data = arrays(path, split)
        with open_store(path) as st:
            for method in methods:
                got = first[method, split] = st.read(f"scores/{method}/{split}")
                assert got.dtype == np.float32 and got.shape == (SPLITS[split],)
                want = REFERENCES[method](train, data, **hparams.get(method, {}))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{method} on {split}")
    with open_store(path, "r+") as st:
        assert {r.fit for r in score_store(st, methods, hparams=hparams) if r.method != "rankfeat"} == {"cached"}
        for (method, split), values in first.items():
            np.testing.assert_array_equal(st.read(f"scores/{method}/{split}"), values)


def test_cfood_reference_set_is_held_by_position_not_copied(store):
    scored(store, "cfood")
    with open_store(store) as st:
        assert st.shape("fitted/cfood/rows") == (30,)  # 10% of 300 train rows
        assert not st.exists("fitted/cfood/reference")
        assert st.shape("fitted/cfood/knn")[0] == 30


# ---- the Mahalanobis ensemble ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn announcing later defaults
def test_mds_ensemble_weights_by_logistic_regression_on_the_validation_splits(store):
    from sklearn.linear_model import LogisticRegressionCV

    got = scored(store, "mds-ensemble", split="ood/far/b")
    train = arrays(store, "train")
    # auto layers: every vector layer, featmap left out beside penultimate; store order
    layers = ("early", "penultimate")
    with open_store(store) as st:
        hp = st.node_attrs("scores/mds-ensemble/ood/far/b")["hparams"]
        alpha = st.read("fitted/mds-ensemble/alpha")
    assert hp == {"layers": "early,penultimate", "weights": "logistic"}
    m_in, m_out = layer_confs(train, arrays(store, "val"), layers), layer_confs(train, arrays(store, "ood/val/v"), layers)
    lr = LogisticRegressionCV().fit(np.concatenate([m_in, m_out]), np.r_[np.ones(len(m_in)), np.zeros(len(m_out))])
    np.testing.assert_allclose(alpha, lr.coef_.ravel(), rtol=1e-6)
    want = layer_confs(train, arrays(store, "ood/far/b"), layers) @ lr.coef_.ravel()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mds_ensemble_without_validation_splits_weighs_layers_equally(tmp_path):
    path = make_store(tmp_path / "s.zarr", splits={k: v for k, v in SPLITS.items() if "val" not in k})
    got = scored(path, "mds-ensemble")
    np.testing.assert_allclose(got, ref_mds_equal(arrays(path, "train"), arrays(path, "test")), rtol=1e-5, atol=1e-5)
    with open_store(path) as st:
        assert st.node_attrs("scores/mds-ensemble/test")["hparams"]["weights"] == "equal"
    # a named map layer is average-pooled over H x W
    got = scored(path, "mds-ensemble", {"layers": "featmap,early"})
    want = ref_mds_equal(arrays(path, "train"), arrays(path, "test"), ("featmap", "early"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mds_ensemble_asked_for_logistic_weights_without_validation_is_one_line(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr", splits={k: v for k, v in SPLITS.items() if "val" not in k})
    code, _, err = run(capsys, "score", "mds-ensemble", "--store", path, "-p", "mds-ensemble.weights=logistic")
    assert code == 1 and one_line_error(err) and "ood/val" in err, err


# ---- SSD with several clusters, RankFeat's power iteration --------------------------------------


def test_ssd_clusters_score_against_each_clusters_own_gaussian(store):
    got = scored(store, "ssd", {"clusters": 3})
    with open_store(store) as st:
        state = {k: st.read(f"fitted/ssd/{k}") for k in st.children("fitted/ssd")}
    assert state["means"].shape == (3, DIM) and state["precisions"].shape == (3, DIM, DIM)
    train, test = arrays(store, "train"), arrays(store, "test")
    z = (unit(train["penultimate"]) - state["mean"]) / (state["std"] + 1e-10)
    q = (unit(test["penultimate"]) - state["mean"]) / (state["std"] + 1e-10)
    # every train row went to its nearest of the fitted means (k-means' centroids), each with its own covariance
    groups = np.argmin(((z[:, None, :] - state["means"][None]) ** 2).sum(2), axis=1)
    assert len(np.unique(groups)) == 3
    np.testing.assert_allclose(state["means"], np.stack([z[groups == g].mean(0) for g in range(3)]), atol=1e-3)
    np.testing.assert_allclose(got, neg_min_maha(z, groups, q), rtol=1e-4, atol=1e-4)


def test_power_iteration_finds_the_svd_rank_one_part():
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(16, 12, 9))) + 0.1  # non-negative, as post-ReLU maps
    exact = np.stack([s[0] * np.outer(u[:, 0], vt[0]) for u, s, vt in (np.linalg.svd(m) for m in x)])
    np.testing.assert_allclose(rank_one(x, 20), exact, atol=1e-8)
    np.testing.assert_allclose(rank_one(x, 0), exact, atol=1e-10)
    # what remains has no component left along the leading singular direction
    rest = x - rank_one(x, 20)
    assert np.all(np.linalg.svd(rest, compute_uv=False)[:, 0] < np.linalg.svd(x, compute_uv=False)[:, 0] - 1e-6)


def test_rankfeat_without_a_featmap_is_one_line(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr", featmap=False)
    code, _, err = run(capsys, "score", "rankfeat", "--store", path)
    assert code == 1 and one_line_error(err) and "featmap" in err, err


# ---- defaults, listing, bad values ------------------------------------------------------------


def test_registry_lists_published_defaults():
    params = {r["method"]: r["params"] for r in describe_scorers()}
    assert params["ssd"] == {"clusters": 1, "seed": 0}  # the authors' eval_ssd.py --clusters 1
    assert params["mds-ensemble"] == {"layers": "auto", "weights": "auto"}
    assert params["rankfeat"] == {"iterations": 20, "temperature": 1.0}  # the paper's 20 power iterations, T = 1
    assert params["neco"] == {"dim": None, "maxlogit": False}  # d = 100 (authors' script) on > 100-d features
    assert params["caref"] == {}
    assert params["cadref"] == {"logit": "energy"}  # the authors' --logit_method default
    assert params["cfood"] == {"rho": 0.01, "fraction": 0.1, "seed": 0}  # OpenOOD's cfood.yml k and alpha
    from oodcli.scorers.neco import default_dim

    assert default_dim(512) == 100 and default_dim(2048) == 100 and default_dim(64) == 32
    summaries = {r["method"]: r["summary"] for r in describe_scorers()}
    for method, cite in [("ssd", "Sehwag et al., 2021"), ("mds-ensemble", "Lee et al., 2018"),
                         ("rankfeat", "Song et al., 2022"), ("neco", "Ben Ammar et al., 2024"),
                         ("caref", "Ling et al., 2025"), ("cadref", "Ling et al., 2025"), ("cfood", "Angiulli")]:
        assert cite in summaries[method]


def test_cli_lists_and_scores_them_all(capsys, store):
    code, out, _ = run(capsys, "score", "--list")
    assert code == 0 and all(m in out for m in NEW)
    code, out, err = run(capsys, "-q", "score", ",".join(NEW), "--store", store, "--json")
    assert code == 0, err
    assert {r["method"] for r in json.loads(out)} == set(NEW)


BAD = [
    ("ssd", "ssd.clusters=0", "clusters must be >= 1"),
    ("mds-ensemble", "mds-ensemble.weights=best", "weights must be one of auto, logistic, equal"),
    ("rankfeat", "rankfeat.iterations=-1", "iterations must be >= 0"),
    ("neco", "neco.dim=24", "must be below the feature size (24)"),
    ("cadref", "cadref.logit=odin", "logit must be one of energy, msp, maxlogit, gen"),
    ("cfood", "cfood.rho=0", "rho must be in (0, 1]"),
    ("cfood", "cfood.fraction=0.001", "it needs 2 reference points at least"),
]


@pytest.mark.parametrize("method,param,message", BAD, ids=[b[1] for b in BAD])
def test_bad_parameter_values_give_one_line(capsys, store, method, param, message):
    code, _, err = run(capsys, "score", method, "--store", store, "-p", param)
    assert code == 2 and one_line_error(err), err
    assert message in err


def test_cfood_other_rho_and_fraction_follow_the_authors_loop(store):
    got = scored(store, "cfood", {"rho": 0.2, "fraction": 0.5}, split="ood/near/a")
    want = ref_cfood(arrays(store, "train"), arrays(store, "ood/near/a"), rho=0.2, fraction=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # scores are stored as float32
