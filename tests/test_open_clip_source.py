"""``--model open_clip:...``: a tiny open_clip model made here (open_clip's own folder format, its
configuration a small dict), extracted into a digits store, and the CLIP methods run on it from the
store against the model's own encode_image / encode_text; pretrained tags resolved without a download."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error, run
from oodcli import text
from oodcli.backbones.spec import get_spec
from oodcli.data.base import data_root, open_source
from oodcli.store import open_store

TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
#: not open_clip's defaults, so a preprocessing read from the wrong place shows
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                  "resize_mode": "squash"}
SPLITS = ("--split", "train", "--split", "test", "--split", "ood/far/noise")
NODE = "splits/{}/open_clip:tinyclip"

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root: Path, seed: int = 1) -> Path:
    """open_clip's own format: open_clip_config.json (model_cfg, preprocess_cfg) and the checkpoint beside it."""
    import open_clip
    from safetensors.torch import save_file

    folder = root / "tinyclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": PREPROCESS_CFG}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc")
    folder = _folder(root)
    store = root / "clip.zarr"
    args = ["extract", "--model", f"open_clip:{folder}", "--benchmark", "digits", *SPLITS, "--store", store,
            "--layers", "image_embeds,patch_tokens,patch_values", "--dtype", "float32", "--json"]
    from oodcli.cli import main

    assert main([str(a) for a in args]) == 0
    return folder, store, args


def _own_model(folder: Path):
    """The model and image transform as open_clip itself loads the folder."""
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def test_stored_layers_are_the_models_own_encode_image(made):
    folder, store, _ = made
    model, preprocess, _ = _own_model(folder)
    data = open_source("digits:test", data_root(None))
    x = torch.stack([preprocess(data.load(i)) for i in range(12)])  # open_clip's transform: squash, its mean/std
    with torch.no_grad():
        pooled = model.encode_image(x)
        model.visual.output_tokens = True
        _, tokens = model.visual(x)
        model.visual.output_tokens = False
        tokens = tokens @ model.visual.proj
    with open_store(store, "r") as st:
        embeds = st.read(NODE.format("test") + "/image_embeds")[:12]
        patches = st.read(NODE.format("test") + "/patch_tokens")[:12]
        parts = st.node_attrs(NODE.format("test"))["parts"]
    np.testing.assert_allclose(embeds, F.normalize(pooled, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(patches, F.normalize(tokens, dim=-1).numpy(), atol=1e-5)
    assert parts["preprocess"] == {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                   "interpolation": "bilinear", "resize_mode": "squash"}
    assert parts["weights"].startswith("open_clip:dir:tinyclip:config_sha256=")
    assert "file:open_clip_model.safetensors:sha256=" in parts["weights"]


def test_zero_shot_mcm_from_the_store_equals_a_hand_computation(made, capsys):
    folder, store, _ = made
    code, out, err = run(capsys, "score", "mcm,gl-mcm", "--store", store)
    assert code == 0, err
    model, preprocess, tokenizer = _own_model(folder)
    with open_store(store, "r") as st:
        _, names = text.label_set(st)
        scores = st.read("scores/mcm/ood/far/noise")
    data = open_source("digits:ood/far/noise", data_root(None), True)
    x = torch.stack([preprocess(data.load(i)) for i in range(20)])
    with torch.no_grad():
        image = F.normalize(model.encode_image(x), dim=-1)
        prompts = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    expected = torch.softmax(image @ prompts.T / 1.0, dim=1).max(dim=1).values.numpy()  # MCM, T = 1
    np.testing.assert_allclose(scores[:20], expected, rtol=1e-5, atol=1e-6)
    code, out, err = run(capsys, "report", "--store", store, "--format", "json")
    assert code == 0 and {"mcm", "gl-mcm"} <= set(json.loads(out)["methods"])


def test_prompt_learning_trains_on_it(made, capsys, tmp_path):
    folder, store, _ = made
    out_file = tmp_path / "coop.safetensors"
    code, out, err = run(capsys, "train", "coop", "--store", store, "--out", out_file, "--shots", "2",
                         "--epochs", "2", "--n-ctx", "2", "--json")
    assert code == 0, err
    code, _, err = run(capsys, "score", "coop", "--store", store, "-p", f"coop.prompts={out_file}")
    assert code == 0, err
    with open_store(store, "r") as st:
        assert np.isfinite(st.read("scores/coop/test")).all()


def test_text_from_other_weights_is_refused(made, capsys, tmp_path):
    """The text tower is rebuilt from the store's recorded identity: a changed checkpoint is refused."""
    folder, store, _ = made
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    saved = (folder / "open_clip_model.safetensors").read_bytes()
    try:
        shutil.copy(_folder(tmp_path, seed=7) / "open_clip_model.safetensors", folder / "open_clip_model.safetensors")
        code, _, err = run(capsys, "score", "mcm", "--store", copy, "-p", "mcm.templates=a photo of {}")
    finally:
        (folder / "open_clip_model.safetensors").write_bytes(saved)
    assert code == 1 and one_line_error(err) and "another CLIP" in err


FAST_PROBE = """
import json, sys
from oodcli.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_random_and_file_weights_cache_hit_imports_no_torch(tmp_path):
    folder = _folder(tmp_path)
    shutil.move(folder / "open_clip_model.safetensors", tmp_path / "w.safetensors")
    for weights in ("random:3", str(tmp_path / "w.safetensors")):
        args = ["extract", "--model", f"open_clip:{folder}@{weights}", "--benchmark", "digits", "--split",
                "ood/far/noise", "--store", str(tmp_path / f"s{len(weights)}.zarr"), "--json"]
        first = subprocess.run([sys.executable, "-c", FAST_PROBE, *args], capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        second = subprocess.run([sys.executable, "-c", FAST_PROBE, *args], capture_output=True, text=True, timeout=300)
        assert json.loads(second.stderr.strip().splitlines()[-1]) == {"rc": 0, "torch": False}
        assert [r["status"] for r in json.loads(second.stdout)] == ["cached"]


def test_random_weights_are_seeded_and_the_seed_is_the_identity(tmp_path, capsys):
    folder = _folder(tmp_path)
    a, b = get_spec(f"open_clip:{folder}@random"), get_spec(f"open_clip:{folder}@random:1")
    assert a.weights_identity(None).endswith("random:seed=0") and b.weights_identity(None).endswith("random:seed=1")
    x = torch.randn(2, 3, 32, 32)
    first, again, other = (s.build().forward_layers(x, ("image_embeds",))["image_embeds"] for s in (a, a, b))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    tower = a.build_text()  # the text half of the same seeded model
    model = a.source.module()
    with torch.no_grad():
        np.testing.assert_allclose(tower.encode_text(["a photo of a two."]).numpy(),
                                   model.encode_text(tower.tokenize(["a photo of a two."]), normalize=True).numpy(),
                                   atol=1e-5)


def test_pretrained_tags_resolve_without_downloading():
    """open_clip's table decides the identity and the preprocessing (its own transform's settings)."""
    import open_clip

    openai = get_spec("open_clip:ViT-B-16@openai")
    assert openai.family == "clip" and openai.activation == "quick_gelu"  # OpenAI's weights were trained with it
    assert openai.weights_identity(None).startswith("open_clip:ViT-B-16:pretrained:openai:")
    assert (openai.preprocess.resize, openai.preprocess.crop, openai.preprocess.interpolation) == (224, 224, "bicubic")
    assert openai.name == "open_clip:ViT-B-16" and openai.default_layers == ("image_embeds",)
    siglip = get_spec("open_clip:ViT-B-16-SigLIP@webli")
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    assert siglip.preprocess.resize_mode == cfg["resize_mode"] == "squash"
    assert siglip.preprocess.mean == tuple(cfg["mean"]) and siglip.activation is None
    large = get_spec("open_clip:ViT-L-14@random")
    assert large.preprocess.crop == 224 and large.weights_identity(None) == "open_clip:ViT-L-14:random:seed=0"


def test_list_models_names_the_open_clip_source(capsys):
    code, out, _ = run(capsys, "extract", "--list-models")
    assert code == 0 and "open_clip:<arch>@<tag|FILE|random>" in out.replace("\n", " ")


BAD = [
    (["--model", "open_clip:ViT-B-61@random"], "open_clip has no model 'ViT-B-61'; close matches: ViT-B-16"),
    (["--model", "open_clip:ViT-B-16"], "name its weights: open_clip:ViT-B-16@TAG"),
    (["--model", "open_clip:ViT-B-16@laion9b"], "open_clip has no pretrained tag 'laion9b' for ViT-B-16"),
    (["--model", "open_clip:ViT-B-16@{dir}/gone.safetensors"], "weights file not found"),
    (["--model", "open_clip:ViT-B-16@random", "--weights", "random"], "names its weights after '@'"),
    (["--model", "open_clip:ViT-B-16@random", "--head", "visual.proj"], "--head goes with classifiers"),
    (["--model", "open_clip:{dir}"], "has no open_clip_config.json"),
    (["--model", "open_clip:{dir}/tinyclip@openai"], "a folder's weights are its checkpoint"),
]


@pytest.mark.parametrize("args,says", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_names_are_one_line_and_write_nothing(tmp_path, capsys, args, says):
    (tmp_path / "tinyclip").mkdir()
    (tmp_path / "tinyclip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    store = tmp_path / "never.zarr"
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code, out, err = run(capsys, "extract", *args, "--benchmark", "digits", "--split", "ood/far/noise",
                         "--store", store)
    assert code in (1, 2) and one_line_error(err), err
    assert says in err, err
    assert not store.exists()
