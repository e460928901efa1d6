"""oodcli: out-of-distribution detection from a feature store.

The expensive backbone pass happens once (``extract``); every scorer, trainer and
report reads the store it wrote. The library a notebook or a service uses is this
package's namespace; each name is imported on first use, so ``import oodcli`` stays
light (no torch until a model is built)::

    import oodcli

    oodcli.extract("digits_cnn-tiny", "demo.zarr", benchmark="digits")
    oodcli.score("demo.zarr", "msp,knn")
    oodcli.report_frame("demo.zarr")                      # OpenOOD's table layout, pandas
    det = oodcli.Detector.from_store("demo.zarr", "knn", threshold=None)
    det.score("my_images/")

Every function takes the arguments and defaults of its command and raises the same
one-line ``OodError`` (``UsageError`` for bad arguments).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "open_store": "oodcli.store",
    "Store": "oodcli.store",
    "extract": "oodcli.api",
    "score": "oodcli.api",
    "sweep": "oodcli.api",
    "report": "oodcli.api",
    "report_frame": "oodcli.api",
    "threshold": "oodcli.api",
    "Detector": "oodcli.deploy",
    "Predictions": "oodcli.deploy",
    "Threshold": "oodcli.deploy",
    "methods": "oodcli.scorers.base",
    "train_classifier": "oodcli.train.classifier",
    "train_prompts": "oodcli.train.prompts",
    "train_iim": "oodcli.train.iim",
    "train_synood": "oodcli.train.synood",
    "train_apex": "oodcli.train.apex",
    "OodError": "oodcli.errors",
    "UsageError": "oodcli.errors",
}
_RENAMED = {"methods": "describe_scorers", "train_apex": "train_end_to_end"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'oodcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
