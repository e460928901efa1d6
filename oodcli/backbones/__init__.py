"""Backbone registry: importing this package registers every family.

Heavy libraries (transformers, open_clip) are imported inside the builders, so listing
models or fingerprinting a run stays fast.
"""

from oodcli.backbones import cifar_resnet, clip, digits_cnn, dinov2, torchvision_models  # noqa: F401
from oodcli.backbones import apex  # noqa: F401  (last: it wraps the others)
from oodcli.backbones.base import Backbone, BackboneSpec, Preprocess, all_specs, get_spec

__all__ = ["Backbone", "BackboneSpec", "Preprocess", "all_specs", "get_spec"]
