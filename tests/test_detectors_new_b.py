"""Post-hoc detectors, part B (lts, pnml, gradnorm-kl, maxcosine, l1norm, ensemble), each against a
reference written here from its paper's formula or its authors' code (plain numpy / torch, none of
the scorer modules' helpers), and the multi-backbone path of the scoring flow that ensemble uses:
two small networks extracted side by side into one store and scored together."""

import json
import shutil
import sys

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from conftest import one_line_error, run
from test_detectors_logits import CHUNK, SPLIT_NAMES, SPLITS, make_store
from test_scorers import BACKBONE, arrays
from oodcli.scorers import describe_scorers
from oodcli.scoring import score_store
from oodcli.store import Store, open_store

NEW = ["gradnorm-kl", "l1norm", "lts", "maxcosine", "pnml"]
FITTED = ["maxcosine", "pnml"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("detb") / "clean.zarr")


@pytest.fixture
def fresh(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "s.zarr")


@pytest.fixture(scope="module")
def scored(clean, tmp_path_factory):
    path = shutil.copytree(clean, tmp_path_factory.mktemp("scoredb") / "s.zarr")
    with open_store(path, "r+") as st:
        fits = {r.method: r.fit for r in score_store(st, NEW)}
    return path, fits


def stored(path, node):
    with open_store(path) as st:
        return st.read(node)


# ---- references ------------------------------------------------------------------------------


def ref_lts(x, z, percentile=95):
    """andrijazz/lts: relu, k = n - round(n * p / 100) largest, scale = (s1 / s2)^2, energy(z * s)."""
    out = []
    for h, logits in zip(np.maximum(x, 0), z):
        k = len(h) - int(np.round(len(h) * percentile / 100))
        s = (h.sum() / np.sort(h)[::-1][:k].sum()) ** 2
        out.append(logsumexp(logits * s))
    return np.array(out)


def ref_pnml(train_x, x, W, b):
    """The authors' README (Eq. 20): normalised features, inverse correlation, genie regret."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    inv = np.linalg.pinv(unit(train_x).T @ unit(train_x))
    out = []
    for f in unit(x):
        p = softmax(W @ f + b)
        proj = abs(f @ inv @ f)
        a = proj / (1 + proj)
        nf = np.sum(p / (p + (1 - p) * p**a))
        out.append(1 - np.log(nf) / np.log(len(p)))
    return np.array(out)


def ref_pnml_low_rank(train_x, x, W, b):
    """The authors' score_utils for a singular correlation: x^T g = max(x P_bot x, x P x / (1 + x P x))."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    gram = unit(train_x).T @ unit(train_x)
    par = np.linalg.pinv(gram, rcond=1e-10, hermitian=True)
    bot = np.eye(len(gram)) - par @ gram
    out = []
    for f in unit(x):
        p = softmax(W @ f + b)
        a = max(f @ bot @ f, (f @ par @ f) / (1 + f @ par @ f))
        out.append(1 - np.log(np.sum(p / (p + (1 - p) * p**a))) / np.log(len(p)))
    return np.array(out)


def ref_maxcosine(protos, x):
    return np.array([max(h @ m / (np.linalg.norm(h) * np.linalg.norm(m)) for m in protos) for h in x])


def class_means(train):
    return np.array([train["penultimate"][train["labels"] == c].mean(0) for c in np.unique(train["labels"])])


def reference(method, train, split):
    x, z, W, b = split["penultimate"], split["logits"], split["W"], split["b"]
    if method == "lts":
        return ref_lts(x, z)
    if method == "pnml":
        return ref_pnml(train["penultimate"], x, W, b)
    if method == "gradnorm-kl":
        return np.abs(softmax(z, axis=1) - 1 / z.shape[1]).sum(1)
    if method == "l1norm":
        return np.abs(x).sum(1)
    return ref_maxcosine(class_means(train), x)


# ---- the scores ------------------------------------------------------------------------------


def test_every_new_detector_matches_its_reference(scored):
    path, fits = scored
    assert fits == {m: ("fitted" if m in FITTED else "-") for m in NEW}
    train = arrays(path, "train")
    for split in SPLIT_NAMES:
        data = arrays(path, split)
        for method in NEW:
            got = stored(path, f"scores/{method}/{split}")
            assert got.dtype == np.float32 and got.shape == (SPLITS[split],)
            np.testing.assert_allclose(got, reference(method, train, data), rtol=2e-5, atol=1e-6,
                                       err_msg=f"{method} on {split}")


def test_defaults_follow_the_papers():
    params = {r["method"]: r["params"] for r in describe_scorers()}
    assert params["lts"] == {"percentile": 95.0}  # lts@95 in every config of the authors' code
    assert params["gradnorm-kl"] == {"temperature": 1.0}  # GradNorm's T = 1
    assert params["maxcosine"] == {"prototypes": "means"}
    assert params["pnml"] == params["l1norm"] == params["ensemble"] == {}
    summaries = {r["method"]: r["summary"] for r in describe_scorers()}
    for method, cite in (("lts", "Djurisic et al., 2024"), ("pnml", "Bibas et al., 2021"),
                         ("gradnorm-kl", "Huang et al., 2021"), ("l1norm", "Huang et al., 2021"),
                         ("maxcosine", "Techapanurak et al., 2020"), ("ensemble", "Lakshminarayanan et al., 2017")):
        assert cite in summaries[method], method


def test_gradnorm_kl_is_the_bias_gradient_and_gradnorm_factors_into_it_times_l1norm(scored):
    import torch

    path, _ = scored
    data = arrays(path, "test")
    got = stored(path, "scores/gradnorm-kl/test")
    for i in range(5):
        bias = torch.tensor(data["b"], requires_grad=True)
        z = torch.tensor(data["W"]) @ torch.tensor(data["penultimate"][i]) + bias
        log_p = torch.log_softmax(z, dim=0)
        u = torch.full_like(log_p, 1 / len(log_p))
        torch.sum(u * (torch.log(u) - log_p)).backward()  # KL(u || softmax(z))
        assert got[i] == pytest.approx(bias.grad.abs().sum().item(), rel=1e-5)
    with open_store(path, "r+") as st:
        score_store(st, ["gradnorm"])
    np.testing.assert_allclose(stored(path, "scores/gradnorm/test"), got * stored(path, "scores/l1norm/test"),
                               rtol=1e-5)


def test_maxcosine_head_prototypes_are_the_weight_rows(fresh):
    with open_store(fresh, "r+") as st:
        fits = {r.method: r.fit for r in score_store(st, ["maxcosine"], hparams={"maxcosine": {"prototypes": "head"}})}
    assert fits == {"maxcosine": "-"}  # nothing learned from the train split
    data = arrays(fresh, "ood/near/a")
    np.testing.assert_allclose(stored(fresh, "scores/maxcosine/ood/near/a"), ref_maxcosine(data["W"], data["penultimate"]),
                               rtol=1e-5)


def test_pnml_counts_the_part_of_a_feature_outside_the_train_span(tmp_path):
    """Train features living in 3 of 6 dimensions: X^T X is singular, and test features leave its span."""
    from test_scorers import write_split

    rng = np.random.default_rng(5)
    W, b = rng.normal(0, 1, (4, 6)).astype(np.float32), rng.normal(0, 0.3, 4).astype(np.float32)
    train = np.c_[rng.exponential(1, (40, 3)), np.zeros((40, 3))].astype(np.float32)
    tests = {"test": rng.exponential(1, (30, 6)).astype(np.float32), "ood/far/b": rng.exponential(2, (20, 6)).astype(np.float32)}
    path = tmp_path / "s.zarr"
    with open_store(path, "a") as st:
        for split, x in {"train": train, **tests}.items():
            labels = np.full(len(x), -1) if split.startswith("ood") else rng.integers(0, 4, len(x))
            write_split(st, split, labels, {"penultimate": x}, role="ood-far" if split.startswith("ood") else "id")
        st.write_array(f"backbones/{BACKBONE}/head/weight", W)
        st.write_array(f"backbones/{BACKBONE}/head/bias", b)
        score_store(st, ["pnml"])
        assert st.node_attrs("fitted/pnml")["scalars"]["rank"] == 3
    for split, x in tests.items():
        want = ref_pnml_low_rank(train.astype(np.float64), x.astype(np.float64), W.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(stored(path, f"scores/pnml/{split}"), want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(want, ref_pnml(train.astype(np.float64), x.astype(np.float64), W, b), atol=1e-3)


def test_lts_factor_and_a_row_without_positive_activations():
    from oodcli.scorers import get_scorer

    lts = get_scorer("lts", percentile=50.0)
    x = np.array([[4.0, 3.0, -2.0, 1.0], [-1.0, -2.0, -3.0, -4.0]])  # relu: [4, 3, 0, 1] keeps 2: (8 / 7)^2
    z = np.array([[1.0, 2.0], [1.0, 2.0]])
    got = lts.score_batch({"penultimate": x, "logits": z})
    np.testing.assert_allclose(got, [logsumexp(z[0] * (8 / 7) ** 2), logsumexp(z[1])])


def test_scoring_reads_chunk_by_chunk(fresh, monkeypatch):
    biggest = {}
    real = Store.read

    def spy(self, name, rows=None):
        if f"/{BACKBONE}/" in name:
            n = self.shape(name)[0] if rows is None else rows.stop - rows.start
            biggest[name] = max(biggest.get(name, 0), n)
        return real(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    with open_store(fresh, "r+") as st:
        score_store(st, NEW)
    assert biggest and max(biggest.values()) == CHUNK


@pytest.mark.parametrize("method", NEW)
def test_cli_scores_each_detector(capsys, fresh, method):
    code, out, err = run(capsys, "-q", "score", method, "--store", fresh, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert {r["split"] for r in rows} == set(SPLIT_NAMES) and all(r["status"] == "written" for r in rows)


BAD = [
    ("lts", "lts.percentile=100", "lts.percentile"),
    ("lts", "lts.percentile=99", "keeps none of 16"),
    ("gradnorm-kl", "gradnorm-kl.temperature=0", "gradnorm-kl.temperature"),
    ("maxcosine", "maxcosine.prototypes=medoids", "maxcosine.prototypes"),
]


@pytest.mark.parametrize("method,param,text", BAD)
def test_bad_parameters_are_one_line(capsys, fresh, method, param, text):
    code, _, err = run(capsys, "score", method, "--store", fresh, "-p", param)
    assert code == 2 and one_line_error(err) and text in err, err


def test_missing_layers_and_head_are_one_line(capsys, tmp_path):
    from test_scorers import make_store as make_plain

    path = make_plain(tmp_path / "s.zarr", logits=False, head=False)
    for method, text in (("lts", "logits"), ("gradnorm-kl", "logits"), ("pnml", "head")):
        code, _, err = run(capsys, "score", method, "--store", path)
        assert code == 1 and one_line_error(err) and text in err, (method, err)
    code, _, err = run(capsys, "-q", "score", "l1norm,maxcosine", "--store", path)
    assert code == 0, err  # the penultimate alone serves them


# ---- ensemble: several backbones of one store -------------------------------------------------

MEMBERS = ("a", "b", "c")


def write_member(st, backbone, split, labels, logits, model_id):
    node = f"splits/{split}"
    if not st.exists(f"{node}/labels"):
        st.write_array(f"{node}/labels", np.asarray(labels, np.int64))
        st.write_array(f"{node}/ids", np.arange(len(labels), dtype=np.int64))
        st.set_attrs(node, role="ood-far" if split.startswith("ood") else "id", n=len(labels))
    st.create_array(f"{node}/{backbone}/logits", logits.shape, logits.dtype, chunk_rows=16 if backbone == "b" else 32)
    st.write_rows(f"{node}/{backbone}/logits", 0, logits)
    st.set_attrs(f"{node}/{backbone}", complete=True, rows_done=len(logits), model_id=model_id,
                 fingerprint=f"fp-{split}-{model_id}", parts={"weights": model_id, "preprocess": "none"})


@pytest.fixture
def three(tmp_path):
    """Three members' logits (float32, 5 classes) on test and one OOD split, chunked differently."""
    rng = np.random.default_rng(4)
    path = tmp_path / "e.zarr"
    with open_store(path, "a") as st:
        for split, n in (("test", 70), ("ood/far/x", 50)):
            labels = rng.integers(0, 5, n) if split == "test" else np.full(n, -1)
            for m in MEMBERS:
                write_member(st, m, split, labels, rng.normal(0, 2, (n, 5)).astype(np.float32), f"id-{m}")
    return path


def test_ensemble_is_the_max_of_the_members_mean_softmax(capsys, three):
    code, out, err = run(capsys, "-q", "score", "ensemble", "--store", three, "--backbone", "a,b,c", "--json")
    assert code == 0, err
    assert {r["backbone"] for r in json.loads(out)} == {"a,b,c"}
    with open_store(three) as st:
        for split in ("test", "ood/far/x"):
            logits = [st.read(f"splits/{split}/{m}/logits").astype(np.float64) for m in MEMBERS]
            want = np.mean([softmax(z, axis=1) for z in logits], axis=0).max(1)
            np.testing.assert_allclose(st.read(f"scores/ensemble/{split}"), want, rtol=1e-6)
            attrs = st.node_attrs(f"scores/ensemble/{split}")
            assert attrs["members"] == list(MEMBERS) and attrs["backbone"] == "a,b,c"
            assert attrs["model_id"] == "id-a,id-b,id-c"
    code, out, _ = run(capsys, "report", "--store", three, "--format", "json")
    assert code == 0 and "ensemble" in json.loads(out)["methods"]


def test_ensemble_through_the_python_api(three):
    from oodcli import api

    rows = api.score(three, "ensemble", backbone=["a", "c"])
    with open_store(three) as st:
        z = [st.read(f"splits/test/{m}/logits").astype(np.float64) for m in ("a", "c")]
        np.testing.assert_allclose(st.read("scores/ensemble/test"), (softmax(z[0], 1) + softmax(z[1], 1)).max(1) / 2,
                                   rtol=1e-6)
    assert {r.backbone for r in rows} == {"a,c"}


def test_ensemble_refusals_are_one_line(capsys, three, tmp_path):
    cases = [
        (["ensemble", "--backbone", "a"], 1, "name two or more with --backbone A,B (the store also holds b, c)"),
        (["ensemble"], 1, "name two or more with --backbone A,B (the store holds a, b, c)"),
        (["ensemble", "--backbone", "a,zz"], 1, "no 'zz' features"),
        (["ensemble", "--backbone", "a,a"], 2, "names a backbone twice"),
        (["msp,ensemble", "--backbone", "a,b"], 2, "score msp with one backbone"),
    ]
    for args, want, text in cases:
        code, _, err = run(capsys, "score", *args, "--store", three)
        assert code == want and one_line_error(err) and text in err, (args, err)
    with open_store(three, "r+") as st:  # a member without one of the splits
        st.delete("splits/ood/far/x/c")
    code, _, err = run(capsys, "score", "ensemble", "--backbone", "a,b,c", "--store", three)
    assert code == 1 and one_line_error(err) and "split 'ood/far/x' has no 'c' features" in err, err
    with open_store(three, "r+") as st:  # members of different classes
        write_member(st, "c", "ood/far/x", None, np.zeros((50, 3), np.float32), "id-c")
    code, _, err = run(capsys, "score", "ensemble", "--backbone", "a,b,c", "--store", three)
    assert code == 1 and one_line_error(err) and "differ in shape (a: 5, b: 5, c: 3)" in err, err
    with open_store(three) as st:
        assert not st.exists("scores/ensemble")  # nothing half-written
    single = tmp_path / "one.zarr"  # one backbone: the way to a second one is named, with or without --backbone
    with open_store(single, "a") as st:
        write_member(st, "a", "test", np.zeros(8, np.int64), np.zeros((8, 5), np.float32), "id-a")
        write_member(st, "a", "ood/far/x", np.full(8, -1), np.zeros((8, 5), np.float32), "id-a")
    for args in (["ensemble"], ["ensemble", "--backbone", "a"]):
        code, _, err = run(capsys, "score", *args, "--store", single)
        assert code == 1 and one_line_error(err) and "the store holds only 'a'" in err and "extract --as NAME" in err, err


def test_score_all_on_a_one_backbone_store_skips_ensemble_with_the_reason(fresh):
    from oodcli.scoring import score_methods

    with open_store(fresh, "r+") as st:  # what 'score all' asks for: the methods some backbone serves
        outcomes = {o.method: o for o in score_methods(st, [*NEW, "ensemble"], only_applicable=True)}
    assert outcomes["ensemble"].status == "skipped" and "extract another model's features" in outcomes["ensemble"].reason
    assert all(outcomes[m].status == "written" for m in NEW)


NETS = '''
import torch
from torch import nn


def _net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6))
    net.preprocess = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return net


def seed0():
    return _net(0)


def seed1():
    return _net(1)
'''


def test_ensemble_of_two_seeds_extracted_side_by_side(capsys, tmp_path, one_thread):
    """One architecture from two seeds, two backbones of one store, scored as one ensemble."""
    import torch

    (tmp_path / "nets.py").write_text(NETS)
    store = tmp_path / "seeds.zarr"
    members = [f"python:{tmp_path / 'nets.py'}:seed{i}" for i in (0, 1)]
    for model in members:
        code, _, err = run(capsys, "-q", "extract", "--model", model, "--benchmark", "digits", "--split", "test",
                           "--split", "ood/far/noise", "--dtype", "float32", "--store", store)
        assert code == 0, err
    names = ["python:nets.py:seed0", "python:nets.py:seed1"]
    code, _, err = run(capsys, "-q", "score", "ensemble", "--store", store, "--backbone", ",".join(names))
    assert code == 0, err
    sys.path.insert(0, str(tmp_path))
    try:
        import nets
    finally:
        sys.path.remove(str(tmp_path))
    from oodcli.data.base import data_root, open_source

    data = open_source("digits:ood/far/noise", data_root(None), True)
    images = torch.stack([
        torch.tensor((np.asarray(data.load(i).convert("RGB").resize((16, 16), 2), np.float32) / 255 - 0.5) / 0.5)
        .permute(2, 0, 1) for i in range(4)])
    with open_store(store) as st:
        got = st.read("scores/ensemble/ood/far/noise")
        logits = [st.read(f"splits/ood/far/noise/{n}/logits").astype(np.float64) for n in names]
        assert st.node_attrs("scores/ensemble/test")["members"] == names
    assert not np.allclose(logits[0], logits[1])  # two seeds, two networks
    np.testing.assert_allclose(got, (softmax(logits[0], 1) + softmax(logits[1], 1)).max(1) / 2, rtol=1e-6)
    with torch.no_grad():  # the stored logits are the networks' own outputs
        for i, net in enumerate((nets.seed0(), nets.seed1())):
            np.testing.assert_allclose(net.eval()(images).numpy(), logits[i][:4], atol=1e-3)
