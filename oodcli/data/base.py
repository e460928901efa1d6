"""Data sources and benchmarks: what ``extract`` reads images from.

A *source* is a named, indexable image data set with known labels. A *benchmark*
(JSON under ``oodcli/data/benchmarks/``) maps store split names such as
``train`` or ``ood/near/cifar100`` to sources and their ID/OOD role.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from oodcli.errors import UsageError

DATA_ROOT_ENV = "OODCLI_DATA_ROOT"


class ImageDataset:
    """An indexable set of PIL images with integer labels (-1 for OOD).

    ``labels`` is a full int64 array known without decoding images, so a store can
    write labels and ids before the backbone runs.
    """

    name: str  # identity of the data, part of the fingerprint (e.g. "torchvision:cifar10/test")
    labels: np.ndarray  # int64 [N]
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        """Return the i-th image as a PIL image."""
        raise NotImplementedError

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        """(file, reason) of every image of rows [start, stop) that cannot be decoded. Sources
        that read image files check them all (extract refuses before writing anything);
        generated and packaged data sets have nothing to check."""
        return []

    def content_hash(self) -> str | None:
        """A hash of the images' bytes (``extract --verify-content``); None for data sets that are
        not read from files (packaged or generated: their identity already pins them)."""
        return None

    def identity(self) -> str:
        """Name + content of the labels: changes whenever the data set changes."""
        h = hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()).hexdigest()
        return f"{self.name}:n={len(self)}:labels={h[:16]}"


class TransformedDataset:
    """torch-style view: (tensor, index) pairs, picklable for DataLoader workers."""

    def __init__(self, data: ImageDataset, transform, indices: np.ndarray | None = None):
        self.data = data
        self.transform = transform
        self.indices = np.arange(len(data)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        return self.transform(self.data.load(j)), j


@dataclass(frozen=True)
class SplitDef:
    """One split of a benchmark: where its images come from and what role it plays."""

    name: str  # store split name, e.g. "test" or "ood/far/svhn"
    role: str  # "id" | "ood-near" | "ood-far" | "ood" | "ood-val" (validation only) | "synthetic" | "csid"
    source: str  # source spec, e.g. "torchvision:cifar10:test" or "imglist:benchmark_imglist/..."
    #: extracted only when named with --split: data a benchmark's usual download lacks or only
    #: some evaluations use (OpenOOD's cs-ID sets, for full-spectrum OOD alone)
    optional: bool = False

    @property
    def is_ood(self) -> bool:
        """Whether its rows are labelled -1: an OOD set, or synthetic OOD images (training data only)."""
        return is_ood_role(self.role)


def is_ood_role(role: str) -> bool:
    """Roles whose rows carry label -1: the OOD test sets (``ood*``) and ``synthetic`` OOD images."""
    return role.startswith("ood") or role == "synthetic"


#: covariate-shifted ID (OpenOOD v1.5 full-spectrum OOD): ID classes under another style or
#: corruption (ImageNet-V2/-C/-R, CIFAR-10-C). Its rows keep their class labels; ``report --fsood``
#: counts them as ID, a plain report shows only their accuracy.
CSID_ROLE = "csid"


def role_from_name(split: str) -> str:
    """The role a ``--data`` split gets from its name: ood/near/... -> ood-near, ood/far/... -> ood-far,
    ood/val/... -> ood-val, other ood/... -> ood, synthetic/... -> synthetic, csid/... -> csid,
    anything else -> id."""
    parts = split.split("/")
    if parts[0] in ("synthetic", CSID_ROLE):
        return parts[0]
    if parts[0] != "ood":
        return "id"
    return {"near": "ood-near", "far": "ood-far", "val": "ood-val"}.get(parts[1] if len(parts) > 2 else "", "ood")


def data_root(cli_value: str | None) -> Path:
    root = cli_value or os.environ.get(DATA_ROOT_ENV) or "data"
    return Path(root).expanduser()


#: the built-in kinds are registered by ``oodcli.data.sources``, which the package imports: any
#: import of this module goes through ``oodcli/data/__init__.py``, so they are there before a lookup
_SOURCES: dict[str, Callable[[str, Path, bool], ImageDataset]] = {}


def register_source(kind: str):
    """Register a factory ``(argument, data_root, is_ood) -> ImageDataset`` for ``kind:argument``;
    a kind already taken is refused, so a plugin cannot silently replace a built-in."""

    def deco(fn):
        if kind in _SOURCES:
            raise ValueError(f"data source kind {kind!r} registered twice")
        _SOURCES[kind] = fn
        return fn

    return deco


def open_source(spec: str, root: Path, is_ood: bool = False) -> ImageDataset:
    from oodcli.plugins import failure_note, load_plugins

    kind, _, arg = spec.partition(":")
    if kind not in _SOURCES:  # not a built-in kind: perhaps a plugin's
        load_plugins()
    if kind not in _SOURCES:
        raise UsageError(
            f"unknown data source '{spec}'; use one of {', '.join(k + ':...' for k in sorted(_SOURCES))}"
            + failure_note()
        )
    return _SOURCES[kind](arg, root, is_ood)
