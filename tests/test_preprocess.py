"""Preprocessing follows the checkpoint's data set, activation follows the weights' format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, run

from oodcli.backbones.spec import Preprocess, get_spec, parse_preprocess
from oodcli.errors import UsageError
from oodcli.store import open_store

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cifar100_root(tmp_path, n: int = 4):
    """OpenOOD's layout for the cifar100 test list, with a few generated 32x32 images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images_classic" / "cifar100" / "test").mkdir(parents=True)
    (tmp_path / "benchmark_imglist" / "cifar100").mkdir(parents=True)
    lines = []
    for i in range(n):
        rel = f"cifar100/test/{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images_classic" / rel)
        lines.append(f"{rel} {i % 100}")
    (tmp_path / "benchmark_imglist" / "cifar100" / "test_cifar100.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, [tmp_path / "images_classic" / f"cifar100/test/{i}.png" for i in range(n)]


def cifar_checkpoint(tmp_path):
    from oodcli.backbones.cifar_resnet import CifarResNet

    torch.manual_seed(3)
    net = CifarResNet(num_classes=100)
    for m in net.modules():  # non-trivial BN statistics, so the normalisation shows in the logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "r18_c100.pth"
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return net.eval(), path


def hand_logits(net, files, mean, std):
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                     for f in files])
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return net(x).numpy()


def extract(capsys, store, root, weights, *more):
    return run(capsys, "-q", "extract", "--model", "cifar_resnet18", "--weights", weights, "--benchmark",
               "cifar100", "--split", "test", "--store", store, "--data-root", root, "--dtype", "float32",
               "--device", "cpu", "--json", *more)


def test_cifar100_checkpoint_is_normalised_with_cifar100_statistics(tmp_path, capsys):
    root, files = cifar100_root(tmp_path / "data")
    net, weights = cifar_checkpoint(tmp_path)
    store = tmp_path / "c100.zarr"
    code, out, err = extract(capsys, store, root, weights)
    assert code == 0, err
    with open_store(store, "r") as st:
        got = st.read("splits/test/cifar_resnet18/logits")
        parts = st.node_attrs("splits/test/cifar_resnet18").get("parts")
    np.testing.assert_allclose(got, hand_logits(net, files, CIFAR100_MEAN, CIFAR100_STD), atol=1e-4)
    cifar10 = hand_logits(net, files, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert np.abs(got - cifar10).max() > 1e-3  # what the CIFAR-10 statistics gave: 10x the tolerance above
    assert parts["preprocess"]["mean"] == list(CIFAR100_MEAN)

    code, out, err = run(capsys, "store", "info", store)
    assert code == 0 and "mean=0.5071/0.4865/0.4409" in out

    # a split added with --data is normalised as the store's benchmark is
    code, out, err = run(capsys, "-q", "extract", "--model", "cifar_resnet18", "--weights", weights, "--data",
                         f"imglist:{root}/benchmark_imglist/cifar100/test_cifar100.txt@{root}/images_classic",
                         "--split", "ood/far/again", "--store", store, "--dtype", "float32", "--device", "cpu")
    assert code == 0, err
    with open_store(store, "r") as st:
        again = st.read("splits/ood/far/again/cifar_resnet18/logits")
    np.testing.assert_allclose(again, got, atol=1e-5)


def test_preprocess_overrides_and_changes_the_fingerprint(tmp_path, capsys):
    root, files = cifar100_root(tmp_path / "data")
    net, weights = cifar_checkpoint(tmp_path)
    store = tmp_path / "c100.zarr"
    assert extract(capsys, store, root, weights)[0] == 0
    code, out, err = extract(capsys, store, root, weights, "--preprocess", "mean=0.5/0.5/0.5,std=0.25;0.25;0.25")
    assert code != 0 and "preprocess" in err  # made differently: refused, never a cache hit
    code, out, err = extract(capsys, store, root, weights, "--preprocess", "mean=0.5/0.5/0.5,std=0.25;0.25;0.25",
                             "--overwrite")
    assert code == 0, err
    assert json.loads(out)[0]["status"] == "extracted"
    with open_store(store, "r") as st:
        got = st.read("splits/test/cifar_resnet18/logits")
    np.testing.assert_allclose(got, hand_logits(net, files, (0.5,) * 3, (0.25,) * 3), atol=1e-4)


@pytest.mark.parametrize("bad", ["mean=0.5/0.5", "crop=0", "size=32", "std=1/0/1", "interpolation=nearest",
                                 "mean", "crop=64", "", "mean=a/b/c"])
def test_bad_preprocess_is_a_one_line_usage_error(tmp_path, capsys, bad):
    code, out, err = run(capsys, "extract", "--model", "cifar_resnet18-tiny", "--benchmark", "cifar100",
                         "--split", "test", "--store", tmp_path / "s.zarr", "--preprocess", bad)
    assert code == 2 and one_line_error(err), err
    assert not (tmp_path / "s.zarr").exists()


def test_parse_preprocess_keeps_what_it_is_not_told():
    base = Preprocess(resize=256, crop=224)
    out = parse_preprocess("crop=192, interpolation=bicubic", base)
    assert (out.resize, out.crop, out.mean, out.interpolation) == (256, 192, base.mean, "bicubic")
    with pytest.raises(UsageError):
        parse_preprocess("crop=192,crop=100", base)


# ---- QuickGELU for OpenAI-format CLIP weights ---------------------------------------------------


def openai_layout_file(tmp_path):
    """A tiny CLIP saved the way OpenAI's TorchScript state_dict is: with its settings entries."""
    import open_clip

    from oodcli.backbones.clip import TINY_CFG

    torch.manual_seed(5)
    model = open_clip.CLIP(**TINY_CFG, quick_gelu=True).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    path = tmp_path / "clip_openai.pt"
    torch.save(state, path)
    plain = tmp_path / "clip_openclip.pt"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, plain)
    return model, path, plain


def test_openai_format_file_runs_with_quick_gelu(tmp_path, capsys):
    import open_clip

    from oodcli.backbones.clip import TINY_CFG
    from oodcli.backbones.registry import clip_activation, openai_checkpoint

    model, path, plain = openai_layout_file(tmp_path)
    assert openai_checkpoint(path) and not openai_checkpoint(plain)
    assert clip_activation("tiny", str(path)) == "quick_gelu" and clip_activation("tiny", str(plain)) == "gelu"
    assert clip_activation("ViT-B-16-quickgelu", str(plain)) == "quick_gelu"
    x = torch.randn(3, 3, 32, 32)
    net = get_spec("clip-tiny").build(str(path))
    got = net(x, ("image_embeds",))["image_embeds"]
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        gelu = open_clip.CLIP(**TINY_CFG)
        gelu.load_state_dict(model.state_dict())
        as_gelu = torch.nn.functional.normalize(gelu.eval().encode_image(x), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - as_gelu).abs().max() > 1e-4
    text = get_spec("clip-tiny").build_text(str(path))
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(["a photo"]),
                                   model.encode_text(open_clip.get_tokenizer("ViT-B-16")(["a photo"]), normalize=True),
                                   atol=1e-5, rtol=1e-5)

    store = tmp_path / "clip.zarr"
    code, out, err = run(capsys, "-q", "extract", "--model", "clip-tiny", "--weights", path, "--benchmark", "digits",
                         "--split", "ood/far/noise", "--store", store, "--device", "cpu")
    assert code == 0, err
    with open_store(store, "r") as st:
        assert st.node_attrs("splits/ood/far/noise/clip-tiny")["parts"]["activation"] == "quick_gelu"
    code, out, err = run(capsys, "store", "info", store)
    assert code == 0 and "activation quick_gelu" in out


def test_a_torchscript_archive_counts_as_openai_format(tmp_path):
    from oodcli.backbones.registry import openai_checkpoint, torchscript_archive

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    plain = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert torchscript_archive(path) and openai_checkpoint(path)
    assert not torchscript_archive(plain) and not openai_checkpoint(plain)


def test_apex_model_trained_on_cifar100_keeps_its_normalisation(tmp_path, monkeypatch, images):
    import oodcli.data.base
    from oodcli.train.apex import ApexConfig, train_end_to_end

    small = images("small", 16, labels=np.arange(16) % 4)
    monkeypatch.setattr(oodcli.data.base, "open_source", lambda spec, root, is_ood=False: small)
    out = tmp_path / "palm.safetensors"
    train_end_to_end("cifar100", "cifar_resnet18-tiny", "palm", k=1,
                     cfg=ApexConfig(epochs=1, batch_size=16, embed_dim=8), out=out, device="cpu", flip=False)
    pre = get_spec("palm").for_weights(str(out)).preprocess
    assert (pre.mean, pre.std) == (CIFAR100_MEAN, CIFAR100_STD)
