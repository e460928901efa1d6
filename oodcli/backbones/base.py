"""What every backbone provides: a spec that is cheap to inspect and a module built from it.

The spec side (``Preprocess``, ``BackboneSpec``, the registry) lives in
``oodcli.backbones.spec`` and imports no torch; the network side (``Backbone``,
``StagedClassifier``, checkpoint loading) lives in ``oodcli.backbones.modules``.
This module offers both under their old names; the torch names are resolved on
first access, so ``from oodcli.backbones.base import get_spec`` stays torch-free.
"""

from __future__ import annotations

from oodcli.backbones.spec import (  # noqa: F401
    _REGISTRY,
    BackboneSpec,
    Lazy,
    Preprocess,
    _to_rgb,
    all_specs,
    get_spec,
    register,
    safetensors_metadata,
    sha256_dir,
    sha256_file,
)

_TORCH_NAMES = ("Backbone", "StagedClassifier", "read_state_dict", "load_state_dict_into")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from oodcli.backbones import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_TORCH_NAMES])
