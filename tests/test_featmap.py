"""Feature maps and perturbation variants at extraction, and the scorers that read them:
ASH/SCALE on the pre-pooling map, ODIN and Mahalanobis with input preprocessing.

Every reference here is computed independently of the code under test: forward hooks
on the network, numpy formulas, autograd on the raw modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import oodcli.extraction as ex
from conftest import ArrayImages, one_line_error, run
from oodcli.backbones import get_spec
from oodcli.errors import OodError, UsageError
from oodcli.perturb import parse_perturb, parse_perturbations
from oodcli.scoring import score_methods
from oodcli.store import Store, open_store

MODEL = "digits_cnn-tiny"
CHUNK = 16
SPLITS = (("train", "id", 40, 0), ("test", "id", 24, 1), ("ood/far/x", "ood-far", 24, 2))
ODIN = parse_perturb("odin:temperature=1000,epsilon=0.05")  # a large step, so a wrong step shows
MAHA = parse_perturb("mahalanobis:epsilon=0.05")


def _data(split, n, seed):
    labels = np.arange(n) % 6 if split != "ood/far/x" else np.full(n, -1)
    return ArrayImages(f"fake:{split}", n, seed=seed, labels=labels)


def _extract_all(path, layers, dtype="float16", **kw):
    spec = get_spec(MODEL)
    lazy = ex.LazyModel(spec, None, "cpu")
    with open_store(path, "a") as st:
        for split, role, n, seed in SPLITS:
            ex.extract_split(st, spec, None, _data(split, n, seed), split, role, "test:data", lazy, layers,
                             batch_size=8, chunk_rows=CHUNK, dtype=dtype, **kw)
    return path


@pytest.fixture(scope="module")
def net(one_thread):
    return get_spec(MODEL).build("random")


@pytest.fixture(scope="module")
def fm_store(tmp_path_factory, one_thread):
    return _extract_all(tmp_path_factory.mktemp("fm") / "fm.zarr", ("logits", "penultimate", "featmap"))


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, one_thread):
    return _extract_all(tmp_path_factory.mktemp("plain") / "plain.zarr", ("logits", "penultimate"))


@pytest.fixture(scope="module")
def perturbed_store(tmp_path_factory, one_thread):
    return _extract_all(tmp_path_factory.mktemp("pt") / "pt.zarr", ("logits", "penultimate"), dtype="float32",
                        perturbs=(ODIN, MAHA))


def _inputs(split):
    """The preprocessed images of a split, as extract feeds them to the network."""
    (_, _, n, seed), = [s for s in SPLITS if s[0] == split]
    data, tf = _data(split, n, seed), get_spec(MODEL).preprocess.to_transform()
    return torch.stack([tf(data.load(i)) for i in range(n)])


def _read(path, name):
    with open_store(path) as st:
        return st.read(name), st.node_attrs(name)


# ---- the featmap layer ----------------------------------------------------------------------


def test_featmap_is_the_map_before_pooling(fm_store, net):
    fmap, attrs = _read(fm_store, "splits/test/digits_cnn-tiny/featmap")
    assert fmap.shape == (24, 128, 8, 8) and fmap.dtype == np.float16
    assert attrs["pool"] is None and attrs["layout"] == "NCHW" and attrs["map_shape"] == [128, 8, 8]
    with open_store(fm_store) as st:
        assert st.chunk_rows("splits/test/digits_cnn-tiny/featmap") == CHUNK
        assert st.node_attrs("splits/test/digits_cnn-tiny")["parts"]["featmap_pool"] is None
    seen = {}
    block3 = net.mid[1]  # DigitsCNN.block3: the last stage, right before AdaptiveAvgPool2d
    handle = block3.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    try:
        with torch.no_grad():
            net.forward_layers(_inputs("test"), ("logits",))
    finally:
        handle.remove()
    np.testing.assert_allclose(fmap.astype(np.float32), seen["out"].numpy(), rtol=2e-3, atol=2e-3)
    pen, _ = _read(fm_store, "splits/test/digits_cnn-tiny/penultimate")
    np.testing.assert_allclose(fmap.astype(np.float32).mean(axis=(2, 3)), pen.astype(np.float32), rtol=3e-3, atol=3e-3)


def test_featmap_pool_is_recorded_and_changes_the_fingerprint(tmp_path, fm_store, net, one_thread):
    spec, (split, role, n, seed) = get_spec(MODEL), SPLITS[1]
    path = tmp_path / "p.zarr"
    with open_store(path, "a") as st:
        ex.extract_split(st, spec, None, _data(split, n, seed), split, role, "test:data", ex.LazyModel(spec, None, "cpu"),
                         ("penultimate", "featmap"), batch_size=8, featmap_pool=2)
    fmap, attrs = _read(path, "splits/test/digits_cnn-tiny/featmap")
    assert fmap.shape == (24, 128, 2, 2) and attrs["pool"] == 2
    with torch.no_grad():
        full = net.forward_layers(_inputs("test"), ("featmap",))["featmap"]
    expect = full.reshape(24, 128, 2, 4, 2, 4).mean(axis=(3, 5)).numpy()  # 8x8 -> 2x2 blocks of 4x4
    np.testing.assert_allclose(fmap.astype(np.float32), expect, rtol=2e-3, atol=2e-3)
    with open_store(path) as a, open_store(fm_store) as b:
        pa, pb = a.node_attrs("splits/test/digits_cnn-tiny"), b.node_attrs("splits/test/digits_cnn-tiny")
    assert pa["parts"]["featmap_pool"] == 2 and pa["fingerprint"] != pb["fingerprint"]
    parts = [ex.fingerprint_parts(spec, None, _data(split, n, seed), split, ("featmap",), "float16", g) for g in (None, 2, 4)]
    assert len({ex.digest(p) for p in parts}) == 3
    # layers without featmap keep the fingerprint they always had (no new key)
    assert "featmap_pool" not in ex.fingerprint_parts(spec, None, _data(split, n, seed), split, ("logits",), "float16")
    with open_store(path, "a") as st, pytest.raises(OodError, match="featmap_pool 2 -> 4"):
        ex.extract_split(st, spec, None, _data(split, n, seed), split, role, "test:data", ex.LazyModel(spec, None, "cpu"),
                         ("penultimate", "featmap"), batch_size=8, featmap_pool=4)


@pytest.mark.parametrize("name", ["resnet18-tiny", "cifar_resnet18-tiny"])
def test_other_cnn_families_declare_a_featmap_that_pools_to_penultimate(name):
    net = get_spec(name).build("random")
    with torch.no_grad():
        out = net.forward_layers(torch.randn(2, 3, 32, 32), ("featmap", "penultimate"))
    assert tuple(out["featmap"].shape[1:]) == net.layer_shapes["featmap"]
    torch.testing.assert_close(out["featmap"].mean(dim=(2, 3)), out["penultimate"])


# ---- ASH and SCALE ------------------------------------------------------------------------


def _reference(method, acts, weight, bias, p):
    """The papers' formulas per sample, written out with a sort (not argpartition). Also
    returns which samples have no tie at the pruning threshold: where the k-th and (k+1)-th
    largest values are equal (float16 maps have such ties) either may be kept."""
    out, clean = [], []
    for a in acts.astype(np.float64):
        flat = a.reshape(-1)
        k = flat.size - int(round(flat.size * p / 100))
        order = np.argsort(-flat, kind="stable")
        clean.append(k == flat.size or flat[order[k - 1]] != flat[order[k]])
        keep = np.zeros(flat.size, bool)
        keep[order[:k]] = True
        pruned = np.where(keep, flat, 0.0)
        s1, s2 = flat.sum(), pruned.sum()
        shaped = {"ash-p": pruned, "ash-s": pruned * np.exp(s1 / s2), "ash-b": keep * (s1 / k),
                  "scale": flat * np.exp(s1 / s2)}[method].reshape(a.shape)
        pooled = shaped.mean(axis=(1, 2)) if a.ndim == 3 else shaped
        z = pooled @ weight.T + bias
        out.append(np.log(np.exp(z - z.max()).sum()) + z.max())
    return np.array(out), np.array(clean)


METHODS = {"ash-p": 90.0, "ash-s": 90.0, "ash-b": 90.0, "scale": 85.0}


@pytest.mark.parametrize("store_name,asked,layer", [
    ("fm_store", None, "penultimate"),  # the default is the pooled vector even when a map is stored (authors' code)
    ("fm_store", "featmap", "featmap"),
    ("fm_store", "auto", "featmap"),
    ("plain_store", None, "penultimate"),
    ("plain_store", "auto", "penultimate"),
])
def test_shaping_scores_match_the_formulas_and_say_what_they_shaped(request, store_name, asked, layer):
    path = request.getfixturevalue(store_name)
    hparams = {m: {"layer": asked} for m in METHODS} if asked else None
    with open_store(path, "a") as st:
        outcomes = score_methods(st, list(METHODS), id_split="test", ood=["ood/far/x"], hparams=hparams)
    for o in outcomes:
        assert o.status == "written", o.reason
        if asked == "auto" and layer == "penultimate":  # the fallback is said with the scores
            assert any("no featmap" in n and "penultimate" in n for n in o.notes), o.notes
        else:
            assert o.notes == []
    with open_store(path) as st:
        weight = st.read("backbones/digits_cnn-tiny/head/weight").astype(np.float64)
        bias = st.read("backbones/digits_cnn-tiny/head/bias").astype(np.float64)
        for method, p in METHODS.items():
            for split in ("test", "ood/far/x"):
                acts = st.read(f"splits/{split}/digits_cnn-tiny/{layer}").astype(np.float32)
                got = st.read(f"scores/{method}/{split}")
                assert st.node_attrs(f"scores/{method}/{split}")["hparams"] == {"percentile": p, "layer": layer}
                expect, clean = _reference(method, acts, weight, bias, p)
                assert clean.mean() > 0.5
                np.testing.assert_allclose(got[clean], expect[clean], rtol=1e-5, atol=1e-5)


def test_featmap_shaping_differs_from_pooled_shaping(fm_store):
    with open_store(fm_store, "a") as st:
        for layer in ("featmap", "penultimate"):
            score_methods(st, ["ash-s"], id_split="test", ood=["ood/far/x"], hparams={"ash-s": {"layer": layer}},
                          save_as=f"ash-s-{layer}")
        a, b = st.read("scores/ash-s-featmap/test"), st.read("scores/ash-s-penultimate/test")
    assert not np.allclose(a, b, rtol=1e-3)


def test_featmap_scorers_read_one_chunk_at_a_time(fm_store, monkeypatch):
    reads = []
    original = Store.read

    def spy(self, name, rows=None):
        if name.endswith("/featmap"):
            n = self.shape(name)[0]
            start, stop, _ = (rows or slice(None)).indices(n)
            reads.append(stop - start)
        return original(self, name, rows)

    monkeypatch.setattr(Store, "read", spy)
    with open_store(fm_store, "a") as st:
        outcomes = score_methods(st, ["ash-b", "scale"], id_split="test", ood=["ood/far/x"],
                                 hparams={"ash-b": {"layer": "featmap"}, "scale": {"layer": "featmap"}})
    assert all(o.status == "written" for o in outcomes)
    assert reads and max(reads) <= CHUNK and sum(reads) == 2 * (24 + 24)


def test_featmap_asked_for_but_missing_is_refused(plain_store):
    with open_store(plain_store, "a") as st:
        [o] = score_methods(st, ["ash-s"], id_split="test", ood=["ood/far/x"], hparams={"ash-s": {"layer": "featmap"}})
    assert o.status == "skipped" and "featmap" in o.reason


# ---- perturbation variants ---------------------------------------------------------------


def _std():
    return torch.tensor(get_spec(MODEL).preprocess.std).view(1, 3, 1, 1)


def test_odin_logits_are_the_perturbed_inputs_logits(perturbed_store, net):
    T, eps = 1000.0, 0.05
    early, mid, fc = net.stages()
    x = _inputs("test").requires_grad_(True)
    logits = fc(mid(early(x)))
    nll = -torch.log_softmax(logits / T, dim=1).gather(1, logits.argmax(1, keepdim=True)).sum()
    grad, = torch.autograd.grad(nll, x)
    with torch.no_grad():
        expect = fc(mid(early(x - eps * torch.sign(grad) / _std()))).numpy()
        clean = fc(mid(early(x))).numpy()
    got, attrs = _read(perturbed_store, "splits/test/digits_cnn-tiny/logits@odin")
    assert attrs["method"] == "odin" and attrs["temperature"] == T and attrs["epsilon"] == eps
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=2e-6)
    assert np.abs(got - clean).max() > 100 * 2e-6  # the step is real, so the check above has teeth
    with open_store(perturbed_store) as st:
        assert st.node_attrs("splits/test/digits_cnn-tiny")["parts"]["perturb"]["logits@odin"]["epsilon"] == eps
    with open_store(perturbed_store, "a") as st:
        [o] = score_methods(st, ["odin"], id_split="test", ood=["ood/far/x"])
        assert o.status == "written", o.reason
        scores = st.read("scores/odin/test")
        assert st.node_attrs("scores/odin/test")["hparams"] == {"temperature": T, "epsilon": eps}
    z = expect.astype(np.float64) / T
    msp = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(scores, (msp / msp.sum(1, keepdims=True)).max(1), rtol=1e-6)


def test_mahalanobis_perturbation_steps_down_the_distance_to_the_closest_class(perturbed_store, net):
    eps = 0.05
    with open_store(perturbed_store) as st:
        train = st.read("splits/train/digits_cnn-tiny/penultimate").astype(np.float64)
        labels = st.read("splits/train/labels")
        assert not st.is_array("splits/train/digits_cnn-tiny/penultimate@mahalanobis")  # the fit split is the reference
        got, attrs = st.read("splits/test/digits_cnn-tiny/penultimate@mahalanobis"), \
            st.node_attrs("splits/test/digits_cnn-tiny/penultimate@mahalanobis")
    assert attrs["method"] == "mahalanobis" and attrs["epsilon"] == eps and attrs["train"] == "train"
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    centred = train - means[np.searchsorted(classes, labels)]
    precision = torch.tensor(np.linalg.pinv(centred.T @ centred / len(train)))
    mu = torch.tensor(means)
    early, mid, fc = net.stages()
    x = _inputs("test").requires_grad_(True)
    f = mid(early(x)).double()
    d = torch.stack([((f - m) @ precision * (f - m)).sum(1) for m in mu], dim=1)
    grad, = torch.autograd.grad(d.min(1).values.sum(), x)
    with torch.no_grad():
        expect = mid(early(x - eps * torch.sign(grad) / _std())).double()
        d_new = torch.stack([((expect - m) @ precision * (expect - m)).sum(1) for m in mu], 1).min(1).values
        clean = f.detach().numpy()
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got - clean).max() > 100 * 1e-5  # the step is real, so the check above has teeth
    with open_store(perturbed_store, "a") as st:
        [o] = score_methods(st, ["mahalanobis-perturbed"], id_split="test", ood=["ood/far/x"])
        assert o.status == "written", o.reason
        np.testing.assert_allclose(st.read("scores/mahalanobis-perturbed/test"),
                                   -d_new.numpy(), rtol=1e-3, atol=1e-3)


def test_score_all_runs_perturbed_scorers_only_where_their_layers_are(perturbed_store, plain_store):
    with open_store(plain_store, "a") as st:
        names = {o.method for o in score_methods(st, ["msp", "odin", "mahalanobis-perturbed"], id_split="test",
                                                  ood=["ood/far/x"], only_applicable=True)}
    assert names == {"msp"}


def test_perturb_strings_are_parsed_with_defaults():
    assert parse_perturb("odin").params == {"temperature": 1000.0, "epsilon": 0.0014}
    assert parse_perturb("mahalanobis:epsilon=0.002").params == {"epsilon": 0.002, "train": "train"}
    assert parse_perturb("odin:epsilon=0,temperature=10").layer == "logits@odin"
    for bad in ("bogus", "odin:temperature", "odin:foo=1", "odin:temperature=abc", "odin:epsilon=-1",
                "odin:temperature=0", "odin:epsilon=nan", "odin:temperature=1,", "mahalanobis:train=../x"):
        with pytest.raises(UsageError):
            parse_perturb(bad)
    with pytest.raises(UsageError, match="twice"):
        parse_perturbations(["odin", "odin:epsilon=0"])


# ---- bad input at the command line: one line, non-zero exit, store untouched -----------------


def _folder(root: Path, classes: int, per_class: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cli")
    imgs = _folder(root / "imgs", 2, 4, 0)
    store = root / "s.zarr"
    from oodcli.cli import main

    assert main(["extract", "--model", MODEL, "--data", f"folder:{imgs}", "--split", "ood/far/a", "--store", str(store),
                 "--batch-size", "4"]) == 0
    return store, imgs


@pytest.mark.parametrize("args,code,says", [
    (["--model", "vit-tiny", "--layers", "logits,featmap"], 2, "only CNN backbones"),
    (["--model", "clip-tiny", "--layers", "image_embeds,featmap"], 2, "only CNN backbones"),
    (["--model", MODEL, "--layers", "logits,logits@odin"], 2, "--perturb"),
    (["--model", MODEL, "--featmap-pool", "2"], 2, "add featmap to --layers"),
    (["--model", MODEL, "--layers", "penultimate,featmap", "--featmap-pool", "9"], 2, "larger than the 8x8"),
    (["--model", MODEL, "--perturb", "odin:temperature"], 2, "KEY=VALUE"),
    (["--model", MODEL, "--perturb", "odin:epsilon=x"], 2, "not a number"),
    (["--model", MODEL, "--perturb", "gradnorm"], 2, "unknown kind"),
    (["--model", "clip-tiny", "--perturb", "odin"], 2, "no 'logits' layer"),
    (["--model", MODEL, "--perturb", "mahalanobis"], 1, "needs the ID train split 'train'"),
    (["--model", MODEL, "--perturb", "mahalanobis:train=test"], 1, "split 'test'"),
])
def test_bad_featmap_and_perturb_requests_leave_the_store_untouched(cli_store, capsys, args, code, says):
    store, imgs = cli_store
    before = _snapshot(store)
    got, out, err = run(capsys, "extract", *args, "--data", f"folder:{imgs}", "--split", "ood/far/b",
                        "--store", store, "--batch-size", "4")
    assert got == code and one_line_error(err) and says in err, err
    assert _snapshot(store) == before


def test_mahalanobis_perturbation_on_a_new_store_without_train_creates_nothing(tmp_path, cli_store, capsys):
    _, imgs = cli_store
    got, _, err = run(capsys, "extract", "--model", MODEL, "--perturb", "mahalanobis", "--data", f"folder:{imgs}",
                      "--split", "ood/far/b", "--store", tmp_path / "new.zarr")
    assert got == 1 and one_line_error(err) and "train" in err
    assert not (tmp_path / "new.zarr").exists()


def test_perturbed_scorers_refuse_splits_perturbed_otherwise_or_not_at_all(tmp_path, one_thread):
    path = _extract_all(tmp_path / "s.zarr", ("logits",), dtype="float32", perturbs=(ODIN,))
    spec = get_spec(MODEL)
    with open_store(path, "a") as st:
        for split, perturbs in (("ood/far/y", (parse_perturb("odin:epsilon=0.01,temperature=1000"),)),
                                ("ood/far/z", ())):
            ex.extract_split(st, spec, None, _data("ood/far/x", 8, 5), split, "ood-far", "test:data",
                             ex.LazyModel(spec, None, "cpu"), ("logits",), batch_size=8, dtype="float32",
                             perturbs=perturbs)
        [other] = score_methods(st, ["odin"], id_split="test", ood=["ood/far/y"])
        [missing] = score_methods(st, ["odin"], id_split="test", ood=["ood/far/z"])
    assert other.status == "skipped" and "different settings (epsilon)" in other.reason
    assert missing.status == "skipped" and "--perturb odin" in missing.reason and "image_embeds" not in missing.reason


def test_the_extract_command_a_missing_split_is_told_repeats_featmap_and_perturb_settings(perturbed_store, tmp_path):
    from oodcli.scoring import extract_command

    with open_store(perturbed_store) as st:
        cmd = extract_command(st, MODEL, "ood/far/x")
    assert "--perturb odin:epsilon=0.05,temperature=1000.0" in cmd and "--dtype float32" in cmd
    assert parse_perturb("odin:epsilon=0.05,temperature=1000.0") == ODIN
    path = tmp_path / "p.zarr"
    with open_store(path, "a") as st:
        spec, (split, role, n, seed) = get_spec(MODEL), SPLITS[1]
        ex.extract_split(st, spec, None, _data(split, 8, seed), split, role, "test:data", ex.LazyModel(spec, None, "cpu"),
                         ("penultimate", "featmap"), batch_size=8, featmap_pool=2)
        assert "--layers penultimate,featmap --featmap-pool 2" in extract_command(st, MODEL, split)


# ---- GRAM on the feature map ------------------------------------------------------------------


def _gram_reference(fmap, powers):
    """Row sums of the full C x C Gram matrix of F^p, then the signed p-th root (the paper's G_p)."""
    out = []
    for a in fmap.astype(np.float64):
        f = a.reshape(a.shape[0], -1)
        rows = []
        for p in range(1, powers + 1):
            s = ((f**p) @ (f**p).T).sum(axis=1)
            rows.append(np.sign(s) * np.abs(s) ** (1 / p))
        out.append(rows)
    return np.array(out)


@pytest.mark.parametrize("confidence", ["msp", "none"])
def test_gram_deviations_match_the_paper(fm_store, confidence):
    powers = 3
    with open_store(fm_store, "a") as st:
        [o] = score_methods(st, ["gram"], id_split="test", ood=["ood/far/x"],
                            hparams={"gram": {"powers": powers, "confidence": confidence}})
        assert o.status == "written", o.reason
        node = "splits/{}/digits_cnn-tiny/{}"
        train_g = _gram_reference(st.read(node.format("train", "featmap")).astype(np.float32), powers)
        train_pred = st.read(node.format("train", "logits")).astype(np.float32).argmax(1)
        lo = {c: train_g[train_pred == c].min(0) for c in np.unique(train_pred)}
        hi = {c: train_g[train_pred == c].max(0) for c in np.unique(train_pred)}
        glo, ghi = train_g.min(0), train_g.max(0)
        for split in ("test", "ood/far/x"):
            g = _gram_reference(st.read(node.format(split, "featmap")).astype(np.float32), powers)
            logits = st.read(node.format(split, "logits")).astype(np.float64)
            pred = logits.argmax(1)
            # Sastry & Oore's code and OpenOOD divide the total deviation by the max softmax probability
            msp = (np.exp(logits - logits.max(1, keepdims=True)) /
                   np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)).max(1)
            expect = []
            for gi, c, conf in zip(g, pred, msp):
                mn, mx = lo.get(c, glo), hi.get(c, ghi)
                dev = np.maximum(mn - gi, 0) / np.abs(mn + 1e-6) + np.maximum(gi - mx, 0) / np.abs(mx + 1e-6)
                expect.append(-dev.sum() / (conf if confidence == "msp" else 1.0))
            np.testing.assert_allclose(st.read(f"scores/gram/{split}"), expect, rtol=1e-4, atol=1e-6)
        from oodcli.scorers import get_scorer

        scorer = get_scorer("gram", powers=powers, confidence=confidence)
        model_id = st.node_attrs(f"splits/test/{MODEL}")["model_id"]
        assert scorer.prepare(st, MODEL, "train", model_id) == "cached"  # the fit written with the scores
        assert (scorer.score(st, MODEL, "train") == 0).all()  # each train sample lies in its class's range


def test_gram_is_left_out_of_score_all_without_a_featmap(plain_store):
    with open_store(plain_store, "a") as st:
        names = {o.method for o in score_methods(st, ["gram", "energy"], id_split="test", ood=["ood/far/x"],
                                                  only_applicable=True)}
    assert names == {"energy"}
