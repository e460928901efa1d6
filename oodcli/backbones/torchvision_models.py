"""ImageNet classifiers from torchvision: ResNet-18/34/50 and ViT-B/16 (plus tiny twins).

Weights are a torchvision weights enum member name ("IMAGENET1K_V1"), a local
state_dict file, or "random" (seeded init, for tests and offline demos).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodcli.backbones.modules import Backbone, StagedClassifier, load_state_dict_into, read_state_dict
from oodcli.backbones.registry import IMAGENET  # noqa: F401  (the specs are declared there)
from oodcli.backbones.registry import TV_TINY as TINY  # noqa: F401
from oodcli.errors import OodError, UsageError


def is_weights_file(weights: str) -> bool:
    """A --weights value names a file if it has a checkpoint suffix or exists on disk."""
    path = Path(weights)
    return path.suffix in {".pt", ".pth", ".safetensors", ".ckpt", ".bin"} or path.is_file()


def _tv_model(arch: str, weights: str | None, head_key: str) -> nn.Module:
    """Build torchvision model ``arch`` with enum weights, a checkpoint file, or random init."""
    from torchvision import models

    if weights in (None, "random"):
        torch.manual_seed(0)
        return models.get_model(arch, weights=None)
    if is_weights_file(weights):
        state = read_state_dict(weights)
        num_classes = state[head_key].shape[0] if head_key in state else 1000
        model = models.get_model(arch, weights=None, num_classes=num_classes)
        load_state_dict_into(model, state, weights)
        return model
    enum = models.get_model_weights(arch)
    if weights not in enum.__members__:
        raise UsageError(
            f"unknown weights '{weights}' for {arch}; choose one of: "
            f"{', '.join(enum.__members__)}, random, or a checkpoint file path"
        )
    try:
        return models.get_model(arch, weights=enum[weights])
    except (OSError, RuntimeError) as e:  # typically no internet on first use
        raise OodError(f"cannot download {arch} weights {weights} ({e}); connect to the internet once "
                       "or pass --weights PATH to a local state_dict") from None


def wrap_resnet(net, input_size: int) -> StagedClassifier:
    """Cut a torchvision ResNet after layer1 (and before its pooling, for ``featmap``); the
    wrapper shares the net's parameters."""
    early = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    mid = nn.Sequential(net.layer2, net.layer3, net.layer4, net.avgpool, nn.Flatten(1))
    return StagedClassifier(early, mid, net.fc, pool_at=3, input_size=input_size)


def build_resnet(arch: str, weights: str | None) -> Backbone:
    return wrap_resnet(_tv_model(arch, weights, "fc.weight"), IMAGENET.crop)


def build_resnet18_tiny(weights: str | None) -> Backbone:
    from torchvision.models import resnet18

    if weights in (None, "random"):
        torch.manual_seed(0)
        return wrap_resnet(resnet18(weights=None, num_classes=10), TINY.crop)
    state = read_state_dict(weights)
    net = resnet18(weights=None, num_classes=state["fc.weight"].shape[0] if "fc.weight" in state else 10)
    load_state_dict_into(net, state, weights)
    return wrap_resnet(net, TINY.crop)


class ViTBackbone(Backbone):
    """torchvision VisionTransformer, run block by block to expose the first block's output."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit.eval()
        d = vit.hidden_dim
        self.layer_shapes = {
            "logits": (self._classifier_out(),),
            "penultimate": (d,),  # class token after the final layer norm = input of heads
            "early": (d,),  # mean over all tokens (class + patches) after the first block
        }
        self.eval()

    def _classifier_out(self) -> int:
        return self.vit.heads[-1].out_features

    def head(self):
        heads = self.vit.heads
        if len(heads) != 1:  # a pre-logits layer sits between penultimate and the classifier
            return None
        return heads.head.weight.detach(), heads.head.bias.detach()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        vit, enc = self.vit, self.vit.encoder
        tokens = vit._process_input(x)
        cls = vit.class_token.expand(tokens.shape[0], -1, -1)
        h = enc.dropout(torch.cat([cls, tokens], dim=1) + enc.pos_embedding)
        out = {}
        for i, block in enumerate(enc.layers):
            h = block(h)
            if i == 0:
                out["early"] = h.mean(dim=1)
                if layers == ("early",):
                    return {"early": out["early"].float()}
        out["penultimate"] = enc.ln(h)[:, 0]
        out["logits"] = vit.heads(out["penultimate"])
        return {name: out[name].float() for name in layers}


def build_vit_b_16(weights: str | None) -> Backbone:
    return ViTBackbone(_tv_model("vit_b_16", weights, "heads.head.weight"))


def build_vit_tiny(weights: str | None) -> Backbone:
    from torchvision.models import VisionTransformer

    def make(num_classes: int):
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                 hidden_dim=32, mlp_dim=64, num_classes=num_classes)

    if weights in (None, "random"):
        torch.manual_seed(0)
        return ViTBackbone(make(10))
    state = read_state_dict(weights)
    vit = make(state["heads.head.weight"].shape[0] if "heads.head.weight" in state else 10)
    load_state_dict_into(vit, state, weights)
    return ViTBackbone(vit)
