"""``--model SOURCE:NAME``: torchvision, timm, Hugging Face and the user's own module, each a tiny random
model made here, run through the hook-based adapter into a digits store and scored end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import one_line_error, run
from oodcli.backbones.spec import get_spec
from oodcli.data.base import data_root, open_source
from oodcli.store import open_store

DIGITS = ("--benchmark", "digits", "--split", "train", "--split", "test", "--split", "ood/far/noise")
PRE32 = "resize=32,crop=32,mean=0.5/0.5/0.5,std=0.5/0.5/0.5"

USER_MODULE = '''
import torch
from torch import nn


def build():
    """A small CNN: conv stages, a global pool and a linear classifier over 6 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6),
    )


def build_with_preprocess():
    net = build()
    net.preprocess = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return net


def broken():
    raise ValueError("depth 99 is not supported\\nsecond line of the message")
'''


def _hf_folder(root: Path) -> Path:
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(1)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=6)
    folder = root / "tiny-hf-resnet"
    ResNetForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def _reference(kind: str, where: Path):
    """The module each source should build, made here independently, and the --model / --weights to give."""
    if kind == "python":
        (where / "user_models.py").write_text(USER_MODULE)
        sys.path.insert(0, str(where))
        try:
            import user_models
        finally:
            sys.path.remove(str(where))
        torch.manual_seed(0)
        net = user_models.build().eval()
        weights = where / "user.safetensors"
        from safetensors.torch import save_file

        torch.manual_seed(3)
        for p in net.parameters():
            nn.init.normal_(p, std=0.3)
        save_file(net.state_dict(), str(weights))
        return net, f"python:{where / 'user_models.py'}:build", ["--weights", str(weights), "--preprocess", PRE32]
    if kind == "timm":
        import timm

        torch.manual_seed(0)
        return timm.create_model("test_resnet", pretrained=False).eval(), "timm:test_resnet", \
            ["--weights", "random", "--preprocess", "resize=32,crop=32"]
    if kind == "hf":
        from transformers import ResNetForImageClassification

        folder = _hf_folder(where)
        net = ResNetForImageClassification.from_pretrained(folder).eval()
        return (lambda x: net(pixel_values=x).logits), f"hf:{folder}", []
    torch.manual_seed(0)
    from torchvision.models import get_model

    return get_model("resnet18", weights=None).eval(), "torchvision:resnet18", \
        ["--weights", "random", "--preprocess", "resize=32,crop=32"]


@pytest.fixture(scope="module", params=["python", "timm", "hf", "torchvision"])
def made(request, tmp_path_factory, one_thread):
    where = tmp_path_factory.mktemp(request.param)
    net, model, extra = _reference(request.param, where)
    store = where / "digits.zarr"
    args = ["extract", "--model", model, *extra, *DIGITS, "--store", store, "--dtype", "float32",
            "--layers", "logits,penultimate", "--json"]
    return request.param, net, model, extra, store, args


def _stored(store: Path, split: str, layer: str) -> np.ndarray:
    with open_store(store, "r") as st:
        (backbone,) = [b for b in st.children(f"splits/{split}") if b not in ("labels", "ids")]
        return st.read(f"splits/{split}/{backbone}/{layer}"), backbone


def test_stored_layers_are_the_modules_own_forward_and_its_head(made, capsys):
    kind, net, model, extra, store, args = made
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert [r["status"] for r in json.loads(out)] == ["extracted"] * 3
    logits, backbone = _stored(store, "test", "logits")
    spec = get_spec(model, weights=extra[1] if extra[:1] == ["--weights"] else None,
                    preprocess=extra[extra.index("--preprocess") + 1] if "--preprocess" in extra else None)
    data = open_source("digits:test", data_root(None))
    transform = spec.preprocess.to_transform()
    x = torch.stack([transform(data.load(i)) for i in range(16)])
    with torch.no_grad():
        expected = net(x)
    np.testing.assert_allclose(logits[:16], expected.numpy(), atol=1e-5, rtol=1e-5)
    pen, _ = _stored(store, "test", "penultimate")
    with open_store(store, "r") as st:
        weight, bias = st.read(f"backbones/{backbone}/head/weight"), st.read(f"backbones/{backbone}/head/bias")
    np.testing.assert_allclose(pen @ weight.T + bias, logits, atol=1e-4, rtol=1e-4)

    code, out, err = run(capsys, *args)  # the second extract is a cache hit
    assert code == 0 and [r["status"] for r in json.loads(out)] == ["cached"] * 3
    code, out, err = run(capsys, "score", "all", "--store", store)
    assert code == 0, err
    code, out, err = run(capsys, "report", "--store", store, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert {"msp", "energy", "vim", "knn"} <= set(report["methods"])  # head-based vim ran
    assert "ood/far/noise" in report["ood_splits"]


FAST_PROBE = """
import json, sys
from oodcli.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_a_user_module_cache_hit_imports_no_torch(tmp_path, one_thread):
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    args = ["extract", "--model", f"python:{tmp_path / 'user_models.py'}:build", "--preprocess", PRE32,
            "--benchmark", "digits", "--split", "ood/far/noise", "--store", str(tmp_path / "s.zarr"), "--json"]
    first = subprocess.run([sys.executable, "-c", FAST_PROBE, *args], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-c", FAST_PROBE, *args], capture_output=True, text=True, timeout=300)
    probe = json.loads(second.stderr.strip().splitlines()[-1])
    assert probe == {"rc": 0, "torch": False}
    assert [r["status"] for r in json.loads(second.stdout)] == ["cached"]
    (tmp_path / "user_models.py").write_text(USER_MODULE + "\n# edited\n")  # the module's file is in the identity
    code = subprocess.run([sys.executable, "-m", "oodcli", *args], capture_output=True, text=True, timeout=300)
    assert code.returncode != 0 and "made differently" in code.stderr


def _images(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (240, 300, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_full_size_architecture_with_random_weights(tmp_path, capsys, one_thread):
    """convnext_tiny at 224 px: shapes and layer resolution that tiny models could hide."""
    store = tmp_path / "s.zarr"
    code, out, err = run(capsys, "extract", "--model", "torchvision:convnext_tiny", "--weights", "random",
                         "--data", f"folder:{_images(tmp_path / 'imgs')}", "--split", "ood/far/few", "--store", store,
                         "--layers", "logits,penultimate,featmap", "--layer", "stage2=features.3:out",
                         "--dtype", "float32")
    assert code == 0, err
    node = "splits/ood/far/few/torchvision:convnext_tiny"
    with open_store(store, "r") as st:
        logits, pen, fmap = (st.read(f"{node}/{k}") for k in ("logits", "penultimate", "featmap"))
        assert st.read(f"{node}/stage2").shape == (3, 192)  # a 4-D map, averaged over H x W
        weight, bias = st.read("backbones/torchvision:convnext_tiny/head/weight"), \
            st.read("backbones/torchvision:convnext_tiny/head/bias")
        parts = st.node_attrs(node)["parts"]
    assert logits.shape == (3, 1000) and pen.shape == (3, 768) and fmap.shape == (3, 768, 7, 7)
    np.testing.assert_allclose(pen @ weight.T + bias, logits, atol=1e-3, rtol=1e-3)
    assert parts["preprocess"]["resize"] == 256 and parts["preprocess"]["crop"] == 224
    assert "random:seed=0" in parts["weights"] and "stage2=features.3:out" in parts["weights"]


def test_hf_encoder_without_classifier_gives_its_pooled_vector_and_no_head(tmp_path, capsys, one_thread):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    net = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).eval()
    net.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    store = tmp_path / "s.zarr"
    code, out, err = run(capsys, "extract", "--model", f"hf:{folder}", "--benchmark", "digits", "--split",
                         "ood/far/noise", "--store", store, "--dtype", "float32")
    assert code == 0, err
    with open_store(store, "r") as st:
        pen = st.read("splits/ood/far/noise/hf:tiny-vit/penultimate")
        assert not st.exists("backbones/hf:tiny-vit")  # no classifier: no head
    spec = get_spec(f"hf:{folder}")
    x = spec.preprocess.to_transform()(open_source("digits:ood/far/noise", data_root(None), True).load(0))
    with torch.no_grad():
        expected = net(pixel_values=x[None]).pooler_output
    np.testing.assert_allclose(pen[0], expected[0].numpy(), atol=1e-5)
    assert spec.default_layers == ("penultimate",) and "logits" not in spec.layers


def test_head_and_layer_paths_and_strict_false(tmp_path, capsys, one_thread):
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    model = f"python:{tmp_path / 'user_models.py'}:build_with_preprocess"  # carries its preprocessing
    from safetensors.torch import save_file

    torch.manual_seed(0)
    partial = {k: v for k, v in nn.Linear(16, 6).state_dict().items()}
    save_file({f"6.{k}": v for k, v in partial.items()}, str(tmp_path / "head_only.safetensors"))
    store = tmp_path / "s.zarr"
    base = ["extract", "--model", model, "--benchmark", "digits", "--split", "ood/far/noise", "--store", store,
            "--dtype", "float32", "--weights", tmp_path / "head_only.safetensors"]
    code, out, err = run(capsys, *base)
    assert code == 2 or code == 1
    assert one_line_error(err) and "4 missing (0.weight, 0.bias, 2.weight, +1 more)" in err and "--strict false" in err
    assert not store.exists()
    code, out, err = run(capsys, *base, "--strict", "false", "--head", "6", "--layer", "conv1=1:out")
    assert code == 0 and "warning:" in err and "4 missing" in err
    node = "splits/ood/far/noise/python:user_models.py:build_with_preprocess"
    with open_store(store, "r") as st:
        conv1, logits = st.read(f"{node}/conv1"), st.read(f"{node}/logits")
        assert st.node_attrs(node)["parts"]["weights"].endswith("head=6; layer conv1=1:out")
        np.testing.assert_allclose(st.read("backbones/python:user_models.py:build_with_preprocess/head/bias"),
                                   partial["bias"].numpy())
    assert conv1.shape == (300, 8) and (conv1 >= 0).all()  # the ReLU's output, averaged over H x W
    code, out, err = run(capsys, *base, "--strict", "false", "--head", "6", "--layer", "conv1=3:out")
    assert code != 0 and "made differently" in err  # another layer path is another identity


def _case_store(tmp_path: Path) -> Path:
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    return tmp_path / "never.zarr"


BAD = [
    (["--model", "keras:resnet50"], "unknown model source 'keras'"),
    (["--model", "torchvision:resnet5O"], "close matches: resnet50"),
    (["--model", "timm:resnet10"], "timm has no model 'resnet10'; close matches: resnet10t"),
    (["--model", "python:{dir}/user_models.py:broken", "--preprocess", PRE32],
     "broken() raised ValueError: depth 99 is not supported"),
    (["--model", "python:{dir}/user_models.py:biuld", "--preprocess", PRE32], "close matches: build"),
    (["--model", "python:{dir}/user_models.py:build"], "carries no preprocessing"),
    (["--model", "python:{dir}/user_models.py:build", "--preprocess", "crop=32"],
     "give --preprocess with resize, mean, std"),
    (["--model", "python:{dir}/user_models.py:build", "--preprocess", PRE32, "--layer", "x=9.conv"],
     "has no module '9.conv'; near it: 0, 1, 2"),
    (["--model", "torchvision:resnet18", "--weights", "random", "--layer", "x=layer5.0"],
     "layer1, layer2, layer3, layer4"),
    (["--model", "torchvision:vit_b_16", "--weights", "random", "--layers", "featmap"], "has no layer 'featmap'"),
    (["--model", "torchvision:resnet18", "--weights", "IMAGENET9K"], "unknown weights 'IMAGENET9K'"),
    (["--model", "torchvision:resnet18", "--weights", "{dir}/w.pt"], "weights file not found"),
    (["--model", "resnet18-tiny", "--head", "fc"], "--head goes with SOURCE:NAME models"),
    (["--model", "hf:{dir}/nothing-here"], "hf:"),
]


@pytest.mark.parametrize("args,says", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_model_input_is_one_line_and_writes_nothing(tmp_path, capsys, one_thread, args, says):
    store = _case_store(tmp_path)
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code, out, err = run(capsys, "extract", *args, "--benchmark", "digits", "--split", "ood/far/noise",
                         "--store", store)
    assert code in (1, 2) and one_line_error(err), err
    assert says in err, err
    assert not store.exists()


def test_weights_that_do_not_fit_a_library_model(tmp_path, capsys, one_thread):
    torch.save({"fc.weight": torch.zeros(3, 7)}, tmp_path / "bad.pt")
    store = tmp_path / "s.zarr"
    code, out, err = run(capsys, "extract", "--model", "torchvision:resnet18", "--weights", tmp_path / "bad.pt",
                         "--preprocess", "resize=32,crop=32", "--data", f"folder:{_images(tmp_path / 'i', 2)}",
                         "--split", "ood/far/x", "--store", store)
    assert code == 1 and one_line_error(err) and "do not fit the model" in err and "missing" in err
    assert not store.exists()


def test_list_models_names_every_source(capsys):
    code, out, err = run(capsys, "extract", "--list-models")
    assert code == 0
    for text in ("torchvision:<name>", "timm:<name>", "hf:<repo>[@<revision>]", "python:<file.py", "resnet18-tiny"):
        assert text in out.replace("\n", " ") or text in out


def test_builtin_names_keep_their_specs():
    spec = get_spec("resnet18-tiny")
    assert type(spec).__name__ == "BackboneSpec" and spec.weights_identity(None) == "torchvision:random"


def test_detector_rebuilds_a_user_model_from_the_store(tmp_path, one_thread):
    """predict and the Detector name a SOURCE:NAME model again as extract did (files made absolute),
    from any folder, and give the stored scores."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "user_models.py").write_text(USER_MODULE)
    hf = _hf_folder(work)
    store_py, store_hf = tmp_path / "py.zarr", tmp_path / "hf.zarr"
    script = (
        "import os, sys, json\nfrom oodcli.cli import main\n"
        f"os.chdir({str(work)!r})\n"
        f"assert main(['-q', 'extract', '--model', 'python:user_models.py:build', '--preprocess', {PRE32!r}, "
        f"'--benchmark', 'digits', '--split', 'train', '--split', 'test', '--split', 'ood/far/noise', "
        f"'--store', {str(store_py)!r}]) == 0\n"
        f"assert main(['-q', 'extract', '--model', 'hf:tiny-hf-resnet', '--benchmark', 'digits', '--split', 'train', "
        f"'--split', 'test', '--split', 'ood/far/noise', '--store', {str(store_hf)!r}]) == 0\n"
        f"for s in ({str(store_py)!r}, {str(store_hf)!r}):\n"
        "    assert main(['-q', 'score', 'msp,knn', '--store', s]) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from oodcli.deploy import Detector

    for store in (store_py, store_hf):  # this process runs elsewhere: the relative names must not be needed
        det = Detector.from_store(store, "knn", threshold=None)
        with open_store(store) as st:
            stored = st.read("scores/knn/ood/far/noise")
        assert np.allclose(det.score("digits:ood/far/noise"), stored, atol=1e-6)
