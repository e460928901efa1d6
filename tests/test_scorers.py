"""Every scorer against a straightforward reference written from its formula, the
fitted-state cache, streaming, and bad input through the CLI."""

import json
import re

import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import one_line_error, run
from oodcli.scorers import describe_scorers, scorer_names
from oodcli.scorers.knn import default_k
from oodcli.scorers.vim import default_dim
from oodcli.scoring import score_store
from oodcli.store import Store, open_store

BACKBONE = "m"
SPLITS = {"train": 300, "test": 120, "ood/near/a": 100, "ood/far/b": 90}
DIM, CLASSES, CHUNK = 24, 4, 32
ALL = ["ash-b", "ash-p", "ash-s", "energy", "gen", "knn", "mahalanobis", "maxlogit", "msp", "react", "residual",
       "rmds", "vim"]


def make_store(path, seed=0, splits=SPLITS, logits=True, head=True, train_classes=CLASSES):
    """A store written through the store API: positive float32 features (no ties), logits
    from a float32 head, several chunks per split, the attrs that extract would write."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.5, (CLASSES, DIM)).astype(np.float32)
    bias = rng.normal(0, 0.5, CLASSES).astype(np.float32)
    centres = rng.normal(0, 0.6, (CLASSES, DIM))
    with open_store(path, "a") as st:
        for split, n in splits.items():
            ood = split.startswith("ood")
            labels = np.full(n, -1) if ood else rng.integers(0, train_classes, n)
            shift = 0.7 if ood else 0.0
            x = np.exp(centres[np.maximum(labels, 0)] * (not ood) + rng.normal(shift, 0.5, (n, DIM)))
            x = x.astype(np.float32)
            write_split(st, split, labels, {"penultimate": x, **({"logits": x @ weight.T + bias} if logits else {})},
                        role="ood-near" if "near" in split else "ood-far" if ood else "id")
        if head:
            st.write_array(f"backbones/{BACKBONE}/head/weight", weight)
            st.write_array(f"backbones/{BACKBONE}/head/bias", bias)
            st.set_attrs(f"backbones/{BACKBONE}", model_id="model-1")
    return path


def write_split(st: Store, split, labels, layers, role="id", model_id="model-1", fingerprint=True):
    node = f"splits/{split}"
    st.write_array(f"{node}/labels", np.asarray(labels, np.int64))
    st.write_array(f"{node}/ids", np.arange(len(labels), dtype=np.int64))
    st.set_attrs(node, role=role, n=len(labels))
    for layer, values in layers.items():
        st.create_array(f"{node}/{BACKBONE}/{layer}", values.shape, values.dtype, chunk_rows=CHUNK)
        if len(values):
            st.write_rows(f"{node}/{BACKBONE}/{layer}", 0, values)
    attrs = {"complete": True, "rows_done": len(labels), "model_id": model_id,
             "parts": {"weights": model_id, "preprocess": "none"}}
    if fingerprint:
        attrs["fingerprint"] = f"fp-{split}-{model_id}"
    st.set_attrs(f"{node}/{BACKBONE}", **attrs)


def arrays(path, split):
    with open_store(path) as st:
        node = f"splits/{split}"
        out = {k: st.read(f"{node}/{BACKBONE}/{k}").astype(np.float64) for k in st.children(f"{node}/{BACKBONE}")}
        out["labels"] = st.read(f"{node}/labels")
        out["W"] = st.read(f"backbones/{BACKBONE}/head/weight").astype(np.float64)
        out["b"] = st.read(f"backbones/{BACKBONE}/head/bias").astype(np.float64)
    return out


# ---- references, written from the papers' formulas ----------------------------------------


def energy(logits):
    return logsumexp(logits, axis=1)


def ref_gen(logits, gamma=0.1, m=100):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, :m]
    return -np.sum(top**gamma * (1 - top) ** gamma, axis=1)


def gaussian(x):
    mean = x.mean(0)
    return mean, (x - mean).T @ (x - mean) / len(x)


def ref_mahalanobis(train, x, relative=False):
    classes = np.unique(train["labels"])
    means = np.stack([train["penultimate"][train["labels"] == c].mean(0) for c in classes])
    centred = train["penultimate"] - means[np.searchsorted(classes, train["labels"])]
    inv = np.linalg.inv(centred.T @ centred / len(centred))
    d = np.stack([np.einsum("nd,de,ne->n", x - mu, inv, x - mu) for mu in means], axis=1).min(1)
    if relative:
        mu0, cov0 = gaussian(train["penultimate"])
        d = d - np.einsum("nd,de,ne->n", x - mu0, np.linalg.inv(cov0), x - mu0)
    return -d


def ref_knn(train, x, k):
    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    dist = np.linalg.norm(unit(x)[:, None, :] - unit(train)[None, :, :], axis=2)
    return -np.sort(dist, axis=1)[:, k - 1]


def ref_vim(train, x, W, b, dim, alpha_only=False):
    u = -np.linalg.lstsq(W, b, rcond=None)[0]  # minimum-norm solution of W u = -b, i.e. -pinv(W) b
    _, _, vt = np.linalg.svd(train - u, full_matrices=False)
    principal = vt[:dim]

    def residual(v):
        c = v - u
        return np.linalg.norm(c - c @ principal.T @ principal, axis=1)

    alpha = (train @ W.T + b).max(1).sum() / residual(train).sum()
    return energy(x @ W.T + b) - alpha * residual(x), -residual(x)


def ref_ash(x, W, b, variant, p=90):
    d = x.shape[1]
    k = d - int(round(d * p / 100))
    threshold = np.sort(x, axis=1)[:, d - k][:, None]  # the k-th largest of each row
    keep = x >= threshold
    pruned = x * keep
    if variant == "s":
        pruned = pruned * np.exp(x.sum(1) / pruned.sum(1))[:, None]
    elif variant == "b":
        pruned = keep * (x.sum(1) / k)[:, None]
    return energy(pruned @ W.T + b)


def reference(method, train, split):
    x, logits, W, b = split["penultimate"], split["logits"], split["W"], split["b"]
    if method == "msp":
        return np.exp(logits.max(1) - energy(logits))
    if method == "maxlogit":
        return logits.max(1)
    if method == "energy":
        return energy(logits)
    if method == "gen":
        return ref_gen(logits)
    if method in ("mahalanobis", "rmds"):
        return ref_mahalanobis(train, x, relative=method == "rmds")
    if method == "knn":
        return ref_knn(train["penultimate"], x, default_k(len(train["penultimate"])))
    if method in ("vim", "residual"):
        vim, res = ref_vim(train["penultimate"], x, W, b, DIM // 2)
        return vim if method == "vim" else res
    if method == "react":
        return energy(np.minimum(x, np.percentile(train["penultimate"].ravel(), 90)) @ W.T + b)
    return ref_ash(x, W, b, method[-1])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_every_scorer_matches_its_reference(tmp_path, suffix):
    path = make_store(tmp_path / f"s{suffix}")
    with open_store(path, "r+") as st:
        results = score_store(st, ALL)
    assert {r.method for r in results} == set(ALL) and set(ALL) <= set(scorer_names())
    train = arrays(path, "train")
    for split in ("test", "ood/near/a", "ood/far/b"):
        data = arrays(path, split)
        with open_store(path) as st:
            for method in ALL:
                got = st.read(f"scores/{method}/{split}")
                assert got.dtype == np.float32 and got.shape == (SPLITS[split],)
                want = reference(method, train, data)
                atol = 1e-5 if method == "knn" else 1e-6  # faiss searches in float32
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=f"{method} on {split}")


def test_scores_separate_this_synthetic_ood(tmp_path):
    """A sanity check on the test data: shifted OOD really is scored lower on average."""
    path = make_store(tmp_path / "s.zarr")
    with open_store(path, "r+") as st:
        score_store(st, ["mahalanobis", "knn"])
        for method in ("mahalanobis", "knn"):
            assert st.read(f"scores/{method}/test").mean() > st.read(f"scores/{method}/ood/far/b").mean()


def test_registry_lists_published_defaults():
    params = {r["method"]: r["params"] for r in describe_scorers()}
    assert params["gen"] == {"gamma": 0.1, "top_m": 100}
    assert params["energy"] == {"temperature": 1.0}
    assert params["react"] == {"percentile": 90.0}
    assert params["ash-s"] == params["ash-b"] == params["ash-p"] == {"percentile": 90.0, "layer": "penultimate"}
    assert params["scale"] == {"percentile": 85.0, "layer": "penultimate"}
    assert params["odin"] == params["mahalanobis-perturbed"] == {}  # their settings are fixed at extraction
    assert params["gram"] == {"powers": 10, "confidence": "msp"}
    assert params["knn"] == {"k": None} and params["vim"] == params["residual"] == {"dim": None}
    assert params["msp"] == params["mahalanobis"] == params["rmds"] == {}


def test_default_k_and_principal_dim_follow_the_papers():
    assert default_k(50_000) == 50 and default_k(1_281_167) == 1000 and default_k(30) == 30
    assert default_dim(2048) == 1000 and default_dim(768) == 512 and default_dim(512) == 256 and default_dim(128) == 64


def _results(path, methods, **kw):
    with open_store(path, "r+") as st:
        return {r.method: r.fit for r in score_store(st, methods, **kw)}


FITTED = ["knn", "mahalanobis", "react", "residual", "rmds", "vim"]


def test_fitted_state_is_cached_and_refit_when_inputs_change(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    assert _results(path, FITTED + ["msp"]) == {**{m: "fitted" for m in FITTED}, "msp": "-"}
    with open_store(path) as st:
        first = {m: st.read(f"scores/{m}/test") for m in FITTED}
        attrs = st.node_attrs("fitted/mahalanobis")
        assert attrs["complete"] and attrs["backbone"] == BACKBONE and attrs["model_id"] == "model-1"
        assert attrs["hparams"] == {} and attrs["train_fingerprint"].startswith("fp-train-model-1")
        assert st.shape("fitted/mahalanobis/precision") == (DIM, DIM)
        assert st.node_attrs("fitted/vim")["scalars"]["alpha"] > 0
        assert st.node_attrs("fitted/knn")["scalars"]["k_used"] == 50
    assert _results(path, FITTED) == {m: "cached" for m in FITTED}
    with open_store(path) as st:
        for m in FITTED:
            np.testing.assert_array_equal(st.read(f"scores/{m}/test"), first[m])
    # other hyperparameters refit that method only
    got = _results(path, FITTED, hparams={"vim": {"dim": 6}, "knn": {"k": 7}})
    assert got == {**{m: "cached" for m in FITTED}, "vim": "fitted", "knn": "fitted"}
    with open_store(path) as st:
        assert st.node_attrs("fitted/vim")["hparams"] == {"dim": 6}
        assert st.node_attrs("scores/vim/test")["hparams"] == {"dim": 6}
    # new train features (another fingerprint) refit everything
    with open_store(path, "r+") as st:
        st.set_attrs(f"splits/train/{BACKBONE}", fingerprint="fp-new")
    assert _results(path, FITTED) == {m: "fitted" for m in FITTED}


def test_train_without_fingerprint_is_identified_by_content(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    with open_store(path, "r+") as st:
        st.set_attrs(f"splits/train/{BACKBONE}", fingerprint=None)
    assert _results(path, ["mahalanobis"]) == {"mahalanobis": "fitted"}
    assert _results(path, ["mahalanobis"]) == {"mahalanobis": "cached"}
    with open_store(path, "r+") as st:
        st.write_rows(f"splits/train/{BACKBONE}/penultimate", 5, np.full((1, DIM), 2.0, np.float32))
    assert _results(path, ["mahalanobis"]) == {"mahalanobis": "fitted"}


def test_fitting_and_scoring_read_chunk_by_chunk(tmp_path, monkeypatch):
    path = make_store(tmp_path / "s.zarr")
    biggest = {}
    real = Store.read

    def spy(self, name, rows=None):
        n = self.shape(name)[0] if rows is None else rows.stop - rows.start
        if f"/{BACKBONE}/" in name:
            biggest[name] = max(biggest.get(name, 0), n)
        return real(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    _results(path, ALL)
    assert biggest and max(biggest.values()) == CHUNK  # never a whole split (300 rows)


def test_react_subsamples_rows_above_its_cap(tmp_path, monkeypatch):
    import oodcli.scorers.react as react

    monkeypatch.setattr(react, "MAX_VALUES", 1000)  # 300 x 24 values -> every 8th row
    path = make_store(tmp_path / "s.zarr")
    _results(path, ["react"])
    train = arrays(path, "train")["penultimate"]
    with open_store(path) as st:
        scalars = st.node_attrs("fitted/react")["scalars"]
    assert scalars["row_stride"] == 8
    assert scalars["threshold"] == pytest.approx(np.percentile(train[::8].ravel(), 90), rel=1e-6)


def test_gen_uses_only_the_top_m_classes(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with open_store(path, "r+") as st:
        score_store(st, ["gen"], hparams={"gen": {"top_m": 2, "gamma": 0.5}})
        got = st.read("scores/gen/test")
    logits = arrays(path, "test")["logits"]
    np.testing.assert_allclose(got, ref_gen(logits, 0.5, 2), rtol=1e-5)


# ---- the command line ------------------------------------------------------------------------


def test_cli_reports_fitted_then_cached(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr")
    code, out, _ = run(capsys, "-q", "score", "vim,msp", "--store", path, "--json", "-p", "vim.dim=8")
    assert code == 0
    assert {(r["method"], r["fit"]) for r in json.loads(out)} == {("vim", "fitted"), ("msp", "-")}
    code, out, _ = run(capsys, "-q", "score", "vim,msp", "--store", path, "-p", "vim.dim=8")
    assert code == 0 and re.search(r"vim\s*│ cached", out) and "│ fitted" not in out
    with open_store(path) as st:
        assert st.node_attrs("fitted/vim")["scalars"]["dim_used"] == 8


def test_cli_lists_methods_with_their_parameters(capsys):
    code, out, _ = run(capsys, "score", "--list")
    assert code == 0
    for text in ("gamma=0.1", "top_m=100", "percentile=90.0", "k=None", "dim=None", "ash-s", "rmds"):
        assert text in out
    code, out, _ = run(capsys, "score", "--list", "--json")
    assert set(ALL) <= {r["method"] for r in json.loads(out)}
    code, out, _ = run(capsys, "score", "--help")
    assert code == 0 and "--list" in out


def _no_logits(path):
    return make_store(path, logits=False)


def _other_model(path):
    make_store(path)
    with open_store(path, "r+") as st:
        st.set_attrs(f"splits/ood/far/b/{BACKBONE}", model_id="model-2", parts={"weights": "other", "preprocess": "none"})
    return path


def _head_of_other_weights(path):
    make_store(path)
    with open_store(path, "r+") as st:
        st.set_attrs(f"backbones/{BACKBONE}", model_id="model-2")
    return path


def _nan_in(split, row=40):
    def build(path):
        make_store(path)
        with open_store(path, "r+") as st:
            st.write_rows(f"splits/{split}/{BACKBONE}/penultimate", row, np.full((1, DIM), np.nan, np.float32))
        return path

    return build


def _empty_train(path):
    return make_store(path, splits={**SPLITS, "train": 0})


def _single_class_train(path):
    return make_store(path, train_classes=1)


BAD = [
    ("msp", _no_logits, [], 1, "no 'm' layer logits"),
    ("msp", _other_model, [], 1, "different 'm' weights"),
    ("knn", _other_model, ["--ood", "ood/far/b"], 1, "different 'm' weights"),
    ("vim", _head_of_other_weights, [], 1, "head"),
    ("react", lambda p: make_store(p, head=False), [], 1, "no classifier head"),
    ("mahalanobis,knn", _nan_in("test"), [], 1, "NaN or inf"),
    ("knn", _nan_in("train", 250), [], 1, "NaN or inf"),
    # both read the poisoned layer (energy, which reads logits only, would now be written: tests/test_forgiving.py)
    ("residual,vim", _nan_in("ood/far/b", 80), [], 1, "NaN or inf"),
    ("mahalanobis", _empty_train, [], 1, "is empty"),
    ("knn", _empty_train, [], 1, "is empty"),
    ("mahalanobis", _single_class_train, [], 1, "1 class"),
    ("rmds", _single_class_train, [], 1, "1 class"),
    ("msp,bogus", make_store, [], 2, "unknown method 'bogus'"),
    ("knn", make_store, ["-p", "knn.k=abc"], 2, "knn.k='abc': expects an integer"),
    ("knn", make_store, ["-p", "knn.k=1000"], 2, "only 300 rows"),
    ("vim", make_store, ["-p", "vim.dim=24"], 2, "vim.dim=24"),
    ("msp", make_store, ["--backbone", "other"], 1, "no 'other' features"),
]


@pytest.mark.parametrize("methods,build,extra,code,message", BAD,
                         ids=[f"{b[0]}-{b[1].__name__}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gives_one_line_and_writes_nothing(capsys, tmp_path, methods, build, extra, code, message):
    path = tmp_path / "s.zarr"
    build(path)
    with open_store(path) as st:
        before = {name: st.read(name) for name in st.walk_arrays()}
    got, _, err = run(capsys, "score", methods, "--store", path, *extra)
    assert got == code, err
    assert one_line_error(err), err
    assert message in err
    with open_store(path) as st:
        after = {name: st.read(name) for name in st.walk_arrays()}
        assert not st.exists("fitted") and not st.exists("scores")
    assert after.keys() == before.keys()


def test_failed_run_keeps_earlier_results(capsys, tmp_path):
    path = make_store(tmp_path / "s.zarr")
    assert run(capsys, "-q", "score", "all", "--store", path)[0] == 0
    with open_store(path) as st:
        before = {name: st.read(name) for name in st.walk_arrays()}
        before_attrs = st.node_attrs("fitted/vim")
    with open_store(path, "r+") as st:  # poison the last OOD split only: vim refits (new hparams), then fails
        st.write_rows(f"splits/ood/far/b/{BACKBONE}/penultimate", 80, np.full((1, DIM), np.inf, np.float32))
    code, _, err = run(capsys, "score", "vim", "--store", path, "-p", "vim.dim=5")
    assert code == 1 and one_line_error(err) and "NaN or inf" in err
    with open_store(path) as st:
        assert st.node_attrs("fitted/vim") == before_attrs
        for name, value in before.items():
            if "ood/far/b/m" not in name:
                np.testing.assert_array_equal(st.read(name), value)
