"""Backbone registry: importing this package declares every family's specs.

The specs (``oodcli.backbones.registry``) import no torch; each family module
(torch, torchvision, transformers, open_clip) is imported by its builder when a
network is built, so listing models or fingerprinting a run stays fast.
``Backbone`` (an ``nn.Module``) is resolved on first access.
"""

from oodcli.backbones import registry  # noqa: F401  (declares every family's specs)
from oodcli.backbones import sources  # noqa: F401  (resolves SOURCE:NAME models)
from oodcli.backbones.spec import BackboneSpec, Preprocess, all_specs, get_spec
from oodcli.backbones.spec import _REGISTRY
from oodcli.plugins import track

track("backbone", _REGISTRY)  # every built-in spec is declared: plugins may add theirs

__all__ = ["Backbone", "BackboneSpec", "Preprocess", "all_specs", "get_spec"]


def __getattr__(name: str):
    if name == "Backbone":
        from oodcli.backbones.modules import Backbone

        return Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
