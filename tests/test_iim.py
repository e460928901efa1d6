"""IIM (intra-image mining prompts) and its scores: S-MCM, S-MCM*, R-MCM with trained prompts, GL-MCM-local.

Everything runs on a random-initialised tiny CLIP (16 patches per image) saved to a weights
file and on the embedded digits, extracted in small chunks so that streaming is visible.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodcli.text as text
from conftest import one_line_error, run
from oodcli.backbones import get_spec
from oodcli.errors import UsageError
from oodcli.store import Store, open_store
from oodcli.train import iim as I
from oodcli.train import prompts as P

NAMES = ["zero", "one", "two", "three", "four", "five"]
SPLITS = ("train", "test", "ood/far/noise")
CHUNK = 64
METHODS = ("s-mcm", "s-mcm-star", "r-mcm-trained", "gl-mcm-local")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("iim")
    weights, store = root / "tiny.safetensors", root / "digits_clip.zarr"
    model = get_spec("clip-tiny").build("random").model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    args = ["-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
            "--layers", "image_embeds,patch_tokens,patch_values", "--dtype", "float32", "--chunk-rows", CHUNK, "--store", store]
    for split in SPLITS:
        args += ["--split", split]
    from oodcli.cli import main

    assert main([str(a) for a in args]) == 0
    return weights, store


@pytest.fixture(scope="module")
def iim_file(clip_store, tmp_path_factory):
    _, store = clip_store
    out = tmp_path_factory.mktemp("iimfile") / "iim.safetensors"
    result = I.train_iim(store, out, shots=4, epochs=4, n_ctx=4, k=4, ood_prompts=8, lr=0.05)
    return out, result


def _copy(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy


# ---- mining and the loss terms against eq. 5-10 -------------------------------------------


def test_positive_and_negative_patches_are_ranks_1_to_k_and_k_plus_1_to_2k():
    # one image of class 1, 8 patches whose cosines to class 1's prototype are set by hand
    cos = torch.tensor([0.10, 0.90, -0.30, 0.50, 0.70, 0.20, 0.80, 0.00])
    local = torch.eye(3)[:2]  # prototypes e0 (class 0) and e1 (class 1)
    tokens = torch.stack([torch.zeros(8), cos, (1 - cos**2).sqrt()], dim=1)[None]  # unit rows
    similarity = (tokens @ local.T)[:, :, 1]
    pos, neg = I.select_patches(similarity, 2)
    assert pos.tolist() == [[1, 6]] and neg.tolist() == [[4, 3]]
    pos, neg = I.select_patches(similarity, 3)
    assert sorted(pos[0].tolist()) == [1, 4, 6] and sorted(neg[0].tolist()) == [0, 3, 5]
    for k in (5, 9, 0):  # 2k must fit in the 8 patches
        with pytest.raises(UsageError, match="2k"):
            I.select_patches(similarity, k)


def _reference_terms(patches, local, ood, labels, k, t, denominators="paper"):
    """Eq. 5-9 written out with loops, in float64; 'official': the authors' L_pos / L_neg denominators."""
    patches, local, ood = (x.double().numpy() for x in (patches, local, ood))
    pos_losses, neg_losses = [], []
    for x, y in zip(patches, labels.tolist()):
        s_local = np.exp(x @ local.T / t)  # [H, C]
        s_ood = np.exp(x @ ood.T / t)  # [H, Cn]
        s_k = [np.sort(s_local[:, c])[::-1][:k].sum() for c in range(local.shape[0])]  # eq. 5, per class
        ranked = np.argsort(-s_local[:, y])
        ood_patches = ranked[k : 2 * k]  # eq. 6
        s_tilde_id = [s_local[ood_patches, c].sum() for c in range(local.shape[0])]  # eq. 7
        s_tilde_ood = [s_ood[ood_patches, c].sum() for c in range(ood.shape[0])]
        if denominators == "official":
            # L_pos: each OOD prompt's own top-k patches; L_neg: each class's own patches ranked k+1..2k
            pos_ood = [np.sort(s_ood[:, c])[::-1][:k].sum() for c in range(ood.shape[0])]
            s_tilde_id = [np.sort(s_local[:, c])[::-1][k : 2 * k].sum() for c in range(local.shape[0])]
        else:
            pos_ood = s_tilde_ood
        pos_losses.append(-np.log(s_k[y] / (sum(s_k) + sum(pos_ood))))  # eq. 8
        neg_losses.append(-np.log(sum(s_tilde_ood) / (sum(s_tilde_id) + sum(s_tilde_ood))))  # eq. 9
    return np.mean(pos_losses), np.mean(neg_losses)


@pytest.mark.parametrize("denominators", ["paper", "official"])
@pytest.mark.parametrize("t", [1.0, 0.3, 0.05])
def test_l_pos_and_l_neg_follow_equations_8_and_9(t, denominators):
    g = torch.Generator().manual_seed(0)
    patches = F.normalize(torch.randn(3, 7, 5, generator=g), dim=-1)
    local = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    ood = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    labels = torch.tensor([0, 3, 1])
    l_pos, l_neg = I.iim_terms(patches, local, ood, labels, k=2, temperature=t, denominators=denominators)
    want_pos, want_neg = _reference_terms(patches, local, ood, labels, 2, t, denominators)
    assert l_pos.item() == pytest.approx(want_pos, rel=1e-5)
    assert l_neg.item() == pytest.approx(want_neg, rel=1e-5)


def test_the_official_denominators_are_the_default_and_differ_from_the_printed_ones():
    g = torch.Generator().manual_seed(3)
    patches = F.normalize(torch.randn(4, 9, 6, generator=g), dim=-1)
    local = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    ood = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    labels = torch.tensor([0, 2, 1, 2])
    default = I.iim_terms(patches, local, ood, labels, k=3, temperature=0.1)
    official = I.iim_terms(patches, local, ood, labels, k=3, temperature=0.1, denominators="official")
    paper = I.iim_terms(patches, local, ood, labels, k=3, temperature=0.1, denominators="paper")
    assert [x.item() for x in default] == [x.item() for x in official]
    assert abs(official[0].item() - paper[0].item()) > 1e-3 and abs(official[1].item() - paper[1].item()) > 1e-3
    with pytest.raises(UsageError, match="denominators"):
        I.iim_terms(patches, local, ood, labels, k=3, denominators="printed")


def test_l_div_follows_equation_10():
    g = torch.Generator().manual_seed(2)
    ood = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    local = F.normalize(torch.randn(3, 4, generator=g), dim=-1)

    def pairs(f):
        n = len(f)
        return sum(float(f[i] @ f[j]) for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)

    assert I.diversity_term(ood, local).item() == pytest.approx(pairs(ood) + pairs(local), rel=1e-5)
    assert I.diversity_term(ood[:1], local).item() == pytest.approx(pairs(local), rel=1e-5)  # no OOD pairs: 0


def test_ood_prompts_are_context_alone_through_the_text_tower(clip_store):
    """An OOD prompt is [SOS, z~_1 .. z~_L, ., EOS]: with the context 'a photo of a' it is CLIP's 'a photo of a .'"""
    weights, _ = clip_store
    tower = get_spec("clip-tiny").build_text(str(weights))
    ctx = P.initial_context(tower, 0, "a photo of a", torch.Generator())
    learner = P.PromptLearner(tower, ctx)
    with torch.no_grad():
        got = I.ood_features(learner, torch.cat([ctx, ctx]))
        want = tower.encode_text(["a photo of a ."])
    assert got.shape == (2, want.shape[1])
    torch.testing.assert_close(got, want.expand(2, -1), atol=1e-5, rtol=1e-5)


# ---- training ------------------------------------------------------------------------------


def test_only_the_prompts_learn_and_the_image_encoder_is_never_built(clip_store, tmp_path, monkeypatch):
    import open_clip.model

    weights, store = clip_store
    tower = get_spec("clip-tiny").build_text(str(weights))
    before = {k: v.clone() for k, v in tower.state_dict().items()}

    def no_vision(*args, **kwargs):
        raise AssertionError("the image encoder must not be built while learning prompts")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", no_vision)
    monkeypatch.setattr(text, "build_text_tower", lambda source: tower)
    out = tmp_path / "iim.safetensors"
    I.train_iim(store, out, shots=2, epochs=2, n_ctx=4, k=4, ood_prompts=3, lr=0.05)
    after = tower.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    file = P.read_prompt_file(out)
    gen = torch.Generator().manual_seed(0)
    start = torch.cat([P.initial_context(tower, 4, None, gen), torch.randn(5, 4, tower.width, generator=gen) * 0.02])
    start_ood = torch.randn(3, 4, tower.width, generator=gen) * 0.02
    ood = I.ood_context(file)
    # class-specific contexts by default: one row of 4 context vectors per class
    assert file.ctx.shape == (6, 4, tower.width) and ood.shape == (3, 4, tower.width) and file.meta["csc"] is True
    assert not torch.allclose(file.ctx, start) and not torch.allclose(ood, start_ood)
    assert (file.ctx - start).abs().amax(dim=(1, 2)).min() > 0  # every class's own context learned
    assert file.neg_ctx is None  # NegPrompt never mistakes the OOD prompts for its own


def test_training_lowers_the_loss_and_records_its_settings(iim_file):
    out, result = iim_file
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert {"pos", "neg", "div"} <= set(result.history[-1])
    meta = P.read_prompt_file(out).meta
    assert meta["method"] == "iim" and meta["class_names"] == NAMES and meta["k"] == 4
    assert meta["ood_prompts"] == 8 and meta["lambda_neg"] == 5.0 and meta["lambda_div"] == 0.5
    assert meta["temperature"] == 1.0 and meta["patches"] == 16 and len(meta["shot_rows"]) == 6 * 4
    assert meta["csc"] is True and meta["denominators"] == "official"
    assert meta["tau"] == pytest.approx(1 / meta["logit_scale"])


def test_training_runs_at_tau_one_over_the_logit_scale(clip_store, tmp_path, monkeypatch):
    """The authors' exp(logit_scale * cos / T) with T = 1, not exp(cos): the trainer's terms get tau = 1 / logit_scale."""
    weights, store = clip_store
    scale = get_spec("clip-tiny").build_text(str(weights)).logit_scale
    assert scale > 2  # the tiny CLIP's scale is CLIP's start, 1 / 0.07: a tau of 1 would differ
    seen, terms = [], I.iim_terms

    def spy(patches, local, ood, labels, k, temperature=1.0, denominators="official"):
        seen.append((temperature, denominators))
        return terms(patches, local, ood, labels, k, temperature, denominators)

    monkeypatch.setattr(I, "iim_terms", spy)
    I.train_iim(store, tmp_path / "a.safetensors", shots=2, epochs=1, n_ctx=4, k=4, ood_prompts=3)
    I.train_iim(store, tmp_path / "b.safetensors", shots=2, epochs=1, n_ctx=4, k=4, ood_prompts=3, temperature=2.0,
                denominators="paper")
    assert seen and {d for _, d in seen} == {"official", "paper"}
    assert {round(t * scale, 6) for t, d in seen if d == "official"} == {1.0}
    assert {round(t * scale, 6) for t, d in seen if d == "paper"} == {2.0}


def test_shared_context_and_class_specific_contexts_for_their_classes_only(clip_store, iim_file, tmp_path, capsys):
    weights, store = clip_store
    shared = tmp_path / "shared.safetensors"
    code, _, err = run(capsys, "train", "iim", "--store", store, "--out", shared, "--no-csc", "--shots", "2",
                       "--epochs", "1", "--n-ctx", "4", "--k", "4", "--ood-prompts", "3")
    assert code == 0, err
    file = P.read_prompt_file(shared)
    assert file.ctx.shape == (1, 4, 32) and file.meta["csc"] is False
    # class-specific rows follow the names: the prototypes of a reordered label set are the same rows reordered
    prompts, _ = iim_file
    csc = P.read_prompt_file(prompts)
    source = P._load_data(store, None, "train", None, None, 1, 0, None, patches=False).source
    local, _ = I.iim_features(csc, source, NAMES)
    again, _ = I.iim_features(csc, source, NAMES[::-1])
    np.testing.assert_allclose(again, local[::-1], atol=1e-5)
    tower = get_spec("clip-tiny").build_text(str(weights))
    learner = P.PromptLearner(tower, csc.ctx[2:3])
    np.testing.assert_allclose(local[2], learner.features([NAMES[2]])[0, 0].numpy(), atol=1e-5)
    # a label set with a class that has no context of its own is refused in one line
    extra = tmp_path / "names.txt"
    extra.write_text("\n".join(NAMES + ["seven"]) + "\n")
    code, _, err = run(capsys, "score", "s-mcm", "--store", store, "--as", "iim-extra", "-p", f"s-mcm.prompts={prompts}",
                       "-p", f"s-mcm.labels={extra}")
    assert code != 0 and one_line_error(err) and "class-specific" in err and "seven" in err, err
    # and CoOp's scorer does not read class-specific contexts as one shared context
    code, _, err = run(capsys, "score", "coop", "--store", store, "--as", "coop-csc", "-p", f"coop.prompts={prompts}")
    assert code != 0 and one_line_error(err) and "class-specific" in err, err
    code, _, err = run(capsys, "score", "coop", "--store", store, "--as", "coop-shared", "-p", f"coop.prompts={shared}")
    assert code == 0, err
    err = _refused(capsys, tmp_path / "x.safetensors", "train", "iim", "--store", store, "--out", tmp_path / "x.safetensors",
                   "--k", "4", "--denominators", "printed")
    assert "--denominators" in err


# ---- scores --------------------------------------------------------------------------------


def _read(store, node):
    with open_store(store) as st:
        return st.read(node).astype(np.float64)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _topk_mean(x, k):
    return np.sort(x.reshape(len(x), -1), axis=1)[:, ::-1][:, :k].mean(axis=1)


def test_scores_match_equations_12_to_14(clip_store, iim_file, capsys):
    _, store = clip_store
    prompts, _ = iim_file
    args = ["score", "mcm,s-mcm,s-mcm-star,r-mcm-trained,gl-mcm-local", "--store", store]
    for m in METHODS:
        args += ["-p", f"{m}.prompts={prompts}"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    code, _, err = run(capsys, "score", "s-mcm", "--store", store, "--as", "s-mcm-a0",
                       "-p", f"s-mcm.prompts={prompts}", "-p", "s-mcm.alpha=0")
    assert code == 0, err
    for m in ("s-mcm", "r-mcm-trained"):  # the official R_MCM_Score's double exponential with OOD prompts
        code, _, err = run(capsys, "score", m, "--store", store, "--as", f"{m}-dexp",
                           "-p", f"{m}.prompts={prompts}", "-p", f"{m}.double_exp=true")
        assert code == 0, err
    sha = P.read_prompt_file(prompts).sha256
    glob = _read(store, "fitted/text/clip-tiny/digits/photo/embeds")
    embeds = _read(store, f"fitted/text/clip-tiny/digits/iim-{sha[:12]}/embeds")
    local, ood = embeds[:6], embeds[6:]
    assert ood.shape == (8, 32)
    k = 50
    for split in ("test", "ood/far/noise"):
        v = _read(store, f"splits/{split}/clip-tiny/image_embeds")
        x = _read(store, f"splits/{split}/clip-tiny/patch_values")  # the default local features
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        mcm = _softmax(v @ glob.T, 1).max(axis=1)  # global prototypes, T = 1
        s_l, s_o = np.exp(x @ local.T), np.exp(x @ ood.T)  # [N, H, C], [N, H, Cn]
        i2t = _topk_mean(s_l / (s_l.sum(2, keepdims=True) + s_o.sum(2, keepdims=True)), k)
        i2t_star = _topk_mean(s_l / s_l.sum(2, keepdims=True), k)
        t2i = (16 / 6) * _topk_mean(s_l / s_l.sum(1, keepdims=True), k)
        d_l, d_o = np.exp(s_l), np.exp(s_o)  # exp(exp(cos / T) / T), T = 1
        i2t_double = _topk_mean(d_l / (d_l.sum(2, keepdims=True) + d_o.sum(2, keepdims=True)), k)
        np.testing.assert_allclose(_read(store, f"scores/s-mcm-dexp/{split}"), mcm + i2t_double + t2i, rtol=1e-5)
        np.testing.assert_allclose(_read(store, f"scores/r-mcm-trained-dexp/{split}"), mcm + i2t_double, rtol=1e-5)
        assert np.abs(i2t_double - i2t).max() > 1e-4
        np.testing.assert_allclose(_read(store, f"scores/mcm/{split}"), mcm, rtol=1e-5)
        # alpha = 0: S-MCM is MCM + S_i2t, which is R-MCM with the trained prompts
        np.testing.assert_allclose(_read(store, f"scores/s-mcm-a0/{split}"), mcm + i2t, rtol=1e-5)
        np.testing.assert_allclose(_read(store, f"scores/r-mcm-trained/{split}"), mcm + i2t, rtol=1e-5)
        np.testing.assert_allclose(_read(store, f"scores/s-mcm/{split}"), mcm + i2t + t2i, rtol=1e-5)
        np.testing.assert_allclose(_read(store, f"scores/s-mcm-star/{split}"), mcm + i2t_star + t2i, rtol=1e-5)
        gl = mcm + _softmax(x @ local.T, 2).reshape(len(x), -1).max(axis=1)
        np.testing.assert_allclose(_read(store, f"scores/gl-mcm-local/{split}"), gl, rtol=1e-5)
    code, out, _ = run(capsys, "report", "--store", store, "--json")
    assert set(METHODS) <= set(json.loads(out)["methods"])


def test_scores_stream_one_chunk_at_a_time(clip_store, iim_file, tmp_path, monkeypatch):
    import oodcli.scorers.clip_iim as clip_iim
    from oodcli.scorers import get_scorer

    _, store = clip_store
    prompts, _ = iim_file
    with open_store(store, "r+") as st:
        whole = get_scorer("s-mcm", prompts=str(prompts)).score(st, "clip-tiny", "test")
    spans = []
    read = Store.read

    def recording(self, name, rows=None):
        if name.endswith("patch_values"):
            spans.append(None if rows is None else (rows.start, rows.stop))
        return read(self, name, rows)

    monkeypatch.setattr(Store, "read", recording)
    monkeypatch.setattr(clip_iim, "ENTRY_BUDGET", 16 * 14 * 5)  # 5 rows at a time inside a chunk too
    with open_store(store, "r+") as st:
        n = st.shape("splits/test/clip-tiny/patch_values")[0]
        chunk = st.chunk_rows("splits/test/clip-tiny/patch_values")
        got = get_scorer("s-mcm", prompts=str(prompts)).score(st, "clip-tiny", "test")
    assert chunk < n and None not in spans and len(spans) == -(-n // chunk)
    assert all(stop - start <= chunk for start, stop in spans)
    assert sorted(spans)[0][0] == 0 and sorted(spans)[-1][1] == n
    np.testing.assert_allclose(got, whole, rtol=1e-6)


# ---- bad input: one line, nothing written ---------------------------------------------------


def _refused(capsys, out_file, *args):
    code, out, err = run(capsys, *args)
    assert code != 0 and one_line_error(err), err
    assert not out_file.exists() and not list(out_file.parent.glob(f".{out_file.name}*"))
    return err


def test_store_without_patch_values_names_the_extract_command(clip_store, tmp_path, capsys):
    _, store = clip_store
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        for split in SPLITS:
            st.delete(f"splits/{split}/clip-tiny/patch_values")
    out = tmp_path / "iim.safetensors"
    err = _refused(capsys, out, "train", "iim", "--store", copy, "--out", out, "--k", "4")
    assert "oodcli extract --model clip-tiny" in err and "--layers image_embeds,patch_tokens,patch_values" in err
    assert "--local-layer patch_tokens" in err  # the old reading, by name
    with open_store(copy, "r+") as st:
        for split in SPLITS:
            st.delete(f"splits/{split}/clip-tiny/patch_tokens")
    err = _refused(capsys, out, "train", "iim", "--store", copy, "--out", out, "--k", "4")
    assert "patch_values" in err and "--local-layer" not in err


def test_local_layer_is_recorded_and_scoring_keeps_to_it(clip_store, iim_file, tmp_path, capsys):
    _, store = clip_store
    prompts, _ = iim_file
    assert P.read_prompt_file(prompts).meta["local_layer"] == "patch_values"
    tokens = tmp_path / "iim-tokens.safetensors"
    I.train_iim(store, tokens, shots=4, epochs=1, n_ctx=4, k=4, ood_prompts=8, lr=0.05, local_layer="patch_tokens")
    assert P.read_prompt_file(tokens).meta["local_layer"] == "patch_tokens"
    for method in METHODS:
        for file, param in ((tokens, []), (prompts, ["-p", f"{method}.local_layer=patch_tokens"])):
            code, _, err = run(capsys, "score", method, "--store", store, "--as", "iim-mixed",
                               "-p", f"{method}.prompts={file}", *param)
            assert code != 0 and one_line_error(err) and "trained on the patch features" in err, (method, err)
            with open_store(store) as st:
                assert not st.exists("scores/iim-mixed")
    code, _, err = run(capsys, "-q", "score", "gl-mcm-local", "--store", store, "--as", "gl-local-tokens",
                       "-p", f"gl-mcm-local.prompts={tokens}", "-p", "gl-mcm-local.local_layer=patch_tokens")
    assert code == 0, err
    sha = P.read_prompt_file(tokens).sha256
    glob = _read(store, "fitted/text/clip-tiny/digits/photo/embeds")
    local = _read(store, f"fitted/text/clip-tiny/digits/iim-{sha[:12]}/embeds")[:6]
    v = _read(store, "splits/test/clip-tiny/image_embeds")
    x = _read(store, "splits/test/clip-tiny/patch_tokens")
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    expected = _softmax(v @ glob.T, 1).max(axis=1) + _softmax(x @ local.T, 2).reshape(len(x), -1).max(axis=1)
    np.testing.assert_allclose(_read(store, "scores/gl-local-tokens/test"), expected, rtol=1e-5)


def test_k_beyond_the_patches_is_refused(clip_store, tmp_path, capsys):
    _, store = clip_store
    out = tmp_path / "iim.safetensors"
    for k in ("17", "9", "50"):  # 16 patches: at most k = 8 (2k patches are mined)
        err = _refused(capsys, out, "train", "iim", "--store", store, "--out", out, "--k", k, "--epochs", "1")
        assert "--k" in err and "16" in err


def test_prompt_files_for_another_clip_or_other_classes_are_refused(clip_store, iim_file, tmp_path, capsys):
    _, store = clip_store
    prompts, _ = iim_file
    good = P.read_prompt_file(prompts)
    tensors = {"ctx": good.ctx, "ood_ctx": I.ood_context(good)}
    other_clip = tmp_path / "other_clip.safetensors"
    P.write_prompt_file(other_clip, tensors, {**good.meta, "weights": "file:x.safetensors:sha256=00"})
    other_names = tmp_path / "other_names.safetensors"
    P.write_prompt_file(other_names, tensors, {**good.meta, "class_names": ["cat", "dog", *NAMES[2:]]})  # one per context
    no_ood = tmp_path / "no_ood.safetensors"
    P.write_prompt_file(no_ood, {"ctx": good.ctx}, {**good.meta, "method": "coop"})
    cases = [(m, other_clip, "trained on clip-tiny weights") for m in METHODS]
    cases += [(m, other_names, "cat, dog") for m in METHODS]
    cases += [("s-mcm", no_ood, "without OOD prototype prompts"), ("r-mcm-trained", no_ood, "without OOD")]
    for method, bad, words in cases:
        code, _, err = run(capsys, "score", method, "--store", store, "--as", "iim-bad", "-p", f"{method}.prompts={bad}")
        assert code != 0 and one_line_error(err) and words in err, (method, err)
        with open_store(store) as st:
            assert not st.exists("scores/iim-bad")
    code, _, err = run(capsys, "score", "s-mcm", "--store", store, "-p", f"s-mcm.prompts={prompts}", "-p", "s-mcm.k=1000")
    assert code == 2 and one_line_error(err) and "exceeds" in err


def test_listed_and_left_out_of_all_without_prompts(clip_store, capsys):
    code, out, _ = run(capsys, "score", "--list", "--json")
    listed = {row["method"]: row for row in json.loads(out)}
    assert set(METHODS) <= set(listed) and listed["s-mcm"]["params"]["alpha"] == 1.0
    assert listed["s-mcm"]["params"]["k"] == 50 and listed["r-mcm-trained"]["params"]["k"] == 50
    assert all(listed[m]["params"]["local_layer"] == "patch_values" for m in METHODS)
    assert all("patch_values" in listed[m]["needs"] for m in METHODS)
    assert listed["s-mcm"]["params"]["double_exp"] is False and listed["r-mcm-trained"]["params"]["double_exp"] is False
    assert "double_exp" not in listed["s-mcm-star"]["params"]  # S-MCM* has no OOD prompts: one exponential
