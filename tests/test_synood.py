"""SynOOD on cached CLIP features: the synthetic role, D_in*'s complexity rule, the losses of
eq. 12 and 14, training (projection + learnable negatives) and ``score synood``.

A random-initialised tiny CLIP, the embedded digits as ID data, a folder of generated PNGs
as the synthetic split and a fake WordNet of a few lines: nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import one_line_error, run
from oodcli.data.base import open_source, role_from_name
from oodcli.store import open_store
from oodcli.train import synood as S
from test_clip import ADJS, NOUNS, _save_tiny

NAMES = ["zero", "one", "two", "three", "four", "five"]
SYN = "synthetic/synood"
M_SYN = 42  # synthetic images (every 12th of 500 texture crops)
NEG = ["--num-negatives", "12"]
GROUPS = ["-p", "neglabel.num_negatives=12", "-p", "neglabel.ngroup=3"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _synthetic_folder(folder):
    """Stand-ins for generated images: every 12th texture crop of the embedded digits, as PNG files."""
    folder.mkdir(parents=True)
    textures = open_source("digits:ood/far/textures", folder)
    for k, i in enumerate(range(0, len(textures), 12)):
        textures.load(i).save(folder / f"{k:03d}.png")
    return folder


def _extract(store, weights, *args, layers="image_embeds,penultimate"):
    from oodcli.cli import main

    base = ["-q", "extract", "--model", "clip-tiny", "--weights", weights, "--layers", layers,
            "--dtype", "float32", "--store", store]
    assert main([str(a) for a in base + list(args)]) == 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny CLIP, its digits store with a synthetic split, and a fake WordNet."""
    root = tmp_path_factory.mktemp("synood")
    weights, store = root / "tiny.safetensors", root / "digits_clip.zarr"
    _save_tiny(weights, seed=1)
    _extract(store, weights, "--benchmark", "digits", "--split", "train", "--split", "test",
             "--split", "ood/near/digits6-9")
    _extract(store, weights, "--data", f"folder:{_synthetic_folder(root / 'syn')}", "--split", SYN,
             "--role", "synthetic")
    wordnet = root / "wordnet"
    wordnet.mkdir()
    (wordnet / "data.noun").write_text(NOUNS)
    (wordnet / "data.adj").write_text(ADJS)
    return {"root": root, "weights": weights, "store": store, "wordnet": wordnet}


def _copy(env, tmp_path, name="copy.zarr"):
    copy = tmp_path / name
    shutil.copytree(env["store"], copy)
    return copy


def _read(store, node):
    with open_store(store) as st:
        return st.read(node)


def _train(capsys, store, env, out, *extra):
    code, stdout, err = run(capsys, "-q", "train", "synood", "--store", store, "--out", out,
                            "--wordnet", env["wordnet"], *NEG, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def _file(out):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["oodcli_prompts"])
    return load_file(str(out)), meta


# ---- the losses are their formulas --------------------------------------------------------------


def test_projection_and_label_losses_follow_eq_12_and_14():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    protos = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    chosen = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    targets = torch.tensor([3, 4, 0, 2, 1])  # 3, 4: paired negatives; 0-2: ID classes
    tau = 0.07
    labels = torch.cat([protos, chosen]).double().numpy()
    want = 0.0
    for x, t in zip(image.double().numpy(), targets.tolist()):
        s = labels @ x / tau
        want += -(s[t] - np.log(np.exp(s).sum()))
    assert S.projection_loss(image, protos, chosen, targets, tau).item() == pytest.approx(want / 5, rel=1e-5)

    raw = torch.randn(3, 4, generator=g) * 2  # learnable features need not be unit: the loss normalises
    paired = torch.tensor([2, 0, 0, 1, 2])
    unit = (raw / raw.norm(dim=1, keepdim=True)).double().numpy()
    want = 0.0
    for x, t in zip(image.double().numpy(), paired.tolist()):
        s = unit @ x / tau
        want += -np.log(np.exp(s[t]) / np.exp(s).sum())
    assert S.label_loss(image, raw, paired, tau).item() == pytest.approx(want / 5, rel=1e-5)

    with torch.no_grad():
        proj = S.Projection(4, "linear")
        assert torch.allclose(proj(image), image, atol=1e-6)  # starts as the identity
        assert torch.allclose(proj(3 * image), image, atol=1e-6)  # reads the unit feature


def test_authors_projection_is_a_residual_layernorm_block_on_the_raw_feature():
    """delta(f) = f + ReLU(LayerNorm(W f + b)), normalised, written out in numpy."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    proj = S.Projection(6, "authors")
    with torch.no_grad():
        proj.norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
        proj.norm.bias.copy_(torch.randn(6, generator=g) * 0.1)
        f = torch.randn(5, 6, generator=g) * 4  # unnormalised, as CLIP's encode_image
        got = proj(f).double().numpy()
    w, b = proj.linear.weight.double().detach().numpy(), proj.linear.bias.double().detach().numpy()
    gamma, beta = proj.norm.weight.double().detach().numpy(), proj.norm.bias.double().detach().numpy()
    x = f.double().numpy()
    h = x @ w.T + b
    h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5) * gamma + beta
    want = x + np.maximum(h, 0)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(proj(f / f.norm(dim=1, keepdim=True)).detach().numpy(), got, atol=1e-3)  # the norm of f matters
    assert not torch.allclose(proj.linear.weight, torch.eye(6))  # random start, not the identity
    again = S.Projection.from_tensors({k: v.detach() for k, v in proj.tensors().items()}, "authors")
    assert torch.equal(again(f), proj(f).detach())


# ---- D_in*: JPEG bytes per pixel ---------------------------------------------------------------


def test_complex_rows_take_the_top_of_each_class_then_the_most_complex_left():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    cx = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.05, 0.04])
    # m = 4: 4 // 3 = 1 per class (rows 1, 5, 6), the 1 left: the most complex unchosen (row 2)
    assert S.complex_rows(cx, labels, 4).tolist() == [1, 2, 5, 6]
    assert S.complex_rows(cx, labels, 6).tolist() == [1, 2, 3, 5, 6, 7]
    assert S.complex_rows(cx, labels, 100).tolist() == list(range(8))
    # a class with fewer images than its quota leaves its slots to the most complex others
    assert S.complex_rows(np.array([0.1, 0.9, 0.5, 0.3]), np.array([0, 0, 0, 1]), 4).tolist() == [0, 1, 2, 3]


def test_bytes_per_pixel_of_jpeg_files_and_of_other_images(tmp_path):
    folder = tmp_path / "imgs"  # flat: one unlabelled set
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "x.jpg", quality=90)
    png = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(png).save(folder / "y.png")
    data = open_source(f"folder:{folder}", tmp_path)
    by_name = {p.name: i for i, p in enumerate(data.files)}
    assert S.jpeg_bytes_per_pixel(data, by_name["x.jpg"]) == (folder / "x.jpg").stat().st_size / 600
    buf = io.BytesIO()
    Image.fromarray(png).save(buf, "JPEG", quality=75)
    assert S.jpeg_bytes_per_pixel(data, by_name["y.png"]) == len(buf.getvalue()) / 256


# ---- the synthetic role ----------------------------------------------------------------------------


def test_synthetic_split_is_training_data_never_a_test_set(capsys, tmp_path, env):
    copy = _copy(env, tmp_path)
    assert role_from_name("synthetic/grad") == "synthetic" and role_from_name("ood/far/x") == "ood-far"
    assert (_read(copy, f"splits/{SYN}/labels") == -1).all()
    code, out, _ = run(capsys, "store", "info", copy, "--json")
    assert code == 0 and json.loads(out)["splits"][SYN]["role"] == "synthetic"
    code, out, err = run(capsys, "store", "verify", copy)
    assert code == 0, out + err
    assert run(capsys, "-q", "score", "mcm,neglabel", "--store", copy, "-p", f"neglabel.wordnet={env['wordnet']}",
               *GROUPS)[0] == 0
    with open_store(copy) as st:
        assert not st.exists(f"scores/mcm/{SYN}") and not st.exists(f"scores/neglabel/{SYN}")
        assert st.exists("scores/mcm/test") and st.exists("scores/mcm/ood/near/digits6-9")
    code, out, _ = run(capsys, "report", "--store", copy, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["id_split"] == "test" and list(report["ood_splits"]) == ["ood/near/digits6-9"]
    # a synthetic split with a class label is flagged
    with open_store(copy, "r+") as st:
        labels = st.read(f"splits/{SYN}/labels")
        labels[0] = 2
        st.write_array(f"splits/{SYN}/labels", labels)
    code, out, err = run(capsys, "store", "verify", copy)
    assert code != 0 and "synthetic OOD split with class labels" in out + err


# ---- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """Default training through the library, with the image encoder's builder booby-trapped."""
    import open_clip.model

    out = tmp_path_factory.mktemp("trained") / "synood.safetensors"
    store = env["store"]
    protos_node = "fitted/text/clip-tiny/digits"
    mp = pytest.MonkeyPatch()

    def no_vision(*args, **kwargs):
        raise AssertionError("the image encoder must not be built while training SynOOD")

    mp.setattr(open_clip.model, "_build_vision_tower", no_vision)
    try:
        result = S.train_synood(store, out, wordnet=str(env["wordnet"]), num_negatives=12)
    finally:
        mp.undo()
    with open_store(store) as st:
        cache = {n: st.read(f"{protos_node}/{n}/embeds") for n in st.children(protos_node)}
    return out, result, cache


def test_training_moves_only_the_projection_and_the_learned_negatives(env, trained):
    out, result, cache = trained
    tensors, meta = _file(out)
    clip_negs = cache["neglabel"]  # NegLabel's mined set, from its cache
    assert torch.equal(tensors["negatives_clip"], torch.from_numpy(clip_negs))
    # pairing: each synthetic image's most similar negative label; Y*- = those chosen
    syn = F.normalize(torch.from_numpy(_read(env["store"], f"splits/{SYN}/clip-tiny/image_embeds")), dim=-1)
    chosen = sorted(set((syn @ torch.from_numpy(clip_negs).T).argmax(dim=1).tolist()))
    learned = tensors["learned"].bool()
    assert torch.nonzero(learned)[:, 0].tolist() == chosen and meta["M_prime"] == len(chosen) == result.learned
    assert 2 <= len(chosen) < 12  # a real choice between labels: eq. 14's softmax is not trivial
    assert torch.equal(tensors["negatives"][~learned], tensors["negatives_clip"][~learned])  # fixed ones bit-identical
    assert not torch.allclose(tensors["negatives"][learned], tensors["negatives_clip"][learned])
    assert torch.allclose(tensors["negatives"].norm(dim=1), torch.ones(12), atol=1e-5)
    w, b = tensors["projection.weight"], tensors["projection.bias"]
    assert w.shape == (32, 32) and not torch.allclose(w, torch.eye(32)) and b.abs().max() > 0
    assert tensors["projection.norm.weight"].shape == (32,) and not torch.equal(tensors["projection.norm.weight"], torch.ones(32))
    assert meta["projection"]["kind"] == "authors" and meta["projection"]["input"] == "penultimate"
    # the authors' cosine decay, stepped per epoch: 1e-3, then eta_min + (1e-3 - eta_min)(1 + cos(pi t / 3)) / 2
    lrs = [row["lr"] for row in meta["projection"]["history"]]
    assert lrs == pytest.approx([1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * t / 3)) / 2 for t in range(3)])
    assert [row["lr"] for row in meta["labels"]["history"]] == [2e-3] * 5  # step (c): constant SGD
    # the ID prototypes: the cached ones are untouched by training and scoring reads them back
    with open_store(env["store"]) as st:
        again = st.read("fitted/text/clip-tiny/digits/t-" + _template_key() + "/embeds")
    assert np.array_equal(again, cache["t-" + _template_key()])
    # metadata
    assert meta["method"] == "synood" and meta["m"] == M_SYN and meta["M"] == 12 and meta["class_names"] == NAMES
    assert meta["synthetic"][0]["split"] == SYN and meta["synthetic"][0]["fingerprint"]
    assert meta["neglabel"]["num_negatives"] == 12 and len(meta["negative_words"]) == 12
    assert len(meta["projection"]["history"]) == 3 and len(meta["labels"]["history"]) == 5
    assert meta["projection"]["lr"] == 1e-3 and meta["labels"]["lr"] == 2e-3 and meta["temperature"] > 0
    for step in ("projection", "labels"):  # one step per epoch here: epoch 1's loss is the starting loss
        losses = [row["loss"] for row in meta[step]["history"]]
        assert losses[-1] < losses[0]
    assert result.pairing_before == 1.0  # the pairs are the nearest labels at the start


def test_training_is_seeded(env, trained, tmp_path):
    again = tmp_path / "again.safetensors"
    S.train_synood(env["store"], again, wordnet=str(env["wordnet"]), num_negatives=12)
    first, second = _file(trained[0])[0], _file(again)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)


def _template_key():
    from oodcli.store import digest

    return digest("The nice {}")[:10]


def test_d_in_star_is_the_most_complex_digits_per_class(env, trained):
    """Recomputed here: the digits' images JPEG-encoded at quality 75, bytes / pixel, top per class."""
    meta = _file(trained[0])[1]
    data = open_source("digits:train", env["root"])
    ids = _read(env["store"], "splits/train/ids")
    labels = _read(env["store"], "splits/train/labels")
    cx = []
    for i in ids:
        img = data.load(int(i)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        cx.append(len(buf.getvalue()) / (img.width * img.height))
    cx = np.array(cx)
    picked = np.array(meta["in_rows"])
    quota = M_SYN // 6
    assert len(picked) == M_SYN
    for c in range(6):
        mine = picked[labels[picked] == c]
        assert len(mine) >= quota
        # nothing left out of this class is more complex than the least complex of its top quota
        top = np.sort(cx[mine])[::-1][:quota]
        others = np.setdiff1d(np.flatnonzero(labels == c), mine)
        assert cx[others].max() <= top.min()
    # the slots past the quotas went to the most complex of the rest
    extra = [r for c in range(6) for r in sorted(picked[labels[picked] == c], key=lambda r: -cx[r])[quota:]]
    rest = np.setdiff1d(np.arange(len(labels)), picked)
    assert not extra or cx[rest].max() <= min(cx[extra])


# ---- scoring ------------------------------------------------------------------------------------


def _scores(store, method, split="test"):
    return _read(store, f"scores/{method}/{split}").astype(np.float64)


def _reference(store, file, split, projection=True, ft=True, ngroup=3, tau=0.01, seed=0):
    """Eq. 2 with NegLabel's grouping, written out: projected image, the file's negatives."""
    tensors, _ = _file(file)
    protos = _read(store, "fitted/text/clip-tiny/digits/t-" + _template_key() + "/embeds").astype(np.float64)
    negs = (tensors["negatives"] if ft else tensors["negatives_clip"]).double().numpy()
    x = _read(store, f"splits/{split}/clip-tiny/image_embeds").astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w, b = tensors["projection.weight"].double().numpy(), tensors["projection.bias"].double().numpy()
    if projection and "projection.norm.weight" in tensors:  # the authors' block on the raw feature
        f = _read(store, f"splits/{split}/clip-tiny/penultimate").astype(np.float64)
        h = f @ w.T + b
        h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
        x = f + np.maximum(h * tensors["projection.norm.weight"].double().numpy()
                           + tensors["projection.norm.bias"].double().numpy(), 0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    elif projection:
        x = x @ w.T + b
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    size = len(negs) // ngroup
    groups = negs[np.random.default_rng(seed).permutation(len(negs))[: size * ngroup]].reshape(ngroup, size, -1)
    out = []
    for v in x:
        pos = np.exp(v @ protos.T / tau).sum()
        out.append(np.mean([pos / (pos + np.exp(v @ g.T / tau).sum()) for g in groups]))
    return np.array(out)


def test_score_synood_is_neglabel_with_the_trained_pieces(capsys, tmp_path, env, trained):
    out = trained[0]
    copy = _copy(env, tmp_path)
    wn = ["-p", f"neglabel.wordnet={env['wordnet']}", *GROUPS]
    assert run(capsys, "-q", "score", "neglabel", "--store", copy, *wn)[0] == 0
    neglabel = _scores(copy, "neglabel")

    def synood(*flags, file=out, name="synood"):
        code, _, err = run(capsys, "-q", "score", "synood", "--store", copy, "--as", name,
                           "-p", f"synood.prompts={file}", "-p", "synood.ngroup=3", *flags)
        assert code == 0, err
        return _scores(copy, name)

    # both switches off: NegLabel with the same negatives and groups, exactly
    np.testing.assert_array_equal(synood("-p", "synood.projection=false", "-p", "synood.ft_labels=false",
                                         name="off"), neglabel)
    full = synood()
    np.testing.assert_allclose(full, _reference(copy, out, "test"), rtol=1e-4)
    np.testing.assert_allclose(synood("-p", "synood.projection=false", name="ft"),
                               _reference(copy, out, "test", projection=False), rtol=1e-4)
    np.testing.assert_allclose(synood("-p", "synood.ft_labels=false", name="proj"),
                               _reference(copy, out, "test", ft=False), rtol=1e-4)
    assert not np.allclose(full, neglabel)
    # the linear reading: scored on the unit feature by its own map; untrained (identity, CLIP's
    # negatives) it scores as NegLabel does
    linear = tmp_path / "linear.safetensors"
    _train(capsys, copy, env, linear, "--projection", "linear", "--proj-schedule", "constant")
    assert _file(linear)[1]["projection"]["kind"] == "linear" and "projection.norm.weight" not in _file(linear)[0]
    np.testing.assert_allclose(synood(file=linear, name="linear"), _reference(copy, linear, "test"), rtol=1e-4)
    untrained = tmp_path / "identity.safetensors"
    _train(capsys, copy, env, untrained, "--projection", "linear", "--proj-epochs", "0", "--label-epochs", "0")
    np.testing.assert_allclose(synood(file=untrained, name="identity"), neglabel, rtol=1e-5, atol=1e-7)
    # the ID prototypes scoring uses are the cached ones, unchanged by training
    assert np.array_equal(_read(copy, "fitted/text/clip-tiny/digits/t-" + _template_key() + "/embeds"),
                          trained[2]["t-" + _template_key()])


def test_score_all_leaves_synood_out_without_a_file(capsys, tmp_path, env):
    copy = _copy(env, tmp_path)
    code, _, err = run(capsys, "-q", "score", "synood", "--store", copy)
    assert code == 2 and one_line_error(err) and "synood.prompts=FILE" in err
    assert run(capsys, "-q", "score", "all", "--store", copy, "-p", f"neglabel.wordnet={env['wordnet']}", *GROUPS)[0] == 0
    with open_store(copy) as st:
        assert st.exists("scores/mcm/test") and not st.exists("scores/synood")


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, env, trained):
    out = tmp_path / "x.safetensors"
    # a store without CLIP features
    cnn = tmp_path / "cnn.zarr"
    assert run(capsys, "-q", "extract", "--model", "digits_cnn-tiny", "--benchmark", "digits", "--split", "test",
               "--store", cnn)[0] == 0
    code, _, err = run(capsys, "train", "synood", "--store", cnn, "--out", out)
    assert code != 0 and one_line_error(err) and "CLIP" in err and not out.exists()
    # no synthetic split
    plain = _copy(env, tmp_path, "plain.zarr")
    assert run(capsys, "-q", "store", "rm", plain, SYN)[0] == 0
    code, _, err = run(capsys, "train", "synood", "--store", plain, "--out", out, "--wordnet", env["wordnet"], *NEG)
    assert code != 0 and one_line_error(err) and "no synthetic split" in err and not out.exists()
    # a split that is not synthetic
    code, _, err = run(capsys, "train", "synood", "--store", env["store"], "--out", out, "--synthetic",
                       "ood/near/digits6-9", "--wordnet", env["wordnet"], *NEG)
    assert code != 0 and one_line_error(err) and "not synthetic" in err and not out.exists()
    # a file of another CLIP
    other_w, other = tmp_path / "other.safetensors", tmp_path / "other.zarr"
    _save_tiny(other_w, seed=2)
    _extract(other, other_w, "--benchmark", "digits", "--split", "test", "--split", "ood/far/noise")
    code, _, err = run(capsys, "score", "synood", "--store", other, "-p", f"synood.prompts={trained[0]}",
                       "-p", "synood.ngroup=3")
    assert code != 0 and one_line_error(err) and "trained on clip-tiny weights" in err
    with open_store(other) as st:
        assert not st.exists("scores/synood")
    # the authors' projection reads the unnormalised feature: a store with image_embeds only is told
    # how to re-extract, or to take the linear map
    embeds_only = tmp_path / "embeds.zarr"
    _extract(embeds_only, env["weights"], "--benchmark", "digits", "--split", "train", "--split", "test", "--split", "ood/far/noise",
             layers="image_embeds")
    _extract(embeds_only, env["weights"], "--data", f"folder:{env['root'] / 'syn'}", "--split", SYN,
             "--role", "synthetic", layers="image_embeds")
    code, _, err = run(capsys, "train", "synood", "--store", embeds_only, "--out", out, "--wordnet", env["wordnet"], *NEG)
    assert code != 0 and one_line_error(err) and "--projection linear" in err and not out.exists()
    code, _, err = run(capsys, "score", "synood", "--store", embeds_only, "-p", f"synood.prompts={trained[0]}",
                       "-p", "synood.ngroup=3")
    assert code != 0 and one_line_error(err) and "penultimate" in err
    with open_store(embeds_only) as st:
        assert not st.exists("scores/synood")
    code, _, err = run(capsys, "train", "synood", "--store", env["store"], "--out", out, "--projection", "mlp")
    assert code == 2 and one_line_error(err) and "authors, linear" in err and not out.exists()
    # not a SynOOD file at all
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"nope")
    code, _, err = run(capsys, "score", "synood", "--store", env["store"], "-p", f"synood.prompts={junk}")
    assert code != 0 and one_line_error(err)
    code, _, err = run(capsys, "score", "synood", "--store", env["store"], "-p", f"synood.prompts={trained[0]}",
                       "-p", "synood.projection=maybe")
    assert code == 2 and one_line_error(err) and "true or false" in err
