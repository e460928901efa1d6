"""The logit/head family of post-hoc detectors (temp-scaling, entropy, klm, weighted-energy,
gradnorm, dice, openmax, she), each against a reference written here from its paper's
formula (plain numpy / scipy / torch, none of the scorer modules' helpers), GradNorm
against autograd, OpenMax's Weibull fit on synthetic data, and the command line."""

import json
import shutil

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import weibull_min

from conftest import one_line_error, run
from test_scorers import BACKBONE, arrays, write_split
from oodcli.scorers import describe_scorers, scorer_names
from oodcli.scoring import score_store
from oodcli.store import Store, open_store

NEW = ["dice", "entropy", "gradnorm", "klm", "openmax", "she", "temp-scaling", "weighted-energy"]
FITTED = ["dice", "klm", "openmax", "she", "temp-scaling"]
SPLITS = {"train": 400, "test": 120, "ood/near/a": 100, "ood/far/b": 90}
DIM, CLASSES, CHUNK = 16, 4, 32
SPLIT_NAMES = ("test", "ood/near/a", "ood/far/b")


def make_store(path, seed=0, splits=SPLITS, train_labels=None):
    """Positive float32 features around class centres, a head aligned with the centres (so
    predictions agree with most labels, not all: the NLL has an interior optimum), several
    chunks per split."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, DIM))
    weight = (0.8 * centres + rng.normal(0, 0.3, (CLASSES, DIM))).astype(np.float32)
    bias = rng.normal(0, 0.3, CLASSES).astype(np.float32)
    with open_store(path, "a") as st:
        for split, n in splits.items():
            ood = split.startswith("ood")
            labels = np.full(n, -1) if ood else rng.integers(0, CLASSES, n)
            if split == "train" and train_labels is not None:
                labels = train_labels(labels)
            mean = 0.0 if ood else 0.5 * centres[labels]
            x = np.exp(mean + rng.normal(0.3 if ood else 0.0, 0.5, (n, DIM))).astype(np.float32)
            write_split(st, split, labels, {"penultimate": x, "logits": x @ weight.T + bias},
                        role="ood-near" if "near" in split else "ood-far" if ood else "id")
        st.write_array(f"backbones/{BACKBONE}/head/weight", weight)
        st.write_array(f"backbones/{BACKBONE}/head/bias", bias)
        st.set_attrs(f"backbones/{BACKBONE}", model_id="model-1")
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One made store that no test writes to (tests that write work on a copy)."""
    return make_store(tmp_path_factory.mktemp("det") / "clean.zarr")


@pytest.fixture
def fresh(clean, tmp_path):
    """A copy of the clean store for a test that writes."""
    return shutil.copytree(clean, tmp_path / "s.zarr")


@pytest.fixture(scope="module")
def scored(clean, tmp_path_factory):
    """A copy of the clean store scored once with every new detector at its defaults."""
    path = shutil.copytree(clean, tmp_path_factory.mktemp("scored") / "s.zarr")
    with open_store(path, "r+") as st:
        fits = {r.method: r.fit for r in score_store(st, NEW)}
    return path, fits


def stored(path, node):
    with open_store(path) as st:
        return st.read(node)


# ---- references, from the papers' formulas ------------------------------------------------


def ref_entropy(z):
    p = softmax(z, axis=1)
    return np.sum(p * np.log(p), axis=1)


def ref_temperature(train):
    z, y = train["logits"], train["labels"]

    def nll(log_t):
        s = z / np.exp(log_t)
        return np.mean(logsumexp(s, axis=1) - s[np.arange(len(s)), y])

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded", options={"xatol": 1e-11}).x))


def ref_klm(train, z):
    p_train = softmax(train["logits"], axis=1)
    pred = p_train.argmax(1)
    templates = [p_train[pred == c].mean(0) for c in range(CLASSES) if (pred == c).any()]
    p = softmax(z, axis=1)
    kl = np.array([[np.sum(row * np.log(row / d)) for d in templates] for row in p])
    return -kl.min(1)


def ref_gradnorm(x, W, b, T=1.0):
    out = []
    for h in x:
        p = softmax((W @ h + b) / T)
        g = (p - 1.0 / len(p)) / T  # d KL(u || softmax(z/T)) / dz
        out.append(np.abs(np.outer(g, h)).sum())  # L1 of the full gradient matrix dW
    return np.array(out)


def ref_dice(train, x, W, b, p=90):
    contrib = W * train["penultimate"].mean(0)
    masked = W * (contrib > np.percentile(contrib.ravel(), p))
    return logsumexp(x @ masked.T + b, axis=1)


def ref_she(train, x, z):
    pred_train = train["logits"].argmax(1)
    patterns = np.zeros((CLASSES, x.shape[1]))
    for c in range(CLASSES):
        right = (train["labels"] == c) & (pred_train == c)
        if right.any():
            patterns[c] = train["penultimate"][right].mean(0)
    return np.array([row @ patterns[k] for row, k in zip(x, z.argmax(1))])


def ref_openmax(train, z, tailsize=20, alpha=3):
    """The OSDN / OpenOOD procedure, one sample and one class at a time; libMR's FitHigh is a
    Weibull (location 0) fitted to the tail translated by 10000 - min(tail). A class with
    under two correct train samples has no model: its CDF is 1."""
    tz, ty = train["logits"], train["labels"]
    right = tz.argmax(1) == ty
    models = {}
    for c in range(CLASSES):
        av = tz[right & (ty == c)]
        if len(av) < 2:
            models[c] = None
            continue
        mav = av.mean(0)
        tail = np.sort([np.sqrt(np.sum((v - mav) ** 2)) for v in av])[-tailsize:]
        shift = 10000 - tail.min()
        shape, _, scale = weibull_min.fit(tail + shift, floc=0)
        models[c] = (mav, shape, scale, shift)
    log_odds, top_prob = [], []
    for row in z:
        ranked = np.argsort(row)[::-1][:alpha]
        omega = np.zeros(CLASSES)
        omega[ranked] = [(alpha + 1 - i) / alpha for i in range(1, alpha + 1)]
        revised, unknown = row.copy(), 0.0
        for c in range(CLASSES):
            w = 1.0
            if models[c] is not None:
                mav, shape, scale, shift = models[c]
                w = weibull_min.cdf(np.sqrt(np.sum((row - mav) ** 2)) + shift, shape, scale=scale)
            revised[c] = row[c] * (1 - w * omega[c])
            unknown += row[c] - revised[c]
        probs = softmax(np.r_[revised, unknown])
        log_odds.append(np.log(probs[:-1].sum()) - np.log(probs[-1]))
        top_prob.append(probs.max())
    return np.array(log_odds), np.array(top_prob)


def reference(method, train, split):
    x, z, W, b = split["penultimate"], split["logits"], split["W"], split["b"]
    if method == "entropy":
        return ref_entropy(z)
    if method == "temp-scaling":
        return softmax(z / ref_temperature(train), axis=1).max(1)
    if method == "klm":
        return ref_klm(train, z)
    if method == "weighted-energy":
        return logsumexp(z, axis=1)  # all weights 1 by default
    if method == "gradnorm":
        return ref_gradnorm(x, W, b)
    if method == "dice":
        return ref_dice(train, x, W, b)
    if method == "she":
        return ref_she(train, x, z)
    return ref_openmax(train, z)[0]


# ---- the scores ------------------------------------------------------------------------------


def test_every_new_detector_matches_its_reference(scored):
    path, fits = scored
    assert fits == {m: ("fitted" if m in FITTED else "-") for m in NEW}
    train = arrays(path, "train")
    assert 0.5 < np.mean(train["logits"].argmax(1) == train["labels"]) < 1.0  # not separable: T is interior
    for split in SPLIT_NAMES:
        data = arrays(path, split)
        for method in NEW:
            got = stored(path, f"scores/{method}/{split}")
            assert got.dtype == np.float32 and got.shape == (SPLITS[split],)
            np.testing.assert_allclose(got, reference(method, train, data), rtol=2e-5, atol=1e-6,
                                       err_msg=f"{method} on {split}")


def test_fitted_temperature_minimises_the_train_nll(scored):
    path, _ = scored
    with open_store(path) as st:
        got = st.node_attrs("fitted/temp-scaling")["scalars"]["temperature_used"]
    assert got == pytest.approx(ref_temperature(arrays(path, "train")), rel=1e-7)


def test_fitted_state_is_cached(scored):
    path, fits = scored
    assert {m: fits[m] for m in FITTED} == {m: "fitted" for m in FITTED}
    with open_store(path, "r+") as st:
        before = {m: st.read(f"scores/{m}/test") for m in FITTED}
        again = {r.method: r.fit for r in score_store(st, FITTED)}
        for m in FITTED:
            np.testing.assert_array_equal(st.read(f"scores/{m}/test"), before[m])
    assert again == {m: "cached" for m in FITTED}


def test_fitting_and_scoring_read_chunk_by_chunk(fresh, monkeypatch):
    path = fresh
    biggest = {}
    real = Store.read

    def spy(self, name, rows=None):
        if f"/{BACKBONE}/" in name:
            n = self.shape(name)[0] if rows is None else rows.stop - rows.start
            biggest[name] = max(biggest.get(name, 0), n)
        return real(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    with open_store(path, "r+") as st:
        score_store(st, NEW)
    assert biggest and max(biggest.values()) == CHUNK  # never a whole split


def test_gradnorm_matches_autograd():
    import torch

    from oodcli.scorers.head import gradnorm

    rng = np.random.default_rng(3)
    h, W, b = rng.exponential(1.0, (7, 12)), rng.normal(0, 1, (5, 12)), rng.normal(0, 1, 5)
    for T in (1.0, 0.5, 3.0):
        for include_bias in (False, True):
            want = []
            for row in h:
                weight = torch.tensor(W, requires_grad=True)
                bias = torch.tensor(b, requires_grad=True)
                log_p = torch.log_softmax((weight @ torch.tensor(row) + bias) / T, dim=0)
                uniform = torch.full((5,), 1 / 5, dtype=torch.float64)
                kl = torch.sum(uniform * (torch.log(uniform) - log_p))  # KL(u || softmax(z / T))
                kl.backward()
                want.append(weight.grad.abs().sum().item() + (bias.grad.abs().sum().item() if include_bias else 0.0))
            np.testing.assert_allclose(gradnorm(h, h @ W.T + b, T, include_bias), want, rtol=1e-12)


def test_openmax_openood_output_is_the_largest_openmax_probability(fresh):
    path = fresh
    with open_store(path, "r+") as st:
        score_store(st, ["openmax"], hparams={"openmax": {"output": "max"}})
    train = arrays(path, "train")
    for split in SPLIT_NAMES:
        np.testing.assert_allclose(stored(path, f"scores/openmax/{split}"),
                                   ref_openmax(train, arrays(path, split)["logits"])[1], rtol=2e-5)


def test_openmax_class_without_a_tail_counts_as_unknown(tmp_path):
    """Class 3 has one correctly classified train sample at most: no Weibull model, w = 1."""
    def few_threes(labels):
        labels = labels.copy()
        labels[labels == 3] = 0
        labels[0] = 3
        return labels

    path = make_store(tmp_path / "s.zarr", train_labels=few_threes)
    with open_store(path, "r+") as st:
        score_store(st, ["openmax"])
        assert st.read("fitted/openmax/modelled").tolist() == [1, 1, 1, 0]
        got = st.read("scores/openmax/test")
    z = arrays(path, "test")["logits"]
    assert np.any(z.argmax(1) == 3)  # some test samples do rank class 3 first
    np.testing.assert_allclose(got, ref_openmax(arrays(path, "train"), z)[0], rtol=2e-5, atol=1e-6)


def test_weibull_fit_recovers_known_parameters():
    from oodcli.scorers.openmax import fit_weibull, weibull_cdf

    rng = np.random.default_rng(0)
    for shape, scale in ((2.5, 1.7), (0.8, 40.0), (6000.0, 10001.5)):  # the last like libMR's translated tails
        sample = weibull_min.rvs(shape, scale=scale, size=20000, random_state=rng)
        got_shape, got_scale = fit_weibull(sample)
        assert got_shape == pytest.approx(shape, rel=0.03) and got_scale == pytest.approx(scale, rel=0.01)
        x = np.quantile(sample, [0.01, 0.3, 0.5, 0.9, 0.999])
        np.testing.assert_allclose(weibull_cdf(x, shape, scale), weibull_min.cdf(x, shape, scale=scale), rtol=1e-10)


def test_temperature_of_a_separable_train_split_stops_at_its_bound():
    from oodcli.scorers.logits import MIN_TEMPERATURE, fit_temperature

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    z = rng.normal(0, 1, (300, 5))
    z[np.arange(300), y] += 8.0  # every sample right by a wide margin: NLL falls as T -> 0
    assert np.all(z.argmax(1) == y)
    temperature, passes = fit_temperature(lambda: iter([(z[:150], y[:150]), (z[150:], y[150:])]))
    assert temperature == MIN_TEMPERATURE and passes == 2


def test_temperature_of_labels_the_logits_do_not_predict_stops_at_its_upper_bound():
    from oodcli.scorers.logits import MAX_TEMPERATURE, fit_temperature

    z = np.random.default_rng(2).normal(0, 1, (200, 5))
    y = z.argmin(1)  # every label is the least likely class: NLL falls as T grows
    assert fit_temperature(lambda: iter([(z, y)])) == (MAX_TEMPERATURE, 2)


def test_a_perfectly_classified_train_split_is_refused_for_temperature(capsys, fresh):
    with open_store(fresh, "r+") as st:  # relabel train with the network's own predictions
        st.write_array("splits/train/labels", st.read(f"splits/train/{BACKBONE}/logits").argmax(1).astype(np.int64))
    code, _, err = run(capsys, "score", "temp-scaling", "--store", fresh)
    assert code == 1 and one_line_error(err) and "T -> 0" in err and "temp-scaling.temperature=T" in err
    code, _, err = run(capsys, "-q", "score", "temp-scaling", "--store", fresh, "-p", "temp-scaling.temperature=0.5")
    assert code == 0, err


def test_given_temperature_needs_no_train_split(tmp_path):
    path = make_store(tmp_path / "s.zarr", splits={k: v for k, v in SPLITS.items() if k != "train"})
    with open_store(path, "r+") as st:
        fits = {r.method: r.fit for r in score_store(st, ["temp-scaling"], hparams={"temp-scaling": {"temperature": 2.0}})}
        got = st.read("scores/temp-scaling/test")
        assert not st.exists("fitted/temp-scaling")
    assert fits == {"temp-scaling": "-"}
    np.testing.assert_allclose(got, softmax(arrays(path, "test")["logits"] / 2.0, axis=1).max(1), rtol=1e-6)


def test_weighted_energy_reads_vos_weights(fresh, tmp_path):
    from safetensors.numpy import save_file

    path = fresh
    weights = np.array([[0.5, -1.0, 2.0, 1.5]], np.float32)  # nn.Linear(C, 1).weight; relu drops class 1
    save_file({"weight_energy.weight": weights, "fc.weight": np.ones((2, 2), np.float32)}, tmp_path / "vos.safetensors")
    z = arrays(path, "test")["logits"]
    want = np.log(np.sum(np.maximum(weights, 0) * np.exp(z), axis=1))
    for spec in (str(tmp_path / "vos.safetensors"), "0.5,-1,2,1.5"):
        with open_store(path, "r+") as st:
            score_store(st, ["weighted-energy"], hparams={"weighted-energy": {"weights": spec}})
            np.testing.assert_allclose(st.read("scores/weighted-energy/test"), want, rtol=1e-6)


def test_defaults_follow_the_papers():
    params = {r["method"]: r["params"] for r in describe_scorers()}
    assert params["temp-scaling"] == {"temperature": None}  # fitted by NLL
    assert params["gradnorm"] == {"temperature": 1.0, "include_bias": False}  # paper: T = 1, weight gradient
    assert params["dice"] == {"percentile": 90.0}  # sparsity p = 0.9 (OpenOOD, the paper's CIFAR setting)
    assert params["openmax"] == {"tailsize": 20, "alpha": 3, "distance": "euclidean", "output": "known"}  # OpenOOD
    assert params["entropy"] == params["klm"] == params["she"] == {}
    assert params["weighted-energy"] == {"weights": None}
    from oodcli.scorers.openmax import TRANSLATION

    assert TRANSLATION == 10000.0  # libMR's translate_amount


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW)
def test_cli_scores_each_detector(capsys, fresh, method):
    path = fresh
    code, out, err = run(capsys, "-q", "score", method, "--store", path, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert {r["split"] for r in rows} == set(SPLIT_NAMES) and {r["method"] for r in rows} == {method}
    assert all(r["status"] == "written" for r in rows)


def test_score_all_includes_them(capsys, fresh):
    path = fresh
    code, out, err = run(capsys, "-q", "score", "all", "--store", path, "--json")
    assert code == 0, err
    written = {r["method"] for r in json.loads(out) if r["status"] == "written"}
    assert set(NEW) <= written and set(NEW) <= set(scorer_names())
    code, out, _ = run(capsys, "score", "--list")
    assert all(name in out for name in NEW) and "Bendale & Boult, 2016" in out


BAD = [
    ("dice", "dice.percentile=100", "dice.percentile"),
    ("gradnorm", "gradnorm.temperature=0", "gradnorm.temperature"),
    ("temp-scaling", "temp-scaling.temperature=-1", "temp-scaling.temperature"),
    ("openmax", "openmax.distance=cosine", "openmax.distance"),
    ("openmax", "openmax.tailsize=1", "tailsize"),
    ("openmax", "openmax.output=prob", "openmax.output"),
    ("weighted-energy", "weighted-energy.weights=abc", "neither a file"),
    ("weighted-energy", "weighted-energy.weights=1,2", "has 2 values but the logits have 4"),
    ("weighted-energy", "weighted-energy.weights=-1,0,0,0", "at least one positive"),
    ("weighted-energy", "weighted-energy.weights=missing.safetensors", "no file"),
]


@pytest.mark.parametrize("method,param,message", BAD, ids=[b[1] for b in BAD])
def test_bad_parameters_give_one_line(capsys, clean, method, param, message):
    path = clean
    code, _, err = run(capsys, "score", method, "--store", path, "-p", param)
    assert code == 2 and one_line_error(err) and message in err, err
    with open_store(path) as st:
        assert not st.exists("scores") and not st.exists("fitted")
