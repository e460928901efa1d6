"""GROOD: the gradient math against autograd, the proximity filter, faiss indexes, the
command line end to end on the digits benchmark (scores against numpy brute force), and
its bad-input paths."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import one_line_error, run
from oodcli import index as faiss_index
from oodcli.cli import main
from oodcli.errors import UsageError
from oodcli.scorers.grood import class_gradients, ood_gradients
from oodcli.store import open_store
from oodcli.synth.grood import proximity_filter

MODEL = "digits_cnn-tiny"
SPLITS = ("train", "test", "ood/near/digits6-9", "ood/far/noise")  # textures left out: the tests stay fast


# ---- the math ----------------------------------------------------------------------------------


def _ncp_loss(h, class_protos, ood_proto, y):
    """Eq. 2-4 written directly in torch: cross-entropy of softmax(-distances) at label y."""
    protos = torch.cat([class_protos, ood_proto[None]])
    logits = -torch.linalg.norm(h[None] - protos, dim=1)
    return -torch.log_softmax(logits, dim=0)[y]


def test_eq5_is_the_autograd_gradient_of_eq4():
    rng = np.random.default_rng(0)
    h, protos, ood = rng.normal(size=(12, 7)), rng.normal(size=(4, 7)), rng.normal(size=7)
    closed = ood_gradients(h, protos, ood)
    for i in range(len(h)):
        y = int(rng.integers(0, 4))  # eq. 5 holds for any ID label
        ood_t = torch.tensor(ood, requires_grad=True)
        _ncp_loss(torch.tensor(h[i]), torch.tensor(protos), ood_t, y).backward()
        np.testing.assert_allclose(closed[i], ood_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    # the norm is p_ood(h)
    logits = -np.linalg.norm(h[:, None] - np.vstack([protos, ood])[None], axis=2)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(closed, axis=1), p[:, -1], rtol=1e-9)


def test_class_gradient_ablation_is_the_autograd_gradient():
    rng = np.random.default_rng(1)
    h, protos, ood = rng.normal(size=(10, 5)), rng.normal(size=(3, 5)), rng.normal(size=5)
    closed = class_gradients(h, protos, ood)
    for i in range(len(h)):
        c = int(np.linalg.norm(protos - h[i], axis=1).argmin())  # the predicted (nearest) class
        protos_t = torch.tensor(protos, requires_grad=True)
        _ncp_loss(torch.tensor(h[i]), protos_t, torch.tensor(ood), c).backward()
        np.testing.assert_allclose(closed[i], protos_t.grad[c].numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9])
def test_proximity_filter_keeps_the_far_share(q):
    d = np.random.default_rng(2).random(1000)
    keep, tau = proximity_filter(d, q)
    assert abs(keep.sum() - round((1 - q) * len(d))) <= 1
    assert d[keep].min() >= tau > (d[~keep].max() if (~keep).any() else -1)


def test_ivf_probing_every_cell_equals_exact_search(tmp_path):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 16))[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)
    q = x[:200] + 0.05
    flat = faiss_index.build(lambda: [x], len(x), 16, kind="flat")
    ivf = faiss_index.build(lambda: [x[:1000], x[1000:]], len(x), 16, kind="ivf", nlist=30, nprobe=30)
    (d0, i0), (d1, i1) = faiss_index.search(flat, q, 5), faiss_index.search(ivf, q, 5)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-5)
    # saved in a store and read back, with what it was built from
    with open_store(tmp_path / "s.zarr", "a") as st:
        st.write_array("vectors", x)
        info = faiss_index.build_in_store(st, "vectors", kind="ivf", nlist=30, nprobe=30)
        loaded, attrs = faiss_index.load(st, "vectors")
        assert attrs["source"] == "vectors" and attrs["rows"] == 3000 and attrs["nprobe"] == 30 == info["nlist"]
        np.testing.assert_array_equal(faiss_index.search(loaded, q, 5)[1], i0)


def test_index_defaults():
    assert faiss_index.resolve(5000)["kind"] == "flat"
    assert faiss_index.resolve(50_000) == {"kind": "ivf", "nlist": 224, "nprobe": 14}
    assert faiss_index.resolve(1_000_000) == {"kind": "ivf", "nlist": 1000, "nprobe": 63}
    with pytest.raises(UsageError):
        faiss_index.resolve(100, "ivf", nlist=500)


# ---- end to end on digits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def grood_store(tmp_path_factory):
    """digits extracted with a tiny CNN, then synthesize (mixup), index and score with the CLI alone."""
    store = tmp_path_factory.mktemp("grood") / "digits.zarr"
    for split in SPLITS:
        assert main(["-q", "extract", "--model", MODEL, "--benchmark", "digits", "--split", split,
                     "--store", str(store)]) == 0
    assert main(["-q", "synthesize", "grood", "--store", str(store)]) == 0
    assert main(["-q", "index", "--store", str(store), "--source", "grads/grood/train"]) == 0
    assert main(["-q", "score", "grood,grood-distance,grood-gradnorm,grood-classgrad", "--store", str(store)]) == 0
    return store


def _copy(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy


def _reference_gradients(h, protos, ood):
    """Eq. 2, 3 and 5 again, plainly in numpy."""
    logits = -np.sqrt(((h[:, None, :] - np.vstack([protos, ood])[None]) ** 2).sum(2))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    diff = h - ood
    return p[:, -1:] * diff / np.linalg.norm(diff, axis=1, keepdims=True)


def _brute_force_kth(queries, train, k=1):
    d = np.sqrt(((queries[:, None, :] - train[None]) ** 2).sum(2))
    return np.sort(d, axis=1)[:, k - 1]


def test_scores_equal_numpy_brute_force(grood_store):
    with open_store(grood_store) as st:
        protos = st.read("fitted/grood/class_prototypes")
        ood = st.read("fitted/grood/ood_prototype")
        train = st.read(f"splits/train/{MODEL}/penultimate").astype(np.float64)
        for split in ("test", "ood/near/digits6-9", "ood/far/noise"):
            h = st.read(f"splits/{split}/{MODEL}/penultimate").astype(np.float64)
            grads, train_grads = _reference_gradients(h, protos, ood), _reference_gradients(train, protos, ood)
            np.testing.assert_allclose(st.read(f"grads/grood/{split}"), grads, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(st.read(f"scores/grood/{split}"), -_brute_force_kth(grads, train_grads),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(st.read(f"scores/grood-distance/{split}"),
                                       np.linalg.norm(h - ood, axis=1), rtol=1e-5)
            np.testing.assert_allclose(st.read(f"scores/grood-gradnorm/{split}"), -np.abs(grads).sum(1), rtol=1e-4)
            c = np.linalg.norm(h[:, None] - protos[None], axis=2).argmin(1)
            ct = np.linalg.norm(train[:, None] - protos[None], axis=2).argmin(1)

            def class_grads(x, cls):
                logits = -np.linalg.norm(x[:, None] - np.vstack([protos, ood])[None], axis=2)
                p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
                diff = x - protos[cls]
                return (p[np.arange(len(x)), cls] - 1)[:, None] * diff / np.linalg.norm(diff, axis=1, keepdims=True)

            np.testing.assert_allclose(st.read(f"scores/grood-classgrad/{split}"),
                                       -_brute_force_kth(class_grads(h, c), class_grads(train, ct)), rtol=1e-4, atol=1e-5)


def test_kth_neighbour(capsys, grood_store, tmp_path):
    store = _copy(grood_store, tmp_path)
    assert run(capsys, "-q", "score", "grood", "--store", store, "-p", "grood.k=5")[0] == 0
    with open_store(store) as st:
        protos, ood = st.read("fitted/grood/class_prototypes"), st.read("fitted/grood/ood_prototype")
        train = _reference_gradients(st.read(f"splits/train/{MODEL}/penultimate").astype(np.float64), protos, ood)
        test = _reference_gradients(st.read(f"splits/test/{MODEL}/penultimate").astype(np.float64), protos, ood)
        np.testing.assert_allclose(st.read("scores/grood/test"), -_brute_force_kth(test, train, 5), rtol=1e-4, atol=1e-5)
        assert st.node_attrs("scores/grood/test")["hparams"]["k"] == 5


def test_mixup_prototypes_follow_eq9(grood_store):
    """Early class means streamed by the command equal a direct pass; candidates follow eq. 9;
    the OOD prototype is the mean of the candidates the filter keeps."""
    from oodcli.backbones.base import get_spec
    from oodcli.data.base import data_root, open_source

    spec = get_spec(MODEL)
    net = spec.build()
    early, mid, fc = net.stages()
    data = open_source("digits:train", data_root(None))
    transform = spec.preprocess.to_transform()
    x = torch.stack([transform(data.load(i)) for i in range(len(data))])
    with torch.no_grad():
        fmap = early(x)
        p_early = torch.stack([fmap[torch.as_tensor(data.labels == c)].mean(0) for c in range(6)])
        c2 = fc(mid(fmap)).topk(2, dim=1).indices[:, 1]
        synthetic = mid(0.5 * fmap + 0.5 * p_early[c2]).numpy()
    with open_store(grood_store) as st:
        np.testing.assert_allclose(st.read("fitted/grood/early_prototypes"), p_early.numpy(), rtol=1e-4, atol=1e-5)
        candidates = st.read("fitted/grood/candidates")
        np.testing.assert_allclose(candidates, synthetic, rtol=1e-4, atol=1e-4)
        protos = st.read("fitted/grood/class_prototypes")
        d = np.linalg.norm(candidates[:, None] - protos[None], axis=2).min(1)
        keep = d >= np.quantile(d, 0.5)
        np.testing.assert_allclose(st.read("fitted/grood/ood_prototype"), candidates[keep].mean(0), rtol=1e-4, atol=1e-5)
        assert st.node_attrs("fitted/grood")["scalars"]["kept"] == keep.sum()


def test_alternative_ood_prototypes(capsys, grood_store, tmp_path):
    store = _copy(grood_store, tmp_path)
    code, out, _ = run(capsys, "-q", "synthesize", "grood", "--store", store, "--ood-prototype", "mean", "--json")
    assert code == 0 and json.loads(out)["status"] == "synthesized"
    with open_store(store) as st:
        np.testing.assert_allclose(st.read("fitted/grood/ood_prototype"), st.read("fitted/grood/class_prototypes").mean(0))
    code, out, _ = run(capsys, "-q", "synthesize", "grood", "--store", store, "--ood-prototype", "val",
                       "--val-split", "ood/far/noise", "--samples", "100", "--quantile", "0.3", "--json")
    result = json.loads(out)
    assert code == 0 and result["candidates"] == 100 and result["kept"] == 70
    code, out, _ = run(capsys, "-q", "synthesize", "grood", "--store", store, "--ood-prototype", "noise", "--json")
    result = json.loads(out)
    assert code == 0 and result["candidates"] == 100 and result["kept"] == 50
    assert all(g["status"] == "written" for g in result["gradients"])
    code, _, err = run(capsys, "score", "grood", "--store", store)  # the old index no longer fits
    assert code == 1 and one_line_error(err) and "rebuild it with 'oodcli index" in err
    assert run(capsys, "-q", "index", "--store", store, "--source", "grads/grood/train")[0] == 0
    assert run(capsys, "-q", "score", "grood", "--store", store)[0] == 0


def test_rerun_is_cached_and_all_includes_grood_once_ready(capsys, grood_store, tmp_path):
    store = _copy(grood_store, tmp_path)
    code, out, _ = run(capsys, "-q", "synthesize", "grood", "--store", store, "--json")
    result = json.loads(out)
    assert code == 0 and result["status"] == "cached"
    assert {g["status"] for g in result["gradients"]} == {"cached"}
    code, out, _ = run(capsys, "-q", "score", "all", "--store", store, "--json")
    assert code == 0 and {"grood", "grood-gradnorm"} <= {r["method"] for r in json.loads(out)}


def test_hdf5_store_and_the_order_of_steps(capsys, tmp_path):
    """On HDF5 too; 'score all' leaves GROOD out until synthesize has run; each missing step is named."""
    store = tmp_path / "d.h5"
    for split in ("train", "test", "ood/far/noise"):
        assert run(capsys, "-q", "extract", "--model", MODEL, "--benchmark", "digits", "--split", split,
                   "--store", store)[0] == 0
    assert run(capsys, "-q", "score", "all", "--store", store)[0] == 0
    assert not open_store(store).exists("scores/grood")
    code, _, err = run(capsys, "score", "grood", "--store", store)
    assert code == 1 and one_line_error(err) and "run 'oodcli synthesize grood" in err
    assert run(capsys, "-q", "synthesize", "grood", "--store", store, "--ood-prototype", "mean")[0] == 0
    code, _, err = run(capsys, "score", "grood", "--store", store)
    assert code == 1 and one_line_error(err) and "no index 'grads/grood/train'" in err
    code, out, _ = run(capsys, "index", "--store", store, "--source", "grads/grood/train", "--kind", "ivf", "--nlist", "8")
    assert code == 0 and "ivf, nlist 8, nprobe 8" in out
    assert run(capsys, "-q", "score", "grood", "--store", store)[0] == 0
    with open_store(store) as st:
        assert np.isfinite(st.read("scores/grood/ood/far/noise")).all()


# ---- bad input --------------------------------------------------------------------------------


def test_backbone_without_early_split(capsys, tmp_path):
    store = tmp_path / "vit.zarr"
    assert run(capsys, "-q", "extract", "--model", "vit-tiny", "--benchmark", "digits", "--split", "train",
               "--store", store)[0] == 0
    code, _, err = run(capsys, "synthesize", "grood", "--store", store)
    assert code == 1 and one_line_error(err) and "no early/mid/head split" in err
    assert not open_store(store).exists("fitted/grood")  # nothing half-written


def test_store_without_train_split(capsys, tmp_path):
    store = tmp_path / "test-only.zarr"
    assert run(capsys, "-q", "extract", "--model", MODEL, "--benchmark", "digits", "--split", "test",
               "--store", store)[0] == 0
    code, _, err = run(capsys, "synthesize", "grood", "--store", store)
    assert code == 1 and one_line_error(err) and "no train split 'train'" in err


def test_index_from_another_gradient_set(capsys, grood_store, tmp_path):
    store = _copy(grood_store, tmp_path)
    assert run(capsys, "-q", "index", "--store", store, "--source", "grads/grood/test", "--name", "other")[0] == 0
    code, _, err = run(capsys, "score", "grood", "--store", store, "-p", "grood.index=other")
    assert code == 1 and one_line_error(err) and "built from 'grads/grood/test', not from 'grads/grood/train'" in err


def test_other_weights_are_refused(capsys, grood_store, tmp_path):
    from oodcli.backbones.digits_cnn import new_digits_cnn, save_digits_cnn

    other = tmp_path / "other.safetensors"
    save_digits_cnn(new_digits_cnn(seed=1), other)
    code, _, err = run(capsys, "synthesize", "grood", "--store", grood_store, "--weights", other)
    assert code == 1 and one_line_error(err) and "are not the ones the store's" in err


BAD = [
    (["synthesize", "grood", "--store", "{store}", "--ood-prototype", "gan"], 2, "unknown --ood-prototype"),
    (["synthesize", "grood", "--store", "{store}", "--val-split", "ood/far/noise"], 2, "--val-split"),
    (["synthesize", "grood", "--store", "{store}", "--quantile", "1.5"], 2, "--quantile"),
    (["synthesize", "grood", "--store", "{store}", "--ood-prototype", "val", "--val-split", "nope"], 1, "no split 'nope'"),
    (["synthesize", "grood", "--store", "{tmp}/missing.zarr"], 1, "no store at"),
    (["index", "--store", "{store}", "--source", "grads/grood/nope"], 1, "has no array 'grads/grood/nope'"),
    (["index", "--store", "{store}", "--source", "splits/test/labels"], 1, "2-D float array"),
    (["index", "--store", "{store}", "--source", "grads/grood/train", "--kind", "hnsw"], 2, "unknown index kind"),
    (["index", "--store", "{store}", "--source", "grads/grood/train", "--kind", "ivf", "--nlist", "100000"], 2, "--nlist"),
    (["score", "grood", "--store", "{store}", "-p", "grood.index=nope"], 1, "no index 'nope'"),
    (["score", "grood", "--store", "{store}", "-p", "grood.k=100000"], 2, "grood.k=100000"),
]


@pytest.mark.parametrize("args,code,needle", BAD, ids=[" ".join(a[:2] + a[4:]) for a, _, _ in BAD])
def test_bad_input_is_one_line(capsys, grood_store, tmp_path, args, code, needle):
    args = [a.format(store=grood_store, tmp=tmp_path) for a in args]
    got, _, err = run(capsys, *args)
    assert got == code and one_line_error(err) and needle in err, err


@pytest.mark.parametrize("method", ["grood", "grood-gradnorm", "grood-classgrad"])
def test_detector_scores_new_images_with_eq5_per_batch(grood_store, method):
    """New images get eq. 5's gradients in memory and the index search: the stored scores exactly."""
    from oodcli.deploy import Detector

    det = Detector.from_store(grood_store, method, threshold=None, batch_size=100)
    with open_store(grood_store) as st:
        stored = st.read(f"scores/{method}/ood/near/digits6-9")
        assert not st.exists("grads/grood/new")
    assert np.array_equal(det.score("digits:ood/near/digits6-9"), stored.astype(np.float32))
