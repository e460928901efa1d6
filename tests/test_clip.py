"""CLIP zero-shot scores from the store (MCM, GL-MCM, R-MCM*, NegLabel), text prototypes,
NegLabel's WordNet mining, the ImageNet benchmarks and the tiny CLIP trainer.

Everything runs on a random-initialised tiny CLIP saved to a weights file, and on a fake
WordNet of a few lines in the real database format: no download, no apt package
(NegLabel without any WordNet, on the shipped lists, is in tests/test_vocabulary.py).
"""

import functools
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodcli.negatives as negatives
import oodcli.text as text
from conftest import one_line_error, run
from oodcli.backbones import get_spec
from oodcli.cli import main
from oodcli.errors import OodError
from oodcli.store import open_store

SPLITS = ("test", "ood/far/noise", "ood/near/digits6-9")
NAMES = ["zero", "one", "two", "three", "four", "five"]

# a few synsets in WordNet's data.noun / data.adj format (header lines start with two spaces)
NOUNS = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived
00001930 03 n 02 physical_entity 0 thing 0 001 @ 00001740 n 0000 | an entity that has physical existence
00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept
00002452 03 n 01 thing 0 000 | a separate and self-contained entity
00002684 03 n 02 object 0 physical_object 0 000 | a tangible and visible entity
00003553 03 n 02 whole 0 unit 0 000 | an assemblage of parts
00004258 03 n 01 living_thing 0 000 | a living (or once living) entity
00004475 03 n 02 organism 0 being 0 000 | a living thing
00006269 03 n 01 cell 0 000 | the basic structural unit
00007347 03 n 01 causal_agent 0 000 | any entity that produces an effect
00007846 03 n 03 person 0 individual 0 someone 0 000 | a human being
00015388 05 n 01 animal 0 000 | a living organism
00017222 03 n 01 plant 0 000 | a living organism lacking locomotion
00019128 03 n 01 natural_object 0 000 | an object occurring naturally
00021265 03 n 01 food 0 000 | any substance that can be metabolized
00021939 03 n 01 artifact 0 000 | a man-made object
00023100 03 n 01 Five 0 000 | the number (an ID name: excluded)
00024264 03 n 01 attribute 0 000 | an abstraction belonging to an entity
00026193 03 n 01 feeling 0 000 | the experiencing of affective states
00027807 03 n 01 shape 0 000 | the spatial arrangement of something
"""
ADJS = """  1 This software and database is being provided to you, the LICENSEE, by
00001740 00 a 01 able 0 005 = 05200169 n 0000 | having the necessary means
00002098 00 a 01 unable 0 002 = 05200169 n 0000 | not having the necessary means
00002312 00 a 02 abaxial 0 dorsal 4 002 ;c 06037666 n 0000 | facing away from the axis
00002527 00 a 02 adaxial 0 ventral 4 002 ;c 06037666 n 0000 | nearest to or facing toward the axis
00002730 00 s 01 acroscopic 0 001 & 00002527 a 0000 | facing or on the side toward the apex
00003356 00 a 01 basiscopic 0 001 & 00002527 a 0000 | facing or on the side toward the base
00005107 00 s 01 abridged(a) 0 001 & 00002527 a 0000 | (used of texts) shortened
00005839 00 a 01 cut 0 000 | separated into parts
00006032 00 a 01 bright 0 000 | emitting or reflecting light
00006200 00 s 01 gray 0 000 | of an achromatic color
"""


def _save_tiny(path, seed):
    """A random-initialised tiny CLIP saved as the weights file a user would pass."""
    from safetensors.torch import save_file

    model = get_spec("clip-tiny").build("random").model
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    weights, store = root / "tiny.safetensors", root / "digits_clip.zarr"
    _save_tiny(weights, seed=1)
    args = ["-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
            "--layers", "image_embeds,patch_tokens,patch_values", "--dtype", "float32", "--store", store]
    for split in SPLITS:
        args += ["--split", split]
    assert main([str(a) for a in args]) == 0
    return weights, store


@pytest.fixture(scope="module")
def scored(clip_store):
    """The store after scoring MCM, GL-MCM and R-MCM* once through the CLI."""
    _, store = clip_store
    assert main(["-q", "score", "mcm,gl-mcm,r-mcm", "--store", str(store)]) == 0
    return store


@pytest.fixture
def fake_wordnet(tmp_path):
    folder = tmp_path / "wordnet"
    folder.mkdir()
    (folder / "data.noun").write_text(NOUNS)
    (folder / "data.adj").write_text(ADJS)
    return folder


def _features(store, split, layer):
    with open_store(store) as st:
        return st.read(f"splits/{split}/clip-tiny/{layer}").astype(np.float64)


def _scores(store, method, split):
    with open_store(store) as st:
        return st.read(f"scores/{method}/{split}").astype(np.float64)


@functools.lru_cache(maxsize=4)
def _model(weights):
    return get_spec("clip-tiny").build(str(weights))


def _prototypes(weights, template="a photo of a {}.", names=NAMES):
    with torch.no_grad():
        return _model(weights).encode_text([template.format(n) for n in names]).double().numpy()


def _softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- the scores against references written from the formulas (eqs. 2-4 of IIM) -----------


def _zero_shot_reference(weights, store, split, layer):
    """(MCM, GL-MCM, R-MCM*) of one split from the formulas, the local terms on ``layer``."""
    t = _prototypes(weights)
    v, patches = _features(store, split, "image_embeds"), _features(store, split, layer)
    mcm, gl, rmcm = [], [], []
    for i in range(len(v)):
        s_mcm = max(_softmax(_unit(v[i]) @ t.T / 1.0))
        local = np.array([_softmax(_unit(p) @ t.T / 1.0) for p in patches[i]])  # [P, C]
        mcm.append(s_mcm)
        gl.append(s_mcm + local.max())
        rmcm.append(s_mcm + np.sort(local.ravel())[::-1][:50].mean())
    return mcm, gl, rmcm


def test_mcm_gl_mcm_r_mcm_match_the_formulas(clip_store, scored):
    weights, store = clip_store
    for split in ("test", "ood/far/noise"):
        mcm, gl, rmcm = _zero_shot_reference(weights, store, split, "patch_values")  # the default local features
        np.testing.assert_allclose(_scores(store, "mcm", split), mcm, rtol=1e-5)
        np.testing.assert_allclose(_scores(store, "gl-mcm", split), gl, rtol=1e-5)
        np.testing.assert_allclose(_scores(store, "r-mcm", split), rmcm, rtol=1e-5)


def test_local_layer_patch_tokens_reads_the_final_layer_tokens(capsys, tmp_path, clip_store, scored):
    weights, store = clip_store
    copy = _copy(store, tmp_path)
    params = ["-p", "gl-mcm.local_layer=patch_tokens", "-p", "r-mcm.local_layer=patch_tokens"]
    assert run(capsys, "-q", "score", "gl-mcm,r-mcm", "--store", copy, *params)[0] == 0
    for split in ("test", "ood/far/noise"):
        _, gl, rmcm = _zero_shot_reference(weights, copy, split, "patch_tokens")
        np.testing.assert_allclose(_scores(copy, "gl-mcm", split), gl, rtol=1e-5)
        np.testing.assert_allclose(_scores(copy, "r-mcm", split), rmcm, rtol=1e-5)
        # the two readings are different numbers (the default reads patch_values)
        assert np.abs(_scores(copy, "gl-mcm", split) - _scores(store, "gl-mcm", split)).max() > 1e-3
    code, _, err = run(capsys, "score", "gl-mcm", "--store", copy, "-p", "gl-mcm.local_layer=cls")
    assert code == 2 and one_line_error(err) and "patch_values, patch_tokens" in err


def test_r_mcm_with_k_1_is_gl_mcm(capsys, clip_store, scored):
    _, store = clip_store
    assert run(capsys, "-q", "score", "r-mcm", "--store", store, "-p", "r-mcm.k=1")[0] == 0
    for split in SPLITS:
        np.testing.assert_allclose(_scores(store, "r-mcm", split), _scores(store, "gl-mcm", split), rtol=1e-6)


def test_temperature_and_ensemble_templates(clip_store, scored):
    from oodcli.scorers.clip_zeroshot import MCM

    weights, store = clip_store
    templates = text.templates_for("ensemble")
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    per_template = np.stack([_unit(_prototypes(weights, tpl)) for tpl in templates])
    t = _unit(per_template.mean(axis=0))
    v = _unit(_features(store, "test", "image_embeds"))
    expected = [max(_softmax(row / 0.5)) for row in v @ t.T]
    with open_store(store, "r+") as st:
        got = MCM(temperature=0.5, templates="ensemble").score(st, "clip-tiny", "test")
        assert st.is_array("fitted/text/clip-tiny/digits/ensemble/embeds")
    np.testing.assert_allclose(got, expected, rtol=1e-4)


# ---- text prototypes: cached, reused without the model, refused from another CLIP ----------


def test_text_cache_hits_do_not_build_the_model(capsys, monkeypatch, clip_store, scored):
    _, store = clip_store
    with open_store(store) as st:
        attrs = st.node_attrs("fitted/text/clip-tiny/digits/photo")
        assert attrs["complete"] and attrs["class_names"] == NAMES and attrs["templates"] == ["a photo of a {}."]
        assert st.shape("fitted/text/clip-tiny/digits/photo/embeds") == (6, 32)
    before = _scores(store, "mcm", "test")

    def no_build(source):
        raise OodError("a cache hit must not build the backbone")

    monkeypatch.setattr(text, "build_text_tower", no_build)
    code, out, _ = run(capsys, "score", "mcm,gl-mcm", "--store", store)
    assert code == 0 and "cached" in out
    np.testing.assert_array_equal(_scores(store, "mcm", "test"), before)
    # other names are another label set: a cache miss, which does need the model
    names = store.parent / "my_names.txt"
    names.write_text("\n".join(NAMES[::-1]) + "\n")
    code, _, err = run(capsys, "score", "mcm", "--store", store, "-p", f"mcm.labels={names}")
    assert code != 0 and "cache hit must not build" in err


def test_a_names_file_gives_its_own_label_set(capsys, clip_store, scored):
    _, store = clip_store
    names = store.parent / "same_names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    assert run(capsys, "-q", "score", "mcm", "--store", store, "-p", f"mcm.labels={names}")[0] == 0
    with open_store(store) as st:
        assert st.is_array("fitted/text/clip-tiny/labels-same_names/photo/embeds")
        a = st.read("fitted/text/clip-tiny/labels-same_names/photo/embeds")
        b = st.read("fitted/text/clip-tiny/digits/photo/embeds")
    np.testing.assert_allclose(a, b, atol=1e-6)


def _copy(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy


def test_text_prototypes_from_another_clip_are_refused(capsys, tmp_path, clip_store, scored):
    weights, store = clip_store
    other = tmp_path / "other.safetensors"
    _save_tiny(other, seed=2)
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        st.delete("fitted/text")
        for split in SPLITS:  # as if the file the features came from had been replaced
            st.set_attrs(f"splits/{split}/clip-tiny", weights_source=str(other))
    code, _, err = run(capsys, "score", "mcm", "--store", copy)
    assert code == 1 and one_line_error(err) and "another CLIP" in err
    with open_store(copy, "r+") as st:
        for split in SPLITS:
            st.set_attrs(f"splits/{split}/clip-tiny", weights_source=str(tmp_path / "gone.safetensors"))
    code, _, err = run(capsys, "score", "mcm", "--store", copy)
    assert code == 1 and one_line_error(err) and "are gone" in err


def test_gl_mcm_and_r_mcm_need_patch_values(capsys, tmp_path, clip_store):
    _, store = clip_store
    copy = _without_layers(store, tmp_path, ("patch_tokens", "patch_values"))
    for method in ("gl-mcm", "r-mcm"):
        code, _, err = run(capsys, "score", method, "--store", copy)
        assert code == 1 and one_line_error(err) and "patch_values" in err
    assert run(capsys, "-q", "score", "mcm", "--store", copy)[0] == 0  # the global score still works


def _without_layers(store, tmp_path, layers):
    """A copy of the store extracted without ``layers`` (arrays and attributes), and no scores."""
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        if st.exists("scores"):
            st.delete("scores")
        for split in SPLITS:
            node = f"splits/{split}/clip-tiny"
            attrs = st.node_attrs(node)
            for layer in layers:
                st.delete(f"{node}/{layer}")
            st.set_attrs(node, layers=[k for k in attrs["layers"] if k not in layers],
                         layer_shapes={k: v for k, v in attrs["layer_shapes"].items() if k not in layers})
    return copy


def test_a_store_of_patch_tokens_only_is_told_how_to_re_extract(capsys, tmp_path, clip_store, scored):
    _, store = clip_store
    copy = _without_layers(store, tmp_path, ("patch_values",))  # as extracted before patch_values existed
    for method in ("gl-mcm", "r-mcm"):
        code, _, err = run(capsys, "score", method, "--store", copy)
        assert code == 1 and one_line_error(err), err
        assert "oodcli extract --model clip-tiny" in err and "patch_values" in err and "--overwrite" in err
        assert f"-p {method}.local_layer=patch_tokens" in err
        with open_store(copy) as st:
            assert not st.exists(f"scores/{method}")  # never scored on the other layer
    # what 'score all' asks for does not leave them out silently: they are skipped with that reason
    from oodcli.scoring import score_methods

    with open_store(copy, "r+") as st:
        outcomes = {o.method: o for o in score_methods(st, ["mcm", "gl-mcm"], only_applicable=True)}
    assert outcomes["mcm"].status == "written" and outcomes["gl-mcm"].status == "skipped"
    assert "gl-mcm.local_layer=patch_tokens" in outcomes["gl-mcm"].reason
    # the old reading, asked for by name, still scores the old store
    assert run(capsys, "-q", "score", "gl-mcm", "--store", copy, "-p", "gl-mcm.local_layer=patch_tokens")[0] == 0


def test_bad_parameters_are_usage_errors(capsys, clip_store):
    _, store = clip_store
    for param in ("mcm.templates=nonsense", "r-mcm.k=0", "mcm.temperature=0", "neglabel.ngroup=0",
                  "neglabel.templates=ensemble"):
        method = param.split(".")[0]
        code, _, err = run(capsys, "score", method, "--store", store, "-p", param)
        assert code == 2 and one_line_error(err), (param, err)
    code, _, err = run(capsys, "score", "r-mcm", "--store", store, "-p", "r-mcm.k=1000")
    assert code == 2 and one_line_error(err) and "exceeds" in err


def test_vit_b_16_patch_tokens_are_196_by_512():
    model = get_spec("clip-vit-b-16").build("random")  # the real architecture, offline
    assert model.layer_shapes == {"image_embeds": (512,), "patch_tokens": (196, 512), "patch_values": (196, 512),
                                  "penultimate": (512,)}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, ("image_embeds", "patch_tokens", "patch_values"))
    for layer in ("patch_tokens", "patch_values"):
        assert out[layer].shape == (1, 196, 512)
        torch.testing.assert_close(out[layer].norm(dim=-1), torch.ones(1, 196))
    torch.testing.assert_close(out["patch_values"][0], _value_path_by_hand(model.model.visual, x)[0], atol=1e-5, rtol=1e-4)


def test_short_text_forward_equals_open_clips_encode_text(clip_store):
    weights, _ = clip_store
    model = _model(weights)
    prompts = ["x", "The nice physical entity.", "a photo of a " + "very " * 20 + "long thing."]
    with torch.no_grad():
        tower = get_spec("clip-tiny").build_text(str(weights))
        assert type(tower.text).__name__ == "TextTransformer"  # the text half alone
        torch.testing.assert_close(tower.encode_text(prompts), model.encode_text(prompts), atol=1e-6, rtol=1e-5)


# ---- the patch tokens are the model's own head applied to each token ----------------------


def test_patch_tokens_equal_the_models_head_on_each_token(clip_store):
    weights, store = clip_store
    model = _model(weights)
    visual = model.model.visual
    stored = _features(store, "test", "patch_tokens")[:2]
    from oodcli.data.digits import digits_part

    data = digits_part("test", False)
    x = torch.stack([get_spec("clip-tiny").preprocess.to_transform()(data.load(i)) for i in range(2)])
    with torch.no_grad():
        hidden = {}
        hook = visual.transformer.register_forward_hook(lambda m, i, o: hidden.update(h=o))
        model.model.encode_image(x)
        hook.remove()
        for h in range(stored.shape[1]):
            # the visual head pools the class token (position 0): put patch h there instead
            swap = visual.transformer.register_forward_hook(
                lambda m, i, o, h=h: torch.cat([hidden["h"][:, 1 + h : 2 + h], hidden["h"][:, 1:]], dim=1)
            )
            head = F.normalize(model.model.encode_image(x), dim=-1).double().numpy()
            swap.remove()
            np.testing.assert_allclose(stored[:, h], head, atol=1e-5)


# ---- patch_values: the last block's value path (MaskCLIP style), as the local methods' code ----


def _value_path_by_hand(visual, x):
    """patch_values written out from the weights: the last block's input, then
    v = x + out_proj(W_v ln_1(x) + b_v); v = v + mlp(ln_2(v)); ln_post(v) @ proj per patch."""
    caught = {}
    last = visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda m, args: caught.update(x=args[0]))
    with torch.no_grad():
        visual(x)
    hook.remove()
    h = caught["x"]  # [N, 1 + P, W], batch first

    def layer_norm(t, ln):
        return F.layer_norm(t, (t.shape[-1],), ln.weight, ln.bias, ln.eps)

    def act(t):  # the block's activation, by its kind
        return t * torch.sigmoid(1.702 * t) if type(last.mlp.gelu).__name__ == "QuickGELU" else F.gelu(t)

    width = h.shape[-1]
    w_v = last.attn.in_proj_weight[2 * width : 3 * width]
    b_v = last.attn.in_proj_bias[2 * width : 3 * width]
    with torch.no_grad():
        y = layer_norm(h, last.ln_1) @ w_v.T + b_v
        y = y @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
        v = h + y
        hidden = act(layer_norm(v, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias)
        v = v + hidden @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
        out = layer_norm(v[:, 1:], visual.ln_post) @ visual.proj
    return out / out.norm(dim=-1, keepdim=True)


def test_patch_values_equal_a_hand_written_value_path(clip_store):
    weights, store = clip_store
    model = _model(weights)
    from oodcli.data.digits import digits_part

    data = digits_part("test", False)
    x = torch.stack([get_spec("clip-tiny").preprocess.to_transform()(data.load(i)) for i in range(4)])
    expected = _value_path_by_hand(model.model.visual, x).double().numpy()
    stored = _features(store, "test", "patch_values")[:4]  # float32 extraction
    assert stored.shape == (4, 16, 32)
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    # not the final-layer tokens: the last attention's mixing is skipped
    assert np.abs(stored - _features(store, "test", "patch_tokens")[:4]).max() > 0.05


def test_patch_values_come_from_the_same_image_encoder_pass():
    model = get_spec("clip-tiny").build("random")
    visual = model.model.visual
    calls = []
    hook = visual.conv1.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, ("image_embeds", "patch_tokens", "patch_values"))
    hook.remove()
    assert len(calls) == 1
    assert not visual.transformer.resblocks[-1]._forward_pre_hooks  # the hook is gone after the pass
    torch.testing.assert_close(out["patch_values"], _value_path_by_hand(visual, x), atol=1e-5, rtol=1e-4)


def test_patch_values_with_layer_scale():
    import open_clip

    from oodcli.backbones.clip import TINY_CFG, ClipBackbone

    torch.manual_seed(0)
    vision = dict(TINY_CFG["vision_cfg"], ls_init_value=0.3)
    net = ClipBackbone(open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TINY_CFG["text_cfg"]), None, 32)
    last = net.model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net(x, ("patch_values",))["patch_values"]
        # with layer scales gamma_1, gamma_2: v = x + gamma_1 * y; v = v + gamma_2 * mlp(ln_2(v))
        caught = {}
        hook = last.register_forward_pre_hook(lambda m, args: caught.update(x=args[0]))
        net.model.visual(x)
        hook.remove()
        h, width = caught["x"], caught["x"].shape[-1]
        y = last.attn.out_proj(F.linear(last.ln_1(h), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:]))
        v = h + last.ls_1.gamma * y
        v = v + last.ls_2.gamma * last.mlp(last.ln_2(v))
        expected = F.normalize(net.model.visual.ln_post(v[:, 1:]) @ net.model.visual.proj, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ---- NegLabel -------------------------------------------------------------------------------


def _neglabel_reference(weights, store, split, wordnet, m, ngroup, percentile=0.95, seed=0, tau=0.01):
    """NegMining and the grouped NegLabel score, written from the papers' formulas."""
    model = _model(weights)
    with torch.no_grad():
        ids = model.encode_text([f"The nice {n}" for n in NAMES]).double().numpy()
        nouns, adjs = negatives.read_wordnet(wordnet, exclude=NAMES)
        noun_emb = model.encode_text([f"The nice {w}" for w in nouns]).double().numpy()
        adj_emb = model.encode_text([f"This is a {w} photo" for w in adjs]).double().numpy()
    n_nouns = round(m * len(nouns) / (len(nouns) + len(adjs)))
    chosen = []
    for emb, n in ((noun_emb, n_nouns), (adj_emb, m - n_nouns)):
        dist = np.array([np.quantile(row, percentile) for row in emb @ ids.T])
        chosen.append(emb[np.sort(np.argsort(dist, kind="stable")[:n])])
    neg = np.concatenate(chosen)
    size = m // ngroup
    groups = neg[np.random.default_rng(seed).permutation(m)[: size * ngroup]].reshape(ngroup, size, -1)
    v = _unit(_features(store, split, "image_embeds"))
    out = []
    for x in v:
        pos = np.exp(x @ ids.T / tau).sum()
        out.append(np.mean([pos / (pos + np.exp(x @ g.T / tau).sum()) for g in groups]))
    return np.array(out), nouns, adjs


def test_neglabel_matches_the_formula(capsys, monkeypatch, tmp_path, clip_store, fake_wordnet):
    weights, store = clip_store
    copy = _copy(store, tmp_path)
    params = ["-p", f"neglabel.wordnet={fake_wordnet}", "-p", "neglabel.num_negatives=12", "-p", "neglabel.ngroup=3"]
    assert run(capsys, "-q", "score", "neglabel", "--store", copy, *params)[0] == 0
    expected, nouns, adjs = _neglabel_reference(weights, copy, "test", fake_wordnet, m=12, ngroup=3)
    assert "Five" not in nouns and "physical entity" in nouns and "abridged" in adjs  # parsed as words
    np.testing.assert_allclose(_scores(copy, "neglabel", "test"), expected, rtol=1e-4)
    with open_store(copy) as st:
        attrs = st.node_attrs("fitted/text/clip-tiny/digits/neglabel")
        assert len(attrs["words"]) == 12 and attrs["candidates"] == len(nouns) + len(adjs)
        assert st.shape("fitted/text/clip-tiny/digits/neglabel/embeds") == (12, 32)
    # the mined set is cached: no model, no WordNet needed the second time
    shutil.rmtree(fake_wordnet)
    def no_build(source):
        raise OodError("a cache hit must not build the backbone")

    monkeypatch.setattr(text, "build_text_tower", no_build)
    assert run(capsys, "-q", "score", "neglabel", "--store", copy, *params)[0] == 0
    np.testing.assert_allclose(_scores(copy, "neglabel", "test"), expected, rtol=1e-4)


def test_neglabel_asks_for_no_more_words_than_wordnet_has(capsys, tmp_path, clip_store, fake_wordnet):
    _, store = clip_store
    code, _, err = run(capsys, "score", "neglabel", "--store", _copy(store, tmp_path),
                       "-p", f"neglabel.wordnet={fake_wordnet}", "-p", "neglabel.num_negatives=500")
    assert code == 2 and one_line_error(err) and "num_negatives" in err


def test_wordnet_parser_and_nltk_zip(tmp_path, fake_wordnet):
    assert negatives.headwords(NOUNS.splitlines())[:3] == ["entity", "physical entity", "abstraction"]
    nouns, adjs = negatives.read_wordnet(fake_wordnet, exclude=["entity"])
    assert "entity" not in nouns and "thing" in nouns and nouns.count("thing") == 1  # deduplicated
    assert adjs[:3] == ["able", "unable", "abaxial"] and "abridged" in adjs
    nltk = tmp_path / "nltk_data" / "corpora"
    nltk.mkdir(parents=True)
    with zipfile.ZipFile(nltk / "wordnet.zip", "w") as z:  # nltk's download keeps the corpus zipped
        z.writestr("wordnet/data.noun", NOUNS)
        z.writestr("wordnet/data.adj", ADJS)
    found = negatives.find_wordnet(nltk / "wordnet.zip")
    assert negatives.read_wordnet(found) == negatives.read_wordnet(fake_wordnet)


def test_select_negatives_takes_the_least_id_like_share_of_each():
    rng = np.random.default_rng(0)
    protos = _unit(rng.normal(size=(5, 8)))
    nouns, adjs = _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(10, 8)))
    pick_n, pick_a = negatives.select_negatives(nouns, adjs, protos, count=8, percentile=0.5)
    assert len(pick_n) == 6 and len(pick_a) == 2  # 30:10 candidates -> 6:2 of 8
    median = np.median(nouns @ protos.T, axis=1)
    assert set(pick_n) == set(np.argsort(median)[:6])


# ---- ImageNet benchmarks and data ------------------------------------------------------------


def test_imagenet_names_templates_and_500_class_benchmarks():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from oodcli.data.benchmarks import get_benchmark

    clip_names = text.imagenet_clip_names()
    assert clip_names == list(IMAGENET_CLASSNAMES)  # CLIP's cleaned list, as open_clip ships it
    assert list(text.templates_for("ensemble")) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    for name in ("imagenet", "imagenet-mos"):
        assert get_benchmark(name).resolve_prompt_names() == clip_names
    easy, hard = get_benchmark("imagenet500-easy"), get_benchmark("imagenet500-hard")
    assert easy.resolve_prompt_names() == clip_names[:500] and hard.resolve_prompt_names() == clip_names[500:]
    assert easy.resolve_class_names() == get_benchmark("imagenet-mos").resolve_class_names()[:500]
    assert hard.split("test").source == "classes:500-999:folder:imagenet/val"
    assert hard.split_names("ood") == get_benchmark("imagenet-mos").split_names("ood")
    assert get_benchmark("digits").resolve_prompt_names() == NAMES


def test_class_range_source(tmp_path):
    from PIL import Image

    from oodcli.data.base import open_source

    for c in ("a", "b", "c", "d"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / c / f"{i}.png")
    data = open_source(f"classes:1-2:folder:{tmp_path}", tmp_path)
    assert data.labels.tolist() == [0, 0, 1, 1] and data.class_names == ["b", "c"]
    assert data.name.startswith("classes:1-2:folder:") and data.load(3).size == (4, 4)
    assert (open_source(f"classes:1-2:folder:{tmp_path}", tmp_path, is_ood=True).labels == -1).all()


# ---- the tiny CLIP trainer --------------------------------------------------------------------


def test_train_clip_writes_weights_that_extract_loads(capsys, tmp_path):
    import json

    ckpt = tmp_path / "tiny.safetensors"
    code, out, _ = run(capsys, "-q", "train", "clip", "--out", ckpt, "--epochs", "1", "--json")
    assert code == 0 and ckpt.is_file()
    result = json.loads(out)
    assert result["epochs"] == 1 and 0.0 <= result["test_accuracy"] <= 1.0
    code, _, _ = run(capsys, "-q", "extract", "--model", "clip-tiny", "--weights", ckpt, "--benchmark", "digits",
                     "--split", "test", "--store", tmp_path / "s.zarr")
    assert code == 0
    code, _, err = run(capsys, "train", "clip", "--model", "clip-vit-b-16", "--out", tmp_path / "x.safetensors")
    assert code == 2 and one_line_error(err)


@pytest.mark.parametrize("method", ["mcm", "gl-mcm", "r-mcm"])
def test_detector_scores_new_images_as_stored(scored, method):
    """The CLIP image encoder rebuilt from the store, its text prototypes from the cache: the stored scores."""
    from oodcli.deploy import Detector

    det = Detector.from_store(scored, method, threshold=None, batch_size=128)
    pred = det.predict("digits:test")
    assert np.array_equal(pred.scores, _scores(scored, method, "test").astype(np.float32))
    # the predicted class is CLIP's zero-shot one
    x = _features(scored, "test", "image_embeds")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert np.array_equal(pred.predicted, (x @ np.asarray(det.scorer.prototypes, np.float64).T).argmax(1))
