"""What every backbone is before it is built: a spec that is cheap to inspect, and the registry.

Nothing here imports torch (DESIGN.md, "Fast start"): the spec (name, layers,
preprocessing, weights identity) is all that ``extract`` needs to fingerprint a run,
so a cache hit, ``--list-models`` and every command that reads a store never pay for
it. Builders are ``Lazy("module:function", *args)`` references; the module holding
the network, and torch with it, is imported only when a network is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oodcli.errors import OodError, UsageError


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing, described as data so it can be fingerprinted and printed."""

    resize: int  # shorter side is resized to this many pixels
    crop: int  # then centre-cropped to crop x crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # or "bicubic"
    #: "shortest": the shorter side to ``resize`` (aspect kept); "squash": both sides to ``resize``
    #: (aspect lost), as open_clip's SigLIP weights were trained
    resize_mode: str = "shortest"

    def to_transform(self):
        from torchvision import transforms as T

        mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[
            self.interpolation
        ]
        size = (self.resize, self.resize) if self.resize_mode == "squash" else self.resize
        return T.Compose(
            [
                T.Lambda(_to_rgb),
                T.Resize(size, interpolation=mode),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def describe(self) -> dict:
        """As data; ``resize_mode`` only when it is not the default, so older stores keep their fingerprints."""
        described = dataclasses.asdict(self)
        if self.resize_mode == "shortest":
            del described["resize_mode"]
        return described


PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation", "resize_mode")
INTERPOLATIONS = ("bilinear", "bicubic")
RESIZE_MODES = ("shortest", "squash")


def preprocess_option(described: dict) -> str:
    """The ``--preprocess`` text of a ``Preprocess.describe()`` (as stored: lists for the triples),
    so that ``parse_preprocess`` gives the same preprocessing back."""
    return ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in described.items())


def parse_preprocess(text: str, base: Preprocess, option: str = "--preprocess") -> Preprocess:
    """``KEY=VALUE,...`` applied over ``base``: resize, crop (pixels), mean, std (three numbers
    separated by '/' or ';', so a value never contains the list's comma) and interpolation
    (bilinear or bicubic) and resize_mode (shortest or squash). E.g. ``mean=0.507/0.487/0.441,std=0.267/0.256/0.276,crop=32``.
    Any bad key or value is a one-line UsageError naming it."""
    changes: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key:
            raise UsageError(f"{option} '{item}' is not KEY=VALUE; keys: {', '.join(PREPROCESS_KEYS)} "
                             "(e.g. mean=0.507/0.487/0.441,std=0.267/0.256/0.276,crop=32)")
        if key not in PREPROCESS_KEYS:
            raise UsageError(f"{option}: unknown key '{key}'; use {', '.join(PREPROCESS_KEYS)}")
        if key in changes:
            raise UsageError(f"{option}: '{key}' given twice")
        if key in ("resize", "crop"):
            try:
                changes[key] = int(value)
            except ValueError:
                changes[key] = 0
            if changes[key] < 1:
                raise UsageError(f"{option}: {key}={value} is not a size in pixels (an integer >= 1)")
        elif key in ("mean", "std"):
            numbers = value.replace(";", "/").split("/")
            try:
                triple = tuple(float(x) for x in numbers)
            except ValueError:
                triple = ()
            if len(triple) != 3 or not all(math.isfinite(x) for x in triple) or \
                    (key == "std" and not all(x > 0 for x in triple)):
                kind = "positive numbers" if key == "std" else "numbers"
                raise UsageError(f"{option}: {key}={value} is not three {kind} separated by '/' "
                                 f"(e.g. {key}=0.5/0.5/0.5)")
            changes[key] = triple
        elif key == "resize_mode":
            if value not in RESIZE_MODES:
                raise UsageError(f"{option}: resize_mode={value}; use {' or '.join(RESIZE_MODES)}")
            changes[key] = value
        else:
            if value not in INTERPOLATIONS:
                raise UsageError(f"{option}: interpolation={value}; use {' or '.join(INTERPOLATIONS)}")
            changes[key] = value
    if not changes:
        raise UsageError(f"{option} is empty; give KEY=VALUE,... with keys {', '.join(PREPROCESS_KEYS)}")
    out = dataclasses.replace(base, **changes)
    if out.crop > out.resize:
        raise UsageError(f"{option}: crop {out.crop} is larger than resize {out.resize}")
    return out


def _to_rgb(img):
    return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


@dataclass(frozen=True)
class Lazy:
    """A callable named by ``"module:function"``: the module is imported on the first call.

    ``Lazy("oodcli.backbones.cifar_resnet:build", "cifar_resnet18")(weights)`` calls
    ``build("cifar_resnet18", weights)``; declaring a spec with it costs no import.
    """

    target: str
    args: tuple = ()

    def __init__(self, target: str, *args: Any):
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "args", args)

    def resolve(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *more: Any):
        return self.resolve()(*self.args, *more)


#: mean and std of each benchmark's ID train set, as OpenOOD normalises the checkpoints it trains
#: on it (its preprocessors' ``normalization_dict``); specs with ``follows_data`` take them
DATASET_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet200": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: everything known before building it."""

    name: str
    family: str  # torchvision | cifar_resnet | dinov2 | clip | digits_cnn | ...
    description: str
    layers: tuple[str, ...]  # every layer it can return
    default_layers: tuple[str, ...]
    preprocess: Preprocess
    #: weights -> Backbone; usually a ``Lazy`` so that declaring the spec imports no torch
    builder: Callable[[str | None], Any] = field(repr=False, compare=False)
    default_weights: str | None = None  # e.g. "IMAGENET1K_V1", "openai", "random"
    needs_weights_file: bool = False  # True: --weights PATH is required
    #: families whose input depends on the checkpoint return the spec for given weights
    adapt: Callable[["BackboneSpec", str | None], "BackboneSpec"] | None = field(default=None, repr=False, compare=False)
    #: weights -> the text half alone (CLIP): prompts are encoded without building the image encoder
    text_builder: Callable[[str | None], Any] | None = field(default=None, repr=False, compare=False)
    #: True: the weights are trained on a benchmark's ID data (OpenOOD's checkpoints), so the
    #: normalisation is that data set's mean and std (``for_data``), not one fixed for the family
    follows_data: bool = False
    #: the activation the network runs where weights decide it (CLIP: "gelu" or "quick_gelu");
    #: set by ``for_weights``; recorded in the fingerprint when it is "quick_gelu"
    activation: str | None = None
    #: how to name this model again from any folder, recorded with its features: the --model text
    #: (SOURCE:NAME models: local files made absolute, --head, --layer, --strict) and, for features
    #: stored under another name (``extract --as``), that name
    rebuild: dict | None = field(default=None, repr=False, compare=False)

    def stored_as(self, name: str, model: str) -> "BackboneSpec":
        """This spec with its features stored under backbone ``name`` (``extract --as``): several
        checkpoints of one network side by side in one store, e.g. the members of a deep ensemble.
        The name is recorded with the features, so every later step builds the network again."""
        check_backbone_name(name)
        return dataclasses.replace(self, name=name, rebuild={**(self.rebuild or {"model": model}), "name": name})

    def weights_identity(self, weights: str | None) -> str:
        """A stable string naming the parameters; a file is named by its content hash."""
        weights = weights if weights is not None else self.default_weights
        if weights is None:
            if self.needs_weights_file:
                raise UsageError(f"model '{self.name}' needs --weights PATH (a checkpoint file)")
            return "none"
        path = Path(weights)
        if path.is_dir():  # e.g. a Hugging Face model saved with save_pretrained
            return f"dir:{path.name}:sha256={sha256_dir(path)}"
        if path.suffix in {".safetensors", ".pt", ".pth", ".ckpt", ".bin"} or path.exists():
            if not path.is_file():
                raise OodError(f"weights file not found: {weights}")
            return f"file:{path.name}:sha256={sha256_file(path)}"
        return f"{self.family}:{weights}"

    def for_weights(self, weights: str | None) -> "BackboneSpec":
        """This spec as it applies to ``weights`` (APEX/PALM models take their base network's preprocessing)."""
        return self.adapt(self, weights) if self.adapt is not None else self

    def for_data(self, benchmark: str | None) -> "BackboneSpec":
        """This spec with the normalisation of the data set its weights were trained on, for
        the families that follow it (``follows_data``); others, and benchmarks without
        known statistics, are returned unchanged."""
        if not self.follows_data or benchmark is None:
            return self
        stats = DATASET_NORMALIZATION.get(benchmark)
        if stats is None:
            return self
        return dataclasses.replace(self, preprocess=dataclasses.replace(self.preprocess, mean=stats[0], std=stats[1]))

    def build(self, weights: str | None = None):
        """The network (a ``Backbone``); this is where torch is imported."""
        self.weights_identity(weights)  # validates --weights before any work
        return self.builder(weights if weights is not None else self.default_weights)


    def build_text(self, weights: str | None = None):
        """The text tower of a vision-language backbone (a ``TextTower``), never its image encoder."""
        if self.text_builder is None:
            raise UsageError(f"model '{self.name}' has no text tower; prompts need a CLIP model")
        self.weights_identity(weights)
        return self.text_builder(weights if weights is not None else self.default_weights)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()[:16]


def sha256_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}={sha256_file(f)};".encode())
    return h.hexdigest()[:16]


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file, read from its JSON header (no torch,
    no tensor data read). Raises ValueError when the file is not safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file too short for a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("safetensors header too large")
        raw = f.read(size)
    if len(raw) != size:
        raise ValueError("truncated safetensors header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("safetensors __metadata__ is not a JSON object")
    return meta


#: filled by ``oodcli.backbones.registry``, which the package imports first: any import of this
#: module goes through ``oodcli/backbones/__init__.py``, so every spec is declared before a lookup
_REGISTRY: dict[str, BackboneSpec] = {}


#: set by ``oodcli.backbones.sources`` (imported with the package, like the registry): resolves
#: ``SOURCE:NAME`` names, so this module needs no import of it
_SOURCE_RESOLVER: list[Callable[..., BackboneSpec]] = []


def register_source_resolver(resolve: Callable[..., BackboneSpec]) -> None:
    _SOURCE_RESOLVER[:] = [resolve]


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def check_backbone_name(name: str) -> None:
    """A name features can be stored under: one part of a store node name (the store's one rule,
    ``check_name``), without the separators of ``--backbone a,b`` and ``layer@kind``, and not one
    of a split's own arrays."""
    from oodcli.store import check_name

    if not name or name != name.strip() or any(c in name for c in "/,@") or name in ("labels", "ids"):
        raise UsageError(f"--as '{name}': a backbone name is one word without '/', ',', '@' or spaces at its "
                         "ends, and not 'labels' or 'ids', e.g. --as digits_cnn-seed1")
    check_name(name, "--as")


def spec_as_recorded(source: dict, weights: str | None, preprocess: str | None = None) -> BackboneSpec:
    """The spec of features whose ``model_source`` says how extract named the model: the same
    --model (SOURCE:NAME with its --head, --layer, --strict) under the name they are stored as."""
    spec = get_spec(source["model"], weights, source.get("head"), source.get("layers") or (),
                    source.get("strict", True), preprocess=preprocess)
    return spec.stored_as(source["name"], source["model"]) if source.get("name") else spec


def get_spec(name: str, weights: str | None = None, head: str | None = None, layers=(), strict: bool = True,
             preprocess: str | None = None) -> BackboneSpec:
    """The spec of a built-in name, or of ``SOURCE:NAME`` (``oodcli.backbones.sources``), which alone
    takes ``head`` (--head), ``layers`` (--layer NAME=PATH), ``strict`` and, to know whether the
    model's own preprocessing is needed, the ``--preprocess`` text."""
    if name not in _REGISTRY and ":" not in name:  # not a built-in: perhaps a plugin's
        from oodcli.plugins import load_plugins

        load_plugins()
    if name in _REGISTRY:
        given = [opt for opt, value in (("--head", head), ("--layer", layers), ("--strict false", not strict)) if value]
        if given:
            raise UsageError(f"{given[0]} goes with SOURCE:NAME models (e.g. torchvision:{name}); "
                             f"'{name}' is a built-in with its own layers")
        return _REGISTRY[name]
    if ":" in name and _SOURCE_RESOLVER:
        return _SOURCE_RESOLVER[0](name, weights, head, layers, strict, preprocess)
    import difflib

    from oodcli.plugins import failure_note

    near = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    raise UsageError(
        f"unknown model '{name}'"
        + (f" (close matches: {', '.join(near)})" if near else "")
        + f"; choose one of: {', '.join(sorted(_REGISTRY))}, or SOURCE:NAME with a source of "
        "torchvision, timm, hf, open_clip, python (see --list-models)" + failure_note()
    )


def all_specs() -> dict[str, BackboneSpec]:
    return dict(_REGISTRY)
