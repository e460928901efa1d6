"""A small CNN for the embedded digits benchmark (32x32 RGB, 6 in-distribution classes).

Small enough to train on a CPU in seconds; its checkpoints are .safetensors files
written by ``save_digits_cnn`` that record the number of classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodcli.backbones.modules import Backbone, StagedClassifier, load_state_dict_into, read_state_dict
from oodcli.backbones.registry import DIGITS  # noqa: F401  (the specs are declared there)
from oodcli.errors import OodError


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """The trainable network; ``forward`` returns logits."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.block1 = nn.Sequential(*_conv(3, 32), *_conv(32, 32), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv(64, 128))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block3(self.block2(self.block1(x)))))


def new_digits_cnn(num_classes: int = 6, seed: int = 0) -> DigitsCNN:
    """A freshly initialised network; the seed makes training runs reproducible."""
    torch.manual_seed(seed)
    return DigitsCNN(num_classes)


def save_digits_cnn(model: DigitsCNN, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"arch": "digits_cnn", "num_classes": str(model.fc.out_features)}
    save_file(state, str(path), metadata=metadata)


def load_digits_cnn(path: str | Path) -> DigitsCNN:
    state = read_state_dict(path)
    num_classes = _metadata_classes(path) or (state["fc.weight"].shape[0] if "fc.weight" in state else 6)
    model = DigitsCNN(num_classes)
    load_state_dict_into(model, state, str(path))
    return model.eval()


def _metadata_classes(path) -> int | None:
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("num_classes")
        return int(value) if value is not None else None
    except ValueError:
        raise OodError(f"weights file {path} has bad num_classes metadata") from None


def wrap(net: DigitsCNN) -> StagedClassifier:
    mid = nn.Sequential(net.block2, net.block3, net.pool)
    return StagedClassifier(net.block1, mid, net.fc, pool_at=2, input_size=DIGITS.crop)


def build(weights: str | None) -> Backbone:
    if weights in (None, "random"):
        return wrap(new_digits_cnn())
    return wrap(load_digits_cnn(weights))
