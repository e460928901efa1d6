"""Backbones, tested offline on their tiny random-init twins (no weights are downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oodcli.backbones import all_specs, get_spec
from oodcli.backbones.base import read_state_dict
from oodcli.backbones.digits_cnn import new_digits_cnn, save_digits_cnn
from oodcli.errors import OodError, UsageError

TINY = sorted(name for name in all_specs() if name.endswith("-tiny"))
_BUILT: dict = {}


def build(name):
    """Build each twin once per test session; they are read-only in these tests."""
    if name not in _BUILT:
        _BUILT[name] = get_spec(name).build()
    return _BUILT[name]


def images(name, n=2):
    crop = get_spec(name).preprocess.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(1))


def run(model, x, layers):
    with torch.no_grad():
        return model.forward_layers(x, tuple(layers))


def test_every_family_has_a_twin():
    assert set(TINY) == {"resnet18-tiny", "vit-tiny", "cifar_resnet18-tiny", "dinov2-tiny",
                         "clip-tiny", "digits_cnn-tiny"}


@pytest.mark.parametrize("name", TINY)
def test_twin_returns_requested_layers_with_declared_shapes(name):
    spec, model = get_spec(name), build(name)
    assert not any(m.training for m in model.modules())
    assert spec.default_weights == "random" and not spec.needs_weights_file
    assert set(model.layer_shapes) == set(spec.layers)
    assert set(spec.default_layers) <= set(spec.layers)
    out = run(model, images(name), spec.layers)
    assert list(out) == list(spec.layers)
    for layer, value in out.items():
        assert value.dtype == torch.float32
        assert tuple(value.shape) == (2, *model.layer_shapes[layer]), layer
        assert torch.isfinite(value).all(), layer
    # one layer at a time gives only that layer, with the same values
    for layer in spec.layers:
        single = run(model, images(name), [layer])
        assert list(single) == [layer]
        torch.testing.assert_close(single[layer], out[layer])


@pytest.mark.parametrize("name", TINY)
def test_unknown_layer_names_the_valid_ones(name):
    with pytest.raises(UsageError, match="penultimate"):
        build(name).forward_layers(images(name), ("no_such_layer",))


@pytest.mark.parametrize("name", TINY)
def test_random_init_is_deterministic(name):
    again = get_spec(name).build("random")
    x = images(name)
    layer = get_spec(name).default_layers[0]
    torch.testing.assert_close(run(again, x, [layer]), run(build(name), x, [layer]))


@pytest.mark.parametrize("name", TINY)
def test_head_reproduces_logits(name):
    model = build(name)
    head = model.head()
    if get_spec(name).family in ("dinov2", "clip"):
        assert head is None and "logits" not in model.layer_shapes
        return
    weight, bias = head
    out = run(model, images(name), ["penultimate", "logits"])
    torch.testing.assert_close(out["penultimate"] @ weight.T + bias, out["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18-tiny", "cifar_resnet18-tiny", "digits_cnn-tiny"])
def test_stages_compose_to_logits(name):
    model = build(name)
    early, mid, head = model.stages()
    x = images(name)
    out = run(model, x, ["logits", "penultimate", "early"])
    with torch.no_grad():
        fmap = early(x)
        pen = mid(fmap)
        logits = head(pen)
    assert fmap.dim() == 4 and fmap.shape[1] == model.layer_shapes["early"][0]
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), out["early"])
    torch.testing.assert_close(pen, out["penultimate"])
    torch.testing.assert_close(logits, out["logits"])


def test_vit_early_is_mean_after_first_block():
    model = build("vit-tiny")
    x = images("vit-tiny")
    seen = {}
    handle = model.vit.encoder.layers[0].register_forward_hook(lambda m, i, o: seen.update(h=o))
    try:
        out = run(model, x, ["early", "logits"])
    finally:
        handle.remove()
    torch.testing.assert_close(out["early"], seen["h"].mean(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model.vit(x))


def test_dinov2_layers_match_hf_outputs():
    model = build("dinov2-tiny")
    x = images("dinov2-tiny")
    out = run(model, x, ["cls", "patch_mean", "penultimate", "patch_tokens"])
    with torch.no_grad():
        hf = model.model(pixel_values=x)
    torch.testing.assert_close(out["cls"], hf.pooler_output)
    torch.testing.assert_close(out["penultimate"], out["cls"])
    torch.testing.assert_close(out["patch_mean"], hf.last_hidden_state[:, 1:].mean(dim=1))


def test_dinov2_loads_a_local_directory(tmp_path):
    model = build("dinov2-tiny")
    model.model.save_pretrained(tmp_path)
    again = get_spec("dinov2-tiny").build(str(tmp_path))
    x = images("dinov2-tiny")
    torch.testing.assert_close(run(again, x, ["cls"]), run(model, x, ["cls"]))


def test_clip_patch_tokens_are_projected_normalised_patches():
    model = build("clip-tiny")
    visual = model.model.visual
    x = images("clip-tiny")
    seen = {}
    handle = visual.transformer.register_forward_hook(lambda m, i, o: seen.update(h=o))
    try:
        out = run(model, x, ["patch_tokens", "image_embeds", "penultimate"])
    finally:
        handle.remove()
    with torch.no_grad():
        patches = seen["h"][:, 1:]  # drop the class token
        expected = F.normalize(visual.ln_post(patches) @ visual.proj, dim=-1)
        image = model.model.encode_image(x)
    assert not visual.output_tokens  # restored after the forward
    torch.testing.assert_close(out["patch_tokens"], expected)
    torch.testing.assert_close(out["patch_tokens"].norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(out["penultimate"], image)
    torch.testing.assert_close(out["image_embeds"], F.normalize(image, dim=-1))


def test_clip_patch_tokens_when_layer_norm_runs_after_pooling():
    model = get_spec("clip-tiny").build()
    visual = model.model.visual
    visual.final_ln_after_pool = True  # open_clip then returns tokens before ln_post
    x = images("clip-tiny")
    seen = {}
    handle = visual.transformer.register_forward_hook(lambda m, i, o: seen.update(h=o))
    with torch.no_grad():
        out = model.forward_layers(x, ("patch_tokens",))
        expected = F.normalize(visual.ln_post(seen["h"][:, 1:]) @ visual.proj, dim=-1)
    handle.remove()
    torch.testing.assert_close(out["patch_tokens"], expected)


def test_clip_text_side_works_offline():
    model = build("clip-tiny")
    tokens = model.tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 77)
    with torch.no_grad():
        text = model.encode_text(["a photo of a cat", "a photo of a dog"])
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_digits_cnn_roundtrip_through_safetensors(tmp_path):
    net = new_digits_cnn(num_classes=4, seed=3)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so they must be saved too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net.eval()
    path = tmp_path / "digits.safetensors"
    save_digits_cnn(net, path)
    model = get_spec("digits_cnn").build(str(path))
    x = images("digits_cnn")
    out = run(model, x, ["logits", "penultimate", "early"])
    assert model.layer_shapes["logits"] == (4,)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], net(x), rtol=0, atol=0)


def test_cifar_resnet_loads_state_dict_from_twin(tmp_path):
    from oodcli.backbones.cifar_resnet import CifarResNet

    torch.manual_seed(0)  # the twin's init, so this bare net holds the twin's weights
    net = CifarResNet()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "cifar.pt"
    torch.save({"state_dict": state}, path)  # wrapped and DataParallel-prefixed, as OpenOOD saves
    model = get_spec("cifar_resnet18").build(str(path))
    x = images("cifar_resnet18")
    twin_logits = run(build("cifar_resnet18-tiny"), x, ["logits"])["logits"]
    torch.testing.assert_close(run(model, x, ["logits"])["logits"], twin_logits)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), twin_logits)


def test_cifar_resnet_infers_num_classes(tmp_path):
    from oodcli.backbones.cifar_resnet import CifarResNet

    path = tmp_path / "c100.safetensors"
    from safetensors.torch import save_file

    save_file(CifarResNet(num_classes=100).state_dict(), str(path))
    assert get_spec("cifar_resnet18").build(str(path)).layer_shapes["logits"] == (100,)


def test_checkpoint_that_does_not_fit_names_keys(tmp_path):
    path = tmp_path / "digits.safetensors"
    save_digits_cnn(new_digits_cnn(), path)
    with pytest.raises(OodError, match="missing keys: .*unexpected keys"):
        get_spec("cifar_resnet18").build(str(path))


def test_missing_weights_file_is_an_ood_error(tmp_path):
    for name in ("cifar_resnet18", "digits_cnn", "resnet18"):
        with pytest.raises(OodError, match="not found"):
            get_spec(name).build(str(tmp_path / "nope.pt"))
    with pytest.raises(OodError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_unreadable_weights_file_is_an_ood_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(OodError, match="cannot read weights file"):
        get_spec("cifar_resnet18").build(str(path))
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(OodError, match="cannot read weights file"):
        get_spec("digits_cnn").build(str(bad))


def test_file_backed_models_require_weights():
    for name in ("cifar_resnet18", "cifar_resnet34", "digits_cnn"):
        spec = get_spec(name)
        assert spec.needs_weights_file and spec.default_weights is None
        with pytest.raises(UsageError, match="--weights"):
            spec.build()


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="resnet18"):
        get_spec("resnet-9000")


def test_unknown_torchvision_weights_is_a_usage_error():
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        get_spec("resnet18").build("IMAGENET_BOGUS")


def test_real_entries_are_registered_without_building():
    expected = {
        "resnet18": "IMAGENET1K_V1",
        "resnet34": "IMAGENET1K_V1",
        "resnet50": "IMAGENET1K_V2",
        "vit_b_16": "IMAGENET1K_V1",
        "dinov2-small": "facebook/dinov2-small",
        "dinov2-base": "facebook/dinov2-base",
        "dinov2-large": "facebook/dinov2-large",
        "clip-vit-b-16": "openai",
    }
    specs = all_specs()
    for name, weights in expected.items():
        assert specs[name].default_weights == weights
        assert specs[name].weights_identity(None) == f"{specs[name].family}:{weights}"
    assert specs["resnet50"].preprocess.crop == 224
    assert specs["dinov2-small"].preprocess.interpolation == "bicubic"
    assert specs["clip-vit-b-16"].preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    assert "logits" not in specs["dinov2-small"].layers
    assert "patch_tokens" in specs["clip-vit-b-16"].layers


def test_weights_directory_is_fingerprinted_by_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    spec = get_spec("dinov2-small")
    first = spec.weights_identity(str(tmp_path))
    assert first.startswith("dir:")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert spec.weights_identity(str(tmp_path)) != first


@pytest.mark.parametrize("mode,size", [("RGB", (50, 17)), ("L", (300, 200)), ("RGBA", (32, 32)),
                                       ("P", (8, 64)), ("I;16", (40, 40))])
def test_preprocess_turns_any_image_into_a_crop(mode, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    for name in ("resnet18", "clip-tiny", "digits_cnn"):
        pre = get_spec(name).preprocess
        tensor = pre.to_transform()(image)
        assert tuple(tensor.shape) == (3, pre.crop, pre.crop)
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "cifar_resnet34", "dinov2-small", "clip-vit-b-16"])
def test_real_architectures_with_random_weights_give_their_declared_shapes(name):
    """The full-size configurations (built offline with random weights) match what they declare."""
    import torch

    spec = get_spec(name)
    net = spec.build("random")
    crop = spec.preprocess.crop
    with torch.no_grad():
        out = net(torch.randn(1, 3, crop, crop), spec.layers)
    assert set(out) == set(spec.layers)
    for layer, value in out.items():
        assert tuple(value.shape[1:]) == tuple(net.layer_shapes[layer]), layer
    if name == "clip-vit-b-16":
        assert net.layer_shapes["patch_tokens"] == (196, 512)
    if name == "resnet50":
        assert net.layer_shapes["penultimate"] == (2048,) and net.layer_shapes["logits"] == (1000,)
