"""GROOD's mixup re-entering SOURCE:NAME models after their early module (``adapters.ReEntry``): the
split forward equals the full one for a torchvision ResNet, a timm ViT and a user's nn.Sequential; the
command end to end on a tiny user model store (eq. 9 recomputed here); one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import one_line_error, run
from oodcli.backbones.spec import get_spec
from oodcli.errors import OodError, UsageError
from oodcli.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")

USER_MODULE = '''
from torch import nn


def build():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6),
    )
    net.preprocess = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return net


class Skip(nn.Module):
    """The stem's output reaches the head around block: no single early map."""

    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 6)

    def forward(self, x):
        s = self.stem(x)
        return self.fc(self.pool(self.block(s) + s).flatten(1))


def skip():
    net = Skip()
    net.preprocess = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return net
'''


def _hooked(model: str, **kw):
    spec = get_spec(model, **kw).requesting(("logits", "penultimate"))
    return spec, spec.build()


def _split_equals_full(net, path, size, early_by_hand):
    """early(x) by hand, then the rest entered with another image's early map, equals the full forward."""
    from oodcli.backbones.adapters import reentry

    split = reentry(net, path, size)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 3, size, size, generator=gen), torch.randn(3, 3, size, size, generator=gen)
    with torch.no_grad():
        full = net.forward_layers(b, ("logits", "penultimate"))
        early_b, logits, pen = split.run(b)
        torch.testing.assert_close(early_b, early_by_hand(b))  # the early map is the module's output
        torch.testing.assert_close(logits, full["logits"])
        _, logits_ab, pen_ab = split.run(a, lambda e: early_b)  # re-entered with b's map: b's output
    torch.testing.assert_close(logits_ab, full["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pen_ab, full["penultimate"], rtol=1e-5, atol=1e-5)
    return split


def test_torchvision_resnet18_splits_after_layer1():
    _, net = _hooked("torchvision:resnet18", weights="random", preprocess="resize=64,crop=64")
    m = net.net
    split = _split_equals_full(net, None, 64, lambda x: m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
    assert split.path == "layer1"


def test_timm_vit_splits_after_its_first_block():
    _, net = _hooked("timm:test_vit", weights="random")
    m = net.net
    size = m.patch_embed.img_size[0]

    def first_block(x):
        return m.blocks[0](m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))))

    split = _split_equals_full(net, None, size, first_block)
    assert split.path == "blocks.0"


def test_a_user_sequential_splits_at_a_named_index(tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    _, net = _hooked(f"python:{tmp_path / 'user_models.py'}:build")
    m = net.net
    _split_equals_full(net, "1", 32, lambda x: m[1](m[0](x)))  # after the in-place ReLU: still the map seen
    with pytest.raises(UsageError, match="nn.Sequential: give the index"):
        from oodcli.backbones.adapters import reentry

        reentry(net, None, 32)


def test_a_skip_around_the_early_module_is_refused(tmp_path):
    from oodcli.backbones.adapters import reentry

    (tmp_path / "user_models.py").write_text(USER_MODULE)
    _, net = _hooked(f"python:{tmp_path / 'user_models.py'}:skip")
    with pytest.raises(OodError, match="not the only path"):
        reentry(net, "block", 32)
    reentry(net, "stem", 32).check(32)  # the stem's output does feed everything


@pytest.fixture(scope="module")
def user_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("grood-user")
    (root / "user_models.py").write_text(USER_MODULE)
    store = root / "u.zarr"
    from oodcli.cli import main

    assert main(["-q", "extract", "--model", f"python:{root / 'user_models.py'}:build", "--benchmark", "digits",
                 "--split", "train", "--split", "test", "--split", "ood/far/noise", "--store", str(store),
                 "--dtype", "float32"]) == 0
    return root, store


def test_synthesize_grood_mixup_on_a_user_model_follows_eq9(capsys, user_store):
    root, store = user_store
    code, out, err = run(capsys, "synthesize", "grood", "--store", store, "--early", "2", "--json")
    assert code == 0, err
    with open_store(store) as st:
        node = "splits/train/python:user_models.py:build"
        labels = st.read("splits/train/labels")
        p_early = st.read("fitted/grood/early_prototypes")
        candidates = st.read("fitted/grood/candidates")
        assert st.node_attrs("fitted/grood")["hparams"]["early"] == "2"
        pen = st.read(f"{node}/penultimate")
    # eq. 9 by hand with the module itself: early = net[:3], rest = net[3:6]
    import importlib.util

    from oodcli.data.base import data_root, open_source

    module_spec = importlib.util.spec_from_file_location("um", root / "user_models.py")
    um = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(um)
    torch.manual_seed(0)
    net = um.build().eval()  # the factory's own seeded parameters, as extract built them
    spec = get_spec(f"python:{root / 'user_models.py'}:build")
    data = open_source("digits:train", data_root(None))
    x = torch.stack([spec.preprocess.to_transform()(data.load(i)) for i in range(len(labels))])
    with torch.no_grad():
        np.testing.assert_allclose(net[:6](x).numpy(), pen, atol=1e-5)  # the same network as the store's
        early = net[:3](x)
        classes = np.unique(labels)
        means = torch.stack([early[torch.as_tensor(labels == c)].mean(0) for c in classes])
        np.testing.assert_allclose(p_early, means.numpy(), rtol=1e-4, atol=1e-5)
        logits = net(x)
        c2 = logits.topk(2, dim=1).indices[:, 1]
        mixed = net[3:6](0.5 * early + 0.5 * means[c2])
    np.testing.assert_allclose(candidates, mixed.numpy(), rtol=1e-4, atol=1e-5)
    assert run(capsys, "-q", "index", "--store", store, "--source", "grads/grood/train")[0] == 0
    assert run(capsys, "-q", "score", "grood", "--store", store)[0] == 0
    with open_store(store) as st:
        assert np.isfinite(st.read("scores/grood/ood/far/noise")).all()


def test_refusals_are_one_line(capsys, user_store, tmp_path):
    root, store = user_store
    code, _, err = run(capsys, "synthesize", "grood", "--store", store)  # a Sequential names no stage
    assert code == 2 and one_line_error(err) and "--early MODULE.PATH" in err and "give the index" in err
    code, _, err = run(capsys, "synthesize", "grood", "--store", store, "--early", "9")
    assert code == 2 and one_line_error(err) and "has no module '9'" in err
    code, _, err = run(capsys, "synthesize", "grood", "--store", store, "--early", "2", "--ood-prototype", "mean")
    assert code == 2 and one_line_error(err) and "goes with --ood-prototype mixup" in err
    code, _, err = run(capsys, "synthesize", "grood", "--store", store, "--ood-prototype", "noise", "--json")
    assert code == 0, err  # noise needs no split: the rebuilt model ranks noise images by energy
