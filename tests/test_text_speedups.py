"""The text tower's exact fast paths (shared prefix, length buckets) against the plain path.

The plain path (``TextTower.encode_embeddings`` on whole sequences, ``PromptLearner(fast=False)``)
is the reference: features and the context's gradients must agree to 1e-5, on the tiny CLIP
and on a text tower of ViT-B/16's size (width 512, 12 layers, 8 heads), random weights.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import one_line_error, run
from oodcli.backbones import clip_text as T
from oodcli.backbones import get_spec
from oodcli.backbones.clip import TextTower
from oodcli.errors import UsageError
from oodcli.train import iim as I
from oodcli.train import prompts as P

# names of very different token lengths, so that several buckets form
NAMES = ["tench", "goldfish", "great white shark", "kite (bird of prey)", "American alligator",
         "a", "toilet paper", "Saint Bernard", "hen-of-the-woods mushroom", "ox"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def tiny():
    return get_spec("clip-tiny").build_text("random")


@pytest.fixture(scope="module")
def vit_b16():
    """A text tower of ViT-B/16's shape with random weights, without the image encoder."""
    import open_clip
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-16")
    text = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]))
    return TextTower(text, open_clip.get_tokenizer("ViT-B-16"), 100.0)


def _grad_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Gradients agree to ``tol`` relative to their largest entry (random towers give large ones)."""
    scale = float(b.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) <= tol * scale


def _features_and_grad(learner, run, ctx: torch.Tensor, weights: torch.Tensor):
    learner.ctx = torch.nn.Parameter(ctx.clone())
    feats = run(learner)
    (feats * weights).sum().backward()  # a random linear functional of every feature
    return feats.detach(), learner.ctx.grad.clone()


def _compare(tower, run, ctx, n_out):
    g = torch.Generator().manual_seed(1)
    fast, plain = P.PromptLearner(tower, ctx), P.PromptLearner(tower, ctx, fast=False)
    assert fast.fast and not plain.fast
    with torch.no_grad():
        shape = run(plain).shape
    assert shape[-2] == n_out
    weights = torch.randn(shape, generator=g)
    f_fast, g_fast = _features_and_grad(fast, run, ctx, weights)
    f_plain, g_plain = _features_and_grad(plain, run, ctx, weights)
    torch.testing.assert_close(f_fast, f_plain, atol=1e-5, rtol=1e-5)
    _grad_close(g_fast, g_plain)


@pytest.mark.parametrize("sets", [1, 3])
def test_shared_prefix_features_and_context_gradients_equal_the_plain_path(tiny, sets):
    """CoOp (one context shared by every class) and NegPrompt (p shared contexts): same features, same gradients."""
    ctx = torch.randn(sets, 4, tiny.width, generator=torch.Generator().manual_seed(0)) * 0.02
    _compare(tiny, lambda learner: learner(NAMES), ctx, len(NAMES))


def test_vit_b16_sized_tower_equals_the_plain_path(vit_b16):
    ctx = torch.randn(1, 16, vit_b16.width, generator=torch.Generator().manual_seed(0)) * 0.02
    _compare(vit_b16, lambda learner: learner(NAMES[:6]), ctx, 6)
    csc = torch.randn(3, 16, vit_b16.width, generator=torch.Generator().manual_seed(2)) * 0.02
    _compare(vit_b16, lambda learner: learner.class_specific(NAMES[:3], learner.ctx), csc, 3)


def test_any_prefix_split_gives_the_whole_sequence_features(tiny):
    """Positions and masks: sequences that share their first 4 positions, split anywhere into a
    shared prefix and ragged suffixes, read the same features as the whole sequences; noise after
    a sequence's end (the padding of its bucket) changes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, tiny.width, generator=g)
    x[:, :4] = x[0, :4]
    ends = torch.tensor([11, 4, 7, 9, 6])
    want = tiny.encode_embeddings(x, ends)
    for m in (1, 2, 4):
        for overhead in (0, 10**6):  # a bucket per length, or one bucket padded to the longest
            got = T.encode_prefixed(tiny, x[:1, :m], x[None, :, m:], ends - m + 1, overhead=overhead)
            assert got.shape == (1, 5, want.shape[1])
            torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    noisy = x.clone()
    noisy[1, 5:] = torch.randn(noisy[1, 5:].shape, generator=g) * 10
    got = T.encode_prefixed(tiny, x[:1, :4], noisy[None, :, 4:], ends - 3, overhead=10**6)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_prefix_states_are_those_of_the_full_sequence(tiny):
    """The prefix's per-layer keys and values equal those inside the plain forward (caught by hooks):
    causal attention makes them independent of what follows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, tiny.width, generator=g)
    x[1, :5] = x[0, :5]
    caught = []
    hooks = [b.register_forward_pre_hook(lambda mod, args, kw: caught.append(args[0]), with_kwargs=True)
             for b in tiny.text.transformer.resblocks]
    try:
        tiny.encode_embeddings(x, torch.tensor([8, 8]))
    finally:
        for h in hooks:
            h.remove()
    states = T.prefix_states(tiny, x[:1, :5])
    for block, layer_input, (k, v) in zip(tiny.text.transformer.resblocks, caught, states):
        _, k_full, v_full = T._qkv(block, layer_input)
        for row in (0, 1):
            torch.testing.assert_close(k[0], k_full[row, :, :5], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(v[0], v_full[row, :, :5], atol=1e-6, rtol=1e-5)


def test_learner_passes_sos_and_context_as_the_prefix(tiny, monkeypatch):
    """CoOp's prefix is [SOS, ctx] ([P, 1 + n, width]); class-specific contexts (CSC) share only the
    start token, their contexts going with each suffix."""
    seen = []
    real = T.encode_prefixed
    monkeypatch.setattr(T, "encode_prefixed", lambda tower, prefix, suffix, lengths, **kw:
                        seen.append((prefix.shape, suffix.shape, lengths.tolist())) or real(tower, prefix, suffix, lengths))
    learner = P.PromptLearner(tiny, torch.zeros(2, 4, tiny.width))
    emb, ends = learner.name_tokens(NAMES)
    with torch.no_grad():
        learner(NAMES)
        learner.class_specific(NAMES[:2], torch.zeros(2, 4, tiny.width))
    (prefix, suffix, lengths), (csc_prefix, csc_suffix, csc_lengths) = seen
    assert prefix == (2, 5, tiny.width) and suffix[:2] == (1, len(NAMES)) and lengths == (ends - 4).tolist()
    assert csc_prefix == (1, 1, tiny.width) and csc_suffix[:2] == (1, 2) and csc_lengths == ends[:2].tolist()


def test_class_specific_contexts_equal_the_plain_path(tiny):
    ctx = torch.randn(len(NAMES), 4, tiny.width, generator=torch.Generator().manual_seed(0)) * 0.02
    _compare(tiny, lambda learner: learner.class_specific(NAMES, learner.ctx), ctx, len(NAMES))


def test_iim_local_and_ood_prompts_in_one_set_equal_two_plain_passes(tiny):
    g = torch.Generator().manual_seed(0)
    names = NAMES[:4]
    local_ctx = torch.randn(len(names), 4, tiny.width, generator=g) * 0.02
    ood_ctx = torch.randn(7, 4, tiny.width, generator=g) * 0.02
    w_local, w_ood = torch.randn(len(names), 32, generator=g), torch.randn(7, 32, generator=g)

    def run(learner, ood):
        local, out = I.prototype_features(learner, names, learner.ctx, ood)
        (local * w_local).sum().add((out * w_ood).sum()).backward()
        return local.detach(), out.detach()

    fast, plain = P.PromptLearner(tiny, local_ctx), P.PromptLearner(tiny, local_ctx, fast=False)
    ood_fast, ood_plain = torch.nn.Parameter(ood_ctx.clone()), torch.nn.Parameter(ood_ctx.clone())
    got, want = run(fast, ood_fast), run(plain, ood_plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _grad_close(fast.ctx.grad, plain.ctx.grad)
    _grad_close(ood_fast.grad, ood_plain.grad)
    # without gradients: the scoring path's features (iim_features) are the same too
    torch.testing.assert_close(I.ood_features(fast, ood_ctx), want[1], atol=1e-5, rtol=1e-5)


def test_length_buckets_partition_and_are_optimal():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, size=40)
    for overhead in (0, 5, 40, 10**6):
        buckets = T.length_buckets(lengths, overhead)
        assert sorted(np.concatenate(buckets).tolist()) == list(range(40))  # each sequence exactly once
        spans = [(lengths[b].min(), lengths[b].max()) for b in buckets]
        assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # contiguous ranges, shortest first
        cost = sum(len(b) * lengths[b].max() + overhead for b in buckets)
        values = np.unique(lengths)
        best = min(  # every way of cutting the sorted distinct lengths into contiguous runs
            sum(int(((lengths >= values[i]) & (lengths <= values[j - 1])).sum()) * values[j - 1] + overhead
                for i, j in zip((0, *cuts), (*cuts, len(values))))
            for r in range(len(values)) for cuts in itertools.combinations(range(1, len(values)), r)
        )
        assert cost == best
    assert len(T.length_buckets(lengths, 0)) == len(np.unique(lengths))  # no padding at all
    assert len(T.length_buckets(lengths, 10**6)) == 1


def test_other_towers_fall_back_to_the_plain_path():
    """A tower whose attention is not causal has no shared prefix: the learner takes the plain
    path and gives the tower's own features, which the prefix path would not."""
    other = get_spec("clip-tiny").build_text("random")
    other.text.attn_mask = torch.zeros_like(other.text.attn_mask)
    assert not T.supports_prefix(other)
    ctx = P.initial_context(other, 0, "a photo of a", torch.Generator())
    learner = P.PromptLearner(other, ctx)
    assert not learner.fast and learner.amp is None
    with torch.no_grad():
        got = learner(NAMES[:3])[0]
        want = other.encode_text([f"a photo of a {n}." for n in NAMES[:3]])
        emb, ends = learner.name_tokens(NAMES[:3])
        prefix = torch.cat([emb[:1, :1], learner.ctx], dim=1)
        prefixed = T.encode_prefixed(other, prefix, emb[None, :, 5:], ends - 4)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prefixed, want, atol=1e-3)


def test_bfloat16_autocast_is_chosen_on_cuda_only(tiny, monkeypatch):
    assert T.amp_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert T.amp_dtype(torch.device("cuda")) is torch.bfloat16
    assert T.amp_dtype(torch.device("cuda"), "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert T.amp_dtype(torch.device("cuda")) is None
    with pytest.raises(UsageError, match="unknown --precision 'fp16'"):
        T.amp_dtype(torch.device("cpu"), "fp16")
    assert P.PromptLearner(tiny, torch.zeros(1, 4, tiny.width)).amp is None  # a CPU learner: float32


def test_the_autocast_path_keeps_a_float32_context(tiny):
    """The mixed-precision step (run here under CPU bfloat16 autocast, as it runs on CUDA): close to
    float32, the context and its gradient stay float32; features without gradients stay exact."""
    ctx = torch.randn(1, 4, tiny.width, generator=torch.Generator().manual_seed(0)) * 0.02
    learner, plain = P.PromptLearner(tiny, ctx), P.PromptLearner(tiny, ctx, fast=False)
    learner.amp = torch.bfloat16
    feats = learner(NAMES)
    feats.sum().backward()
    assert learner.ctx.dtype == torch.float32 and learner.ctx.grad.dtype == torch.float32
    with torch.no_grad():
        want = plain(NAMES)
    assert float((feats.detach() - want).abs().max()) < 0.05
    assert not torch.allclose(feats.detach(), want, atol=1e-5)  # bfloat16 did run
    torch.testing.assert_close(learner.features(NAMES), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["coop", "negprompt", "iim"])
def test_an_unknown_precision_is_one_line_and_writes_nothing(tmp_path, capsys, method):
    out = tmp_path / "p.safetensors"
    extra = ["--positive", tmp_path / "coop.safetensors"] if method == "negprompt" else []
    code, _, err = run(capsys, "train", method, "--store", tmp_path / "s.zarr", "--out", out, *extra, "--precision", "fp16")
    assert code == 2 and one_line_error(err) and "unknown --precision 'fp16'" in err
    assert not out.exists() and not (tmp_path / "s.zarr").exists()


def test_a_tower_not_read_at_its_end_token_is_refused_in_one_line():
    """SigLIP-like towers pool elsewhere than the end token: no prompt can be learned through
    the end-token path, so the learner says so instead of failing inside the transformer."""
    from oodcli.errors import OodError

    other = get_spec("clip-tiny").build_text("random")
    other.pool_type = "last"
    with pytest.raises(OodError, match="causal CLIP text tower read at its end token; this one pools by 'last'"):
        P.PromptLearner(other, torch.zeros(1, 4, other.width))
