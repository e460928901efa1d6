"""Prompt learning on cached CLIP features (CoOp, LoCoOp, NegPrompt) and their scores.

Everything runs on a random-initialised tiny CLIP saved to a weights file and on the
embedded digits: the text tower learns, the image side comes from the store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodcli.text as text
from conftest import one_line_error, run
from oodcli.backbones import get_spec
from oodcli.errors import OodError, UsageError
from oodcli.store import open_store
from oodcli.train import prompts as P

NAMES = ["zero", "one", "two", "three", "four", "five"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    """A tiny CLIP trained for a few epochs (a random one sees every digit alike) and its digits store."""
    from oodcli.train.clip import train_clip

    root = tmp_path_factory.mktemp("prompts")
    weights, store = root / "tiny.safetensors", root / "digits_clip.zarr"
    train_clip(weights, epochs=10)
    args = ["-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
            "--layers", "image_embeds,patch_tokens,patch_values", "--dtype", "float32", "--store", store,
            "--split", "train", "--split", "test", "--split", "ood/near/digits6-9"]
    from oodcli.cli import main

    assert main([str(a) for a in args]) == 0
    return weights, store


@pytest.fixture(scope="module")
def coop_file(clip_store, tmp_path_factory):
    _, store = clip_store
    out = tmp_path_factory.mktemp("coop") / "coop.safetensors"
    result = P.train_prompts("coop", store, out, shots=8, epochs=15, n_ctx=4, seed=1)  # seed 0's 48 images are as right after 15 epochs as before
    return out, result


def _source(store):
    with open_store(store) as st:
        return text.clip_source(st, "clip-tiny")


# ---- the learner is CLIP's own text path ------------------------------------------------------


def test_learner_with_a_phrase_as_context_equals_encoding_the_text(clip_store):
    """Context = the token embeddings of 'a photo of a' gives exactly CLIP's 'a photo of a NAME.'"""
    weights, _ = clip_store
    tower = get_spec("clip-tiny").build_text(str(weights))
    ctx = P.initial_context(tower, 0, "a photo of a", torch.Generator())
    assert ctx.shape == (1, 4, tower.width)
    learner = P.PromptLearner(tower, ctx)
    with torch.no_grad():
        got = learner(NAMES)[0]
        want = tower.encode_text([f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # class batches and several prompt sets give the same features
    # a random change (a constant shift of every value would vanish in the first LayerNorm)
    two = torch.cat([ctx, ctx + 0.1 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0))])
    batched = P.PromptLearner(tower, two)
    P.ENCODE_CLASSES, old = 4, P.ENCODE_CLASSES
    try:
        feats = batched.features(NAMES)
    finally:
        P.ENCODE_CLASSES = old
    assert feats.shape == (2, 6, want.shape[1])
    torch.testing.assert_close(feats[0], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[1], want)


# ---- the losses are their formulas -------------------------------------------------------


def test_coop_loss_is_cross_entropy_of_cosines_over_tau():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    texts = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    labels = torch.tensor([0, 3, 1])
    want = 0.0
    for i in range(3):
        logits = [float(image[i] @ texts[c]) / 0.07 for c in range(4)]
        want += -(logits[labels[i]] - np.log(np.sum(np.exp(logits))))
    assert P.coop_loss(image, texts, labels, 0.07).item() == pytest.approx(want / 3, rel=1e-5)


def test_locoop_picks_patches_whose_label_is_outside_their_top_k():
    # 1 image of label 2, 3 patches, 4 classes
    local = torch.tensor([[[0.1, 0.2, 0.9, 0.0],    # label 2 ranks first: relevant
                           [0.9, 0.8, 0.1, 0.0],    # label 2 ranks third: irrelevant for K=2
                           [0.5, 0.1, 0.6, 0.7]]])  # label 2 ranks second: relevant for K=2
    mask = P.irrelevant_patches(local, torch.tensor([2]), top_k=2)
    assert mask.tolist() == [[False, True, False]]
    assert P.irrelevant_patches(local, torch.tensor([2]), top_k=1).tolist() == [[False, True, True]]
    term = P.locoop_entropy_term(local, mask)
    p = torch.softmax(local[0, 1], dim=0)
    assert term.item() == pytest.approx(float((p * p.log()).sum()), rel=1e-6)  # minus the entropy
    assert P.locoop_entropy_term(local, torch.zeros_like(mask)).item() == 0.0


def test_negprompt_losses_follow_equations_4_to_6():
    g = torch.Generator().manual_seed(1)
    p, k, d = 3, 2, 4
    image = F.normalize(torch.randn(2, d, generator=g), dim=-1)
    pos = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    neg = F.normalize(torch.randn(p, k, d, generator=g), dim=-1)
    tau = 0.5
    nis, npd, nnd = P.negprompt_losses(image, pos, neg, tau, "negatives")
    # eq. 4 as printed: H(u; softmax over all p*k negative similarities), averaged over images
    # the default ('all', the authors' OE branch): the same over the k positive and p*k negative ones
    want_nis, want_all = 0.0, 0.0
    for x in image:
        s = np.array([float(x @ neg[l, j]) / tau for l in range(p) for j in range(k)])
        want_nis += -np.mean(s - np.log(np.exp(s).sum()))
        s = np.concatenate([[float(x @ pos[j]) / tau for j in range(k)], s])
        want_all += -np.mean(s - np.log(np.exp(s).sum()))
    assert nis.item() == pytest.approx(want_nis / 2, rel=1e-5)
    assert P.negprompt_losses(image, pos, neg, tau)[0].item() == pytest.approx(want_all / 2, rel=1e-5)
    assert P.negprompt_losses(image, pos, neg, tau, "all")[0].item() == pytest.approx(want_all / 2, rel=1e-5)
    # eq. 5 and 6
    want_npd = -sum(float(neg[i, j] @ pos[j]) for j in range(k) for i in range(p)) / (k * p)
    want_nnd = sum(float(neg[i, j] @ neg[l, j]) for j in range(k) for i in range(p) for l in range(p) if l != i)
    assert npd.item() == pytest.approx(want_npd, rel=1e-5)
    assert nnd.item() == pytest.approx(want_nnd / (k * p * (p - 1)), rel=1e-5)
    assert P.negprompt_losses(image, pos, neg[:1], tau)[2].item() == 0.0


def test_l_nis_over_all_logits_moves_the_negatives_where_eq_4_alone_cannot():
    """Eq. 4 read literally is the same when every negative logit shifts alike (it only redistributes);
    the all-logit softmax (the default) changes, and its gradient has a component along the shift."""
    g = torch.Generator().manual_seed(4)
    p, k, d, tau = 2, 3, 6, 0.1
    image = F.normalize(torch.randn(4, d, generator=g), dim=-1)
    pos = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    neg = F.normalize(torch.randn(p, k, d, generator=g), dim=-1)

    def nis(shift, reading):  # every negative logit cos / tau shifted by ``shift`` (as if the images moved alike)
        logits_neg = image @ neg.reshape(p * k, -1).T / tau + shift
        logits = torch.cat([image @ pos.T / tau, logits_neg], dim=1) if reading == "all" else logits_neg
        return -F.log_softmax(logits, dim=1).mean(dim=1).mean()

    # the hand-written shift reproduces the library at shift 0, for both readings
    for reading in ("all", "negatives"):
        assert nis(torch.tensor(0.0), reading).item() == pytest.approx(
            P.negprompt_losses(image, pos, neg, tau, reading)[0].item(), rel=1e-6)
    assert nis(torch.tensor(5.0), "negatives").item() == pytest.approx(nis(torch.tensor(0.0), "negatives").item(), abs=1e-4)
    assert abs(nis(torch.tensor(5.0), "all").item() - nis(torch.tensor(0.0), "all").item()) > 0.5
    for reading, moves in (("negatives", False), ("all", True)):
        shift = torch.tensor(0.0, requires_grad=True)
        nis(shift, reading).backward()
        assert (abs(shift.grad.item()) > 1e-3) is moves
    with pytest.raises(UsageError, match="nis-softmax"):
        P.negprompt_losses(image, pos, neg, tau, "positives")


# ---- training -----------------------------------------------------------------------------


def test_coop_learns_only_the_context_and_never_builds_the_image_encoder(clip_store, tmp_path, monkeypatch):
    import open_clip.model

    weights, store = clip_store
    tower = get_spec("clip-tiny").build_text(str(weights))
    before = {k: v.clone() for k, v in tower.state_dict().items()}

    def no_vision(*args, **kwargs):
        raise AssertionError("the image encoder must not be built while learning prompts")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", no_vision)
    monkeypatch.setattr(text, "build_text_tower", lambda source: tower)
    out = tmp_path / "coop.safetensors"
    result = P.train_prompts("coop", store, out, shots=4, epochs=3, n_ctx=4, lr=0.05)
    after = tower.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical CLIP
    file = P.read_prompt_file(out)
    start = P.initial_context(tower, 4, None, torch.Generator().manual_seed(0))
    assert file.ctx.shape == (1, 4, tower.width) and not torch.allclose(file.ctx, start)
    assert result.history[0]["epoch"] == 1 and len(result.history) == 3


def test_training_lowers_the_loss_and_raises_few_shot_accuracy(coop_file):
    out, result = coop_file
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0] and losses[-1] == min(losses)
    assert result.accuracy > result.accuracy_before  # at least one more of the 48 few-shot images right
    meta = P.read_prompt_file(out).meta
    assert meta["method"] == "coop" and meta["class_names"] == NAMES and meta["shots"] == 8
    assert len(meta["shot_rows"]) == 6 * 8 and meta["history"] == json.loads(json.dumps(result.history))


def test_few_shot_draw_is_seeded_and_per_class():
    labels = np.repeat(np.arange(3), 10)
    a = P.few_shot_rows(labels, [0, 1, 2], 4, seed=3, names=["a", "b", "c"])
    assert np.array_equal(a, P.few_shot_rows(labels, [0, 1, 2], 4, seed=3, names=["a", "b", "c"]))
    assert np.bincount(labels[a]).tolist() == [4, 4, 4] and len(set(a)) == 12
    assert not np.array_equal(a, P.few_shot_rows(labels, [0, 1, 2], 4, seed=4, names=["a", "b", "c"]))
    with pytest.raises(OodError, match="fewer than --shots 11"):
        P.few_shot_rows(labels, [0, 1], 11, seed=0, names=["a", "b", "c"])
    assert P.class_subset(1000, None, 0.1) == list(range(100))
    assert P.class_subset(6, "0-2", None) == [0, 1, 2]


def test_locoop_trains_on_patch_values_by_default_and_records_the_layer(clip_store, tmp_path):
    _, store = clip_store
    result = P.train_prompts("locoop", store, tmp_path / "l.safetensors", shots=4, epochs=2, n_ctx=4, locoop_top_k=2)
    assert "entropy_term" in result.history[-1] and result.history[-1]["entropy_term"] < 0
    meta = P.read_prompt_file(tmp_path / "l.safetensors").meta
    assert meta["locoop_top_k"] == 2 and meta["local_layer"] == "patch_values"
    old = P.train_prompts("locoop", store, tmp_path / "t.safetensors", shots=4, epochs=2, n_ctx=4, locoop_top_k=2,
                          local_layer="patch_tokens")
    assert P.read_prompt_file(tmp_path / "t.safetensors").meta["local_layer"] == "patch_tokens"
    # the entropy term reads the layer asked for: the first step's differs, the CE term does not
    assert old.history[0]["ce"] == pytest.approx(result.history[0]["ce"], rel=1e-6)
    assert old.history[0]["entropy_term"] != pytest.approx(result.history[0]["entropy_term"], rel=1e-4)


def test_locoop_scores_on_the_layer_its_prompts_were_trained_on(clip_store, tmp_path, capsys):
    _, store = clip_store
    values, tokens = tmp_path / "v.safetensors", tmp_path / "t.safetensors"
    P.train_prompts("locoop", store, values, shots=4, epochs=1, n_ctx=4, locoop_top_k=2)
    P.train_prompts("locoop", store, tokens, shots=4, epochs=1, n_ctx=4, locoop_top_k=2, local_layer="patch_tokens")
    code, _, err = run(capsys, "-q", "score", "locoop", "--store", store, "--as", "locoop-v", "-p", f"locoop.prompts={values}")
    assert code == 0, err
    with open_store(store) as st:
        names = text.label_set(st)[1]
        got = st.read("scores/locoop-v/test").astype(np.float64)
        x = st.read("splits/test/clip-tiny/image_embeds").astype(np.float64)
        patches = st.read("splits/test/clip-tiny/patch_values").astype(np.float64)
    t = P.prompt_features(P.read_prompt_file(values), _source(store), names)[0].astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
    expected = softmax(x @ t.T).max(axis=1) + softmax(patches @ t.T).reshape(len(x), -1).max(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # mixing layers is refused in one line, both ways, and nothing is written
    for prompts, param, words in ((tokens, [], "trained on the patch features patch_tokens"),
                                  (values, ["-p", "locoop.local_layer=patch_tokens"], "trained on the patch features patch_values")):
        code, _, err = run(capsys, "score", "locoop", "--store", store, "--as", "locoop-mixed",
                           "-p", f"locoop.prompts={prompts}", *param)
        assert code != 0 and one_line_error(err) and words in err and "local_layer" in err, err
        with open_store(store) as st:
            assert not st.exists("scores/locoop-mixed")
    code, _, err = run(capsys, "-q", "score", "locoop", "--store", store, "--as", "locoop-t",
                       "-p", f"locoop.prompts={tokens}", "-p", "locoop.local_layer=patch_tokens")
    assert code == 0, err


def test_locoop_on_a_store_without_patch_values_names_the_extract_command(clip_store, tmp_path, capsys):
    weights, _ = clip_store
    store = tmp_path / "old.zarr"
    assert run(capsys, "-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
               "--layers", "image_embeds,patch_tokens", "--split", "train", "--store", store)[0] == 0
    out = tmp_path / "p.safetensors"
    err = _refused(capsys, out, "train", "locoop", "--store", store, "--out", out, "--top-k", "2")
    assert "oodcli extract --model clip-tiny" in err and "image_embeds,patch_tokens,patch_values" in err
    assert "--local-layer patch_tokens" in err
    assert "--local-layer" in _refused(capsys, out, "train", "locoop", "--store", store, "--out", out,
                                       "--top-k", "2", "--local-layer", "cls")


def test_negprompt_keeps_the_positive_prompts_and_transfers_to_unseen_classes(clip_store, tmp_path):
    _, store = clip_store
    pos = tmp_path / "coop02.safetensors"
    P.train_prompts("coop", store, pos, shots=4, epochs=3, n_ctx=4, train_classes="0-2")
    neg = tmp_path / "neg.safetensors"
    result = P.train_prompts("negprompt", store, neg, positive=pos, neg_prompts=2, epochs=3)
    assert result.classes == 3 and result.shots == 4  # stage one's classes and shots
    a, b = P.read_prompt_file(pos), P.read_prompt_file(neg)
    assert torch.equal(a.ctx, b.ctx) and b.neg_ctx.shape == (2, 4, a.ctx.shape[2])
    assert b.meta["positive_sha256"] == a.sha256 and b.meta["shot_rows"] == a.meta["shot_rows"]
    assert b.meta["nis_softmax"] == "all" and "U(-1e-05, 1e-05)" in b.meta["neg_init"]
    # the learned negative templates take class names they never saw
    positive, negative = P.prompt_features(b, _source(store), NAMES)
    assert positive.shape == (6, 32) and negative.shape == (2, 6, 32)
    np.testing.assert_allclose(np.linalg.norm(negative, axis=-1), 1, atol=1e-5)
    assert np.abs(negative[:, 3:] - negative[:, :1]).max() > 1e-3  # distinct per unseen class


def test_negative_contexts_start_at_the_positive_context_plus_tiny_uniform_noise(clip_store, coop_file, tmp_path):
    """The authors' start: positive context + U(-1e-5, 1e-5) (before: + N(0, 0.02), as large as a token embedding)."""
    start = P.negative_context_start(torch.zeros(1, 50, 40), 3, torch.Generator().manual_seed(0))
    assert start.shape == (3, 50, 40)
    assert 0.99e-5 < start.abs().max().item() <= 1e-5 and abs(start.mean().item()) < 1e-7
    _, store = clip_store
    coop, _ = coop_file
    neg = tmp_path / "neg.safetensors"
    P.train_prompts("negprompt", store, neg, positive=coop, neg_prompts=2, epochs=1, lr=1e-12)  # barely a step
    file = P.read_prompt_file(neg)
    diff = file.neg_ctx - file.ctx
    assert diff.abs().max().item() <= 1.01e-5 and diff.abs().max().item() > 5e-6
    assert (file.neg_ctx[0] - file.neg_ctx[1]).abs().max().item() > 0  # distinct noise per negative prompt


# ---- scores ------------------------------------------------------------------------------


def test_scores_through_the_cli_with_cache_and_eq3(clip_store, coop_file, tmp_path, capsys, monkeypatch):
    _, store = clip_store
    coop, _ = coop_file
    neg = tmp_path / "neg.safetensors"
    code, out, err = run(capsys, "train", "negprompt", "--store", store, "--positive", coop, "--out", neg,
                         "--epochs", "2", "--neg-prompts", "2")
    assert code == 0, err
    assert "negprompt on 6 classes x 8 shots" in out
    code, out, err = run(capsys, "score", "coop,negprompt", "--store", store,
                         "--param", f"coop.prompts={coop}", "--param", f"negprompt.prompts={neg}")
    assert code == 0, err
    with open_store(store) as st:
        scores = st.read("scores/negprompt/test").astype(np.float64)
        x = st.read("splits/test/clip-tiny/image_embeds").astype(np.float64)
        node = next(f"fitted/text/clip-tiny/digits/{c}" for c in st.children("fitted/text/clip-tiny/digits")
                    if st.node_attrs(f"fitted/text/clip-tiny/digits/{c}").get("negative_prompts") == 2)
        embeds = st.read(f"{node}/embeds").astype(np.float64)
    assert P.read_prompt_file(neg).meta["temperature"] < 1  # trained at the CLIP's tau, scored at T = 1 (as MCM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.exp(x @ embeds.T / 1.0)  # 6 positives, then 2 x 6 negatives
    np.testing.assert_allclose(scores, s[:, :6].max(1) / s.sum(1), rtol=1e-4)
    code, out, _ = run(capsys, "score", "--list", "--json")
    assert next(r for r in json.loads(out) if r["method"] == "negprompt")["params"]["temperature"] == 1.0
    # a second run reads the cached text features: no text tower is built
    monkeypatch.setattr(text, "build_text_tower", lambda source: (_ for _ in ()).throw(AssertionError("built")))
    code, out, err = run(capsys, "score", "negprompt", "--store", store, "--param", f"negprompt.prompts={neg}")
    assert code == 0 and "cached" in out, err
    code, out, _ = run(capsys, "report", "--store", store, "--json")
    assert {"coop", "negprompt"} <= set(json.loads(out)["methods"])


# ---- bad input: one line, nothing written ---------------------------------------------------


def _refused(capsys, out_file, *args):
    code, out, err = run(capsys, *args)
    assert code != 0 and one_line_error(err), err
    assert not out_file.exists() and not list(out_file.parent.glob(f".{out_file.name}*"))
    return err


def test_bad_training_input_is_one_line_and_writes_nothing(clip_store, coop_file, tmp_path, capsys):
    _, store = clip_store
    out = tmp_path / "p.safetensors"
    base = ("train", "coop", "--store", store, "--out", out, "--epochs", "1")
    assert "fewer than --shots 500" in _refused(capsys, out, *base, "--shots", "500")
    assert "outside the label set" in _refused(capsys, out, *base, "--train-classes", "0-9")
    assert "bad --train-classes" in _refused(capsys, out, *base, "--train-classes", "3-1")
    assert "--top-k" in _refused(capsys, out, "train", "locoop", "--store", store, "--out", out, "--top-k", "200")
    assert "--nis-softmax" in _refused(capsys, out, "train", "negprompt", "--store", store, "--positive", coop_file[0],
                                       "--out", out, "--nis-softmax", "positives")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a prompt file at all")
    assert "corrupt" in _refused(capsys, out, "train", "negprompt", "--store", store, "--positive", garbage, "--out", out)
    assert "not found" in _refused(capsys, out, "train", "negprompt", "--store", store,
                                   "--positive", tmp_path / "missing.safetensors", "--out", out)


def test_store_without_image_embeds_names_the_extract_command(clip_store, tmp_path, capsys):
    weights, _ = clip_store
    store = tmp_path / "patches_only.zarr"
    assert run(capsys, "-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
               "--layers", "penultimate", "--split", "train", "--store", store)[0] == 0
    out = tmp_path / "p.safetensors"
    err = _refused(capsys, out, "train", "coop", "--store", store, "--out", out)
    assert "oodcli extract --model clip-tiny --layers image_embeds" in err


def test_prompt_files_for_another_clip_or_other_classes_are_refused(clip_store, coop_file, tmp_path, capsys):
    _, store = clip_store
    coop, _ = coop_file
    good = P.read_prompt_file(coop)
    other_clip = tmp_path / "other_clip.safetensors"
    P.write_prompt_file(other_clip, {"ctx": good.ctx}, {**good.meta, "weights": "file:x.safetensors:sha256=00"})
    other_names = tmp_path / "other_names.safetensors"
    P.write_prompt_file(other_names, {"ctx": good.ctx}, {**good.meta, "class_names": ["cat", "dog"]})
    for bad, words in ((other_clip, "trained on clip-tiny weights"), (other_names, "cat, dog")):
        code, out, err = run(capsys, "score", "coop", "--store", store, "--as", "coop-bad", "--param", f"coop.prompts={bad}")
        assert code != 0 and words in err, err
        with open_store(store) as st:
            assert not st.exists("scores/coop-bad")
    out = tmp_path / "neg.safetensors"
    assert "trained on clip-tiny weights" in _refused(capsys, out, "train", "negprompt", "--store", store,
                                                      "--positive", other_clip, "--out", out)
    code, _, err = run(capsys, "score", "negprompt", "--store", store, "--param", f"negprompt.prompts={coop}")
    assert code != 0 and "without negative ones" in err
