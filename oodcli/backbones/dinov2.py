"""DINOv2 self-supervised ViTs via Hugging Face transformers.

DINOv2 has no classifier, so there are no ``logits`` and ``head()`` is None: use it
with feature-space scorers (kNN, Mahalanobis) rather than logit-based ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oodcli.backbones.modules import Backbone
from oodcli.backbones.registry import DINO  # noqa: F401  (the specs are declared there)
from oodcli.backbones.registry import DINO_TINY as TINY  # noqa: F401
from oodcli.errors import OodError

# architecture of each released size (d, depth, heads), so weights="random" works offline
_SIZES = {"dinov2-small": (384, 12, 6), "dinov2-base": (768, 12, 12), "dinov2-large": (1024, 24, 16)}
_ARCH = {
    name: dict(hidden_size=d, num_hidden_layers=n, num_attention_heads=h, intermediate_size=4 * d,
               image_size=518, patch_size=14)
    for name, (d, n, h) in _SIZES.items()
}
_ARCH["dinov2-tiny"] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, image_size=32, patch_size=8)


class Dinov2Backbone(Backbone):
    def __init__(self, model, crop: int):
        super().__init__()
        self.model = model.eval()
        d, p = model.config.hidden_size, model.config.patch_size
        self.layer_shapes = {
            "cls": (d,),  # CLS token after the final layer norm
            "patch_mean": (d,),  # mean of the final (layer-normed) patch tokens
            "penultimate": (d,),  # same as cls, for scorers that ask for "penultimate"
            "patch_tokens": ((crop // p) ** 2, d),
        }
        self.eval()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        h = self.model(pixel_values=x).last_hidden_state  # already final-layer-normed
        out = {"cls": h[:, 0], "penultimate": h[:, 0], "patch_tokens": h[:, 1:]}
        if "patch_mean" in layers:
            out["patch_mean"] = h[:, 1:].mean(dim=1)
        return {name: out[name].float() for name in layers}


def build(name: str, crop: int, weights: str | None) -> Backbone:
    from transformers import Dinov2Config, Dinov2Model

    if weights in (None, "random"):
        torch.manual_seed(0)
        return Dinov2Backbone(Dinov2Model(Dinov2Config(**_ARCH[name])), crop)
    try:
        model = Dinov2Model.from_pretrained(weights)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(weights).exists() else "Hugging Face model id"
        raise OodError(
            f"cannot load DINOv2 weights '{weights}' ({where}): {str(e).splitlines()[0]}; "
            "download it once with internet or pass a directory saved with save_pretrained"
        ) from None
    return Dinov2Backbone(model, crop)
