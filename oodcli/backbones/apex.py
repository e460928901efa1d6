"""Models trained by ``oodcli train apex|palm``, run by extract like any other backbone.

``--weights`` is the safetensors file the trainer wrote. Layers:

- ``embedding``: the projection head's output on the 128-d unit hypersphere;
- ``penultimate``: the feature the head reads. For an end-to-end model that is the
  trained encoder's penultimate layer (what APEX and PALM score); for a head-only model
  it is the frozen base network's layer the head was trained on (e.g. digits_cnn
  ``penultimate`` or DINOv2 ``cls``), unchanged by training.

The prototypes and their qualities travel with the features: extract keeps them under
``backbones/<apex|palm>/prototypes/`` (``Backbone.extras``), where the PAOS scorer and
``oodcli analyze collisions`` read them. Two names, ``apex`` and ``palm``, let both
models sit side by side in one store; each refuses the other method's file. Images are
preprocessed as the base network wants, read from the file header without torch
(``BackboneSpec.for_weights``, ``oodcli.backbones.registry.adapt_apex``).
"""

from __future__ import annotations

import torch

from oodcli.backbones.modules import Backbone
from oodcli.backbones.registry import APEX_LAYERS as LAYERS  # noqa: F401  (the specs are declared there)
from oodcli.backbones.spec import get_spec
from oodcli.errors import OodError, UsageError


class PrototypeBackbone(Backbone):
    def __init__(self, base: Backbone, base_layer: str, head, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.base, self.base_layer, self.proj = base.eval(), base_layer, head.eval()
        self.layer_shapes = {
            "embedding": (head.net[-1].out_features,),
            "penultimate": tuple(base.layer_shapes[base_layer]),
        }
        self._extras = {
            "prototypes/vectors": tensors["prototypes"].float().numpy(),
            "prototypes/classes": tensors["proto_class"].long().numpy(),
            "prototypes/q_c": tensors["q_c"].float().numpy(),
            "prototypes/q_s": tensors["q_s"].float().numpy(),
        }
        self.eval()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        h = self.base.forward_layers(x, (self.base_layer,))[self.base_layer].float()
        out = {"penultimate": h}
        if "embedding" in layers:
            out["embedding"] = self.proj(h)
        return {name: out[name].float() for name in layers}

    def extras(self) -> dict:
        return dict(self._extras)


def _base_network(meta: dict, tensors: dict[str, torch.Tensor], path: str) -> Backbone:
    try:
        spec = get_spec(meta["base_model"])
    except UsageError:
        raise OodError(f"{path} was trained on features of '{meta['base_model']}', not a registered backbone, "
                       "so it cannot run on images") from None
    if meta["mode"] == "end-to-end":
        base = spec.builder("random")
        state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        missing, unexpected = base.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise OodError(f"{path} does not fit a '{meta['base_model']}' network ({(missing + unexpected)[:3]})")
        return base
    weights = meta.get("base_weights")  # None: the base network's default weights
    try:
        same = spec.weights_identity(weights) == meta.get("base_identity")
    except UsageError:  # e.g. a hand-made store that never said where its features came from
        same = False
    if not same:
        raise OodError(
            f"the '{meta['base_model']}' weights {weights or '(default)'} are not those {path} was trained on "
            f"({meta.get('base_identity')}); re-extract the base features and retrain the head"
        )
    return spec.build(weights)


def build(method: str, weights: str | None) -> Backbone:
    from oodcli.train.apex import ProjectionHead, read_model

    meta, tensors = read_model(weights)
    if meta["method"] != method:
        raise UsageError(f"{weights} holds a {meta['method']} model; extract it with --model {meta['method']}")
    base = _base_network(meta, tensors, weights)
    head = ProjectionHead(meta["in_dim"], meta["embed_dim"])
    head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    return PrototypeBackbone(base, meta["base_layer"], head, tensors)
