"""APM / PALM training pieces, the PAOS score, collisions, and the pipeline through the CLI."""

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from conftest import one_line_error, run
from oodcli.collisions import find_collisions, separation
from oodcli.scoring import score_store
from oodcli.store import open_store
from oodcli.train.apex import (
    ApexConfig,
    PrototypeMixture,
    assignment_weights,
    ema_prototypes,
    log_posterior,
    proto_contrastive_loss,
    read_model,
    sinkhorn,
    train_end_to_end,
    train_head_only,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def unit(rng, n, d):
    return torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32), dim=1)


# ---- the pieces -------------------------------------------------------------------------------


def test_sinkhorn_plan_has_the_marginals():
    rng = np.random.default_rng(0)
    z, p = unit(rng, 60, 8), unit(rng, 4, 8)
    w = sinkhorn(z @ p.T, epsilon=0.05, iters=3)
    assert torch.allclose(w.sum(1), torch.ones(60), atol=1e-5)  # every sample's weights sum to one
    w = sinkhorn(z @ p.T, epsilon=0.05, iters=300)
    assert torch.allclose(w.sum(0), torch.full((4,), 15.0), atol=1e-3)  # equal share per prototype
    # per class: samples only reach their own class's prototypes, each class its own problem
    labels = torch.as_tensor(rng.integers(0, 2, 60))
    proto_class = torch.tensor([0, 1, 1, 1])
    w = sinkhorn(z @ p.T, 0.05, 300, labels, proto_class)
    assert (w[labels[:, None] != proto_class[None, :]] == 0).all()
    assert torch.allclose(w.sum(1), torch.ones(60), atol=1e-5)
    n1 = int((labels == 1).sum())
    assert torch.allclose(w[:, 1:].sum(0), torch.full((3,), n1 / 3), atol=1e-3)
    alone = sinkhorn(z[labels == 1] @ p[1:].T, 0.05, 300)
    assert torch.allclose(w[labels == 1][:, 1:], alone, atol=1e-5)


def test_posterior_of_eq3_sums_to_one_and_matches_the_formula():
    rng = np.random.default_rng(1)
    k = [1, 3, 2]
    proto_class = torch.repeat_interleave(torch.arange(3), torch.tensor(k))
    z, p = unit(rng, 20, 16), unit(rng, 6, 16)
    labels = torch.as_tensor(rng.integers(0, 3, 20))
    w = assignment_weights(z, labels, p, proto_class, 0.05, 3)
    for c in range(3):  # every class block is a mixture: its weights sum to one per sample
        assert torch.allclose(w[:, proto_class == c].sum(1), torch.ones(20), atol=1e-5)
    post = log_posterior(z, p, proto_class, w, 0.1, 3).exp()
    assert torch.allclose(post.sum(1), torch.ones(20), atol=1e-5)
    i = 4  # eq. (3) written out for one sample
    mix = [float((w[i, proto_class == c] * torch.exp(p[proto_class == c] @ z[i] / 0.1)).sum()) for c in range(3)]
    assert np.allclose(post[i].numpy(), np.array(mix) / sum(mix), rtol=1e-4)


def test_ema_keeps_prototypes_on_the_sphere():
    rng = np.random.default_rng(2)
    p = unit(rng, 6, 8)
    proto_class = torch.tensor([0, 0, 0, 1, 1, 1])
    for step in range(5):
        z = unit(rng, 10, 8)
        labels = torch.zeros(10, dtype=torch.long)  # class 1 gets no sample
        w = assignment_weights(z, labels, p, proto_class, 0.05, 3)
        new = ema_prototypes(p, proto_class, z, labels, w, beta=0.3)
        assert torch.allclose(new.norm(dim=1), torch.ones(6), atol=1e-6)
        assert torch.allclose(new[3:], p[3:], atol=1e-6)  # untouched without samples
        assert not torch.allclose(new[:3], p[:3])
        p = new


def test_prototype_contrastive_loss_handles_a_single_prototype_class():
    rng = np.random.default_rng(3)
    p = unit(rng, 5, 8).requires_grad_()
    proto_class = torch.tensor([0, 1, 1, 2, 2])  # class 0 has K = 1
    loss = proto_contrastive_loss(p, proto_class, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    sim = (p @ p.T / 0.1).detach().numpy()
    same = proto_class[:, None] == proto_class[None, :]
    want = []
    for j in range(5):
        log_z = logsumexp(sim[j][~same[j].numpy()])
        sibs = same[j].numpy() & (np.arange(5) != j)
        want.append(log_z - (logsumexp(sim[j][sibs]) if sibs.any() else 0.0))
    assert loss.item() == pytest.approx(np.mean(want), rel=1e-5)


def test_separation_and_collisions():
    v = np.array([[1, 0, 0], [0.99995, 0.01, 0], [0, 1, 0], [0, 0, 1], [0, 0.6, 0.8]], dtype=np.float64)
    classes = np.array([0, 1, 1, 2, 2])
    q_s = separation(v, classes)
    assert q_s[0] == pytest.approx(1 - v[1] @ v[0] / np.linalg.norm(v[1]), abs=1e-9)
    r = find_collisions(v, classes, 1e-2, ["a", "b", "c"])
    assert r["colliding_prototypes"] == 2 and r["colliding_pairs"] == 1 and r["share"] == pytest.approx(0.4)
    assert r["pairs"][0]["class_a"] == "a" and r["pairs"][0]["class_b"] == "b"
    assert r["min_q_s"] < 1e-4 and (r["k_min"], r["k_max"]) == (1, 2)


# ---- training on a synthetic store ------------------------------------------------------------------


def make_store(path, seed=0, dim=16, classes=3, prototypes=True):
    """Features of `classes` separable classes (two modes each) and a far OOD split; optional prototypes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, 2, dim))
    with open_store(path, "a") as st:
        for split, n in (("train", 240), ("test", 90), ("ood/far/x", 80)):
            ood = split.startswith("ood")
            labels = np.full(n, -1) if ood else np.arange(n) % classes
            x = (rng.normal(0, 6, (n, dim)) if ood else centres[labels, rng.integers(0, 2, n)]) + rng.normal(size=(n, dim))
            node = f"splits/{split}"
            st.write_array(f"{node}/labels", labels.astype(np.int64))
            st.write_array(f"{node}/ids", np.arange(n))
            st.set_attrs(node, role="ood-far" if ood else "id", n=n)
            st.create_array(f"{node}/m/penultimate", (n, dim), np.float32, chunk_rows=64)
            st.write_rows(f"{node}/m/penultimate", 0, x.astype(np.float32))
            st.set_attrs(f"{node}/m", complete=True, rows_done=n, model_id="m1", fingerprint=f"fp-{split}",
                         parts={"backbone": "m", "weights": "m1"})
        if prototypes:
            k = 2 * classes
            st.write_array("backbones/m/prototypes/vectors", unit(rng, k, dim).numpy())
            st.write_array("backbones/m/prototypes/classes", np.repeat(np.arange(classes), 2))
            st.write_array("backbones/m/prototypes/q_c", rng.uniform(0.2, 0.9, k).astype(np.float32))
            st.write_array("backbones/m/prototypes/q_s", rng.uniform(0.0, 1.5, k).astype(np.float32))
            st.set_attrs("backbones/m", model_id="m1")
    return path


def reference_paos(train, labels, x, q, proto_class, alpha, tau_q):
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    diff = train - means[labels]
    precision = np.linalg.pinv(diff.T @ diff / len(train))
    d = np.stack([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], 1)
    conf = np.array([tau_q * logsumexp(q[proto_class == c] / tau_q) for c in classes])
    return -(d / (1 + alpha * conf)).min(1)


def test_paos_is_mahalanobis_at_alpha_zero_and_follows_eq13(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with open_store(path, "r+") as st:
        score_store(st, ["mahalanobis", "apex", "palm"], hparams={"apex": {"alpha": 0.0}})
        maha, paos0, palm = (st.read(f"scores/{m}/ood/far/x") for m in ("mahalanobis", "apex", "palm"))
        np.testing.assert_allclose(paos0, maha, rtol=1e-6)
        np.testing.assert_allclose(palm, maha, rtol=1e-6)
        train = st.read("splits/train/m/penultimate").astype(np.float64)
        labels = st.read("splits/train/labels")
        x = st.read("splits/test/m/penultimate").astype(np.float64)
        q_c, q_s = st.read("backbones/m/prototypes/q_c"), st.read("backbones/m/prototypes/q_s")
        proto_class = st.read("backbones/m/prototypes/classes")
        for hp, q in (({}, q_c + q_s), ({"cohesion": False}, q_s), ({"separation": False, "tau_q": 0.5}, q_c)):
            score_store(st, ["apex"], hparams={"apex": hp})
            want = reference_paos(train, labels, x, q.astype(np.float64), proto_class, 0.5, hp.get("tau_q", 1.0))
            np.testing.assert_allclose(st.read("scores/apex/test"), want, rtol=1e-5)


def test_paos_needs_prototypes_and_all_skips_it(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr", prototypes=False)
    code, _, err = run(capsys, "score", "apex", "--store", path)
    assert code == 1 and one_line_error(err) and "no prototypes" in err
    code, out, _ = run(capsys, "-q", "score", "all", "--store", path, "--json")
    assert code == 0 and not {"apex", "palm"} & {r["method"] for r in json.loads(out)}


def test_short_head_only_run_lowers_the_loss_and_saves_the_model(tmp_path):
    path = make_store(tmp_path / "s.zarr", prototypes=False)
    cfg = ApexConfig(epochs=40, batch_size=64, lr=0.1, proto_momentum=0.9, embed_dim=8)
    with open_store(path) as st:
        result = train_head_only(st, "m", "apex", select_k={0: 1, 1: 2, 2: 3}, cfg=cfg, out=tmp_path / "a.safetensors")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0 and result.train_accuracy > 0.9
    meta, tensors = read_model(tmp_path / "a.safetensors")
    assert meta["method"] == "apex" and meta["mode"] == "head-only" and meta["base_layer"] == "penultimate"
    assert tensors["prototypes"].shape == (6, 8) and tensors["proto_class"].tolist() == [0, 1, 1, 2, 2, 2]
    assert torch.allclose(tensors["prototypes"].norm(dim=1), torch.ones(6), atol=1e-5)
    q_c, q_s = tensors["q_c"].numpy(), tensors["q_s"].numpy()
    assert ((q_c > 0) & (q_c <= 1)).all() and np.allclose(q_s, separation(tensors["prototypes"].numpy(), [0, 1, 1, 2, 2, 2]))


def test_tracked_cohesion_is_the_mean_cosine_of_assigned_samples():
    protos = PrototypeMixture([2], 4, momentum=0.5)
    z = torch.nn.functional.normalize(protos.vectors[[0, 0, 1]] + 0.1, dim=1)
    w = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    protos._track_cohesion(z, torch.zeros(3, dtype=torch.long), w)
    cos = (z * protos.vectors[[0, 0, 1]]).sum(1)
    assert np.allclose(protos.q_c(), [cos[:2].mean().item(), cos[2].item()], atol=1e-6)  # bias-corrected


def test_end_to_end_run_saves_an_encoder_that_extract_can_build(tmp_path, monkeypatch, images):
    import oodcli.data.base
    from oodcli.backbones import get_spec

    small = images("small", 48, labels=np.arange(48) % 6)  # digits' 6 classes, fewer images
    monkeypatch.setattr(oodcli.data.base, "open_source", lambda spec, root, is_ood=False: small)
    cfg = ApexConfig(epochs=2, batch_size=16, lr=0.05, embed_dim=16)
    out = tmp_path / "p.safetensors"
    result = train_end_to_end("digits", "digits_cnn-tiny", "palm", k=2, cfg=cfg, out=out, device="cpu", flip=False)
    assert result.mode == "end-to-end" and result.prototypes == 12 and np.isfinite(result.final_loss)
    spec = get_spec("palm").for_weights(str(out))
    assert spec.preprocess == get_spec("digits_cnn-tiny").preprocess
    net = spec.build(str(out))
    layers = net(torch.zeros(2, 3, 32, 32))
    assert layers["embedding"].shape == (2, 16) and layers["penultimate"].shape == (2, 128)
    assert set(net.extras()) == {"prototypes/vectors", "prototypes/classes", "prototypes/q_c", "prototypes/q_s"}


# ---- the pipeline through the CLI -----------------------------------------------------------------


def test_cli_select_k_train_extract_score_collisions(tmp_path, capsys):
    store = tmp_path / "d.zarr"
    splits = ["--split", "train", "--split", "test", "--split", "ood/far/noise"]
    assert run(capsys, "-q", "extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--store", store, *splits)[0] == 0
    code, _, err = run(capsys, "train", "apex", "--head-only", "--store", store)
    assert code == 1 and one_line_error(err) and "select-k" in err
    assert run(capsys, "-q", "select-k", "--store", store, "--k-range", "1..3")[0] == 0
    fast = ["--epochs", "20", "--batch-size", "128", "--proto-momentum", "0.9", "--lr", "0.1"]
    code, out, _ = run(capsys, "-q", "train", "apex", "--head-only", "--store", store, *fast, "--json")
    assert code == 0
    trained = json.loads(out)
    assert trained["path"] == str(tmp_path / "d-apex.safetensors") and np.isfinite(trained["final_loss"])
    code, _, err = run(capsys, "extract", "--model", "palm", "--weights", trained["path"], "--benchmark", "digits",
                       "--store", store)
    assert code == 2 and one_line_error(err) and "--model apex" in err
    assert run(capsys, "-q", "extract", "--model", "apex", "--weights", trained["path"], "--benchmark", "digits",
               "--store", store, *splits)[0] == 0
    code, out, _ = run(capsys, "-q", "score", "all", "--store", store, "--backbone", "apex",
                       "-p", "apex.layer=embedding", "-p", "palm.layer=embedding", "--json")
    assert code == 0 and {"apex", "palm"} <= {r["method"] for r in json.loads(out)}
    code, out, _ = run(capsys, "report", "--store", store, "--methods", "apex,palm", "--json")
    assert code == 0 and 0.0 <= json.loads(out)["methods"]["apex"]["sets"]["ood/far/noise"]["auroc"] <= 1.0
    code, out, _ = run(capsys, "analyze", "collisions", "--store", store, "--json")
    assert code == 0 and json.loads(out)["apex"]["prototypes"] == trained["prototypes"]
    code, out, _ = run(capsys, "analyze", "collisions", "--weights", trained["path"])
    assert code == 0 and "colliding prototypes" in out


def test_cli_usage_errors(tmp_path, capsys):
    for args, text in (
        (["train", "apex", "--head-only"], "--store"),
        (["train", "palm", "--benchmark", "digits"], "--model"),
        (["train", "palm", "--head-only", "--store", "x.zarr", "--k-from", "y.zarr"], "--k-from"),
        (["train", "apex", "--benchmark", "digits", "--model", "digits_cnn-tiny", "--k", "3"], "fixed K"),
        (["train", "palm", "--head-only", "--store", "x.zarr", "--tau", "0"], "tau"),
        (["analyze", "collisions"], "--store"),
    ):
        code, _, err = run(capsys, *args)
        assert code == 2 and one_line_error(err) and text in err, (args, err)
    path = make_store(tmp_path / "s.zarr", prototypes=False)
    code, _, err = run(capsys, "analyze", "collisions", "--store", path)
    assert code == 1 and one_line_error(err) and "no prototypes" in err
    assert not (tmp_path / "s-palm.safetensors").exists()
