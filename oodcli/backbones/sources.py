"""Models named ``SOURCE:NAME``: any torchvision, timm or Hugging Face classifier, or the user's own
``nn.Module`` factory, run through the hook-based adapter (``oodcli.backbones.adapters``), and any
open_clip model with its text tower (``oodcli.backbones.open_clip_source``).

This module imports no torch. It turns ``--model SOURCE:NAME`` (with ``--weights``, ``--head``,
``--layer``, ``--strict``, ``--preprocess``) into a ``SourceSpec``, whose identity (source, name,
weights identity, preprocessing, layer paths) is the fingerprint. Where that identity needs the
library to be known (torchvision's weights enums, timm's data config, a Hugging Face image
processor, open_clip's table of pretrained tags), the library is imported; a ``python:`` model
with a full ``--preprocess``, and an open_clip model with ``@random`` or a weights file (its
configuration is a JSON file of the package, or of the user's folder), are known from their files
alone, so their cache hits import no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodcli.backbones.spec import (
    PREPROCESS_KEYS, BackboneSpec, Preprocess, parse_preprocess, register_source_resolver, sha256_dir, sha256_file,
)
from oodcli.errors import OodError, UsageError

#: the layers every source offers; which of them a model has is found when it is built
STANDARD_LAYERS = ("logits", "penultimate", "featmap")
IMAGENET_DEFAULT = Preprocess(resize=256, crop=224)
RANDOM_SEED = 0
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class LayerTap:
    """A layer read by a forward hook: the input or the output of the submodule at ``path``."""

    name: str
    path: str
    side: str = "out"  # "in" | "out"

    def describe(self) -> str:
        return f"{self.name}={self.path}:{self.side}"


def parse_layer(text: str) -> LayerTap:
    """``NAME=module.path[:in|:out]`` (default ``:out``), as ``--layer`` takes it."""
    name, eq, rest = (x.strip() for x in text.partition("="))
    if not eq or not name or not rest:
        raise UsageError(f"--layer '{text}' is not NAME=module.path[:in|:out] (e.g. --layer block3=layer3:out)")
    path, _, side = rest.partition(":")
    side = side or "out"
    if side not in ("in", "out"):
        raise UsageError(f"--layer '{text}': ':{side}' is neither ':in' nor ':out'")
    if not _LAYER_NAME.match(name) or "@" in name:
        raise UsageError(f"--layer '{text}': '{name}' is not a layer name (letters, digits, '_', '-', '.')")
    if name in ("logits", "penultimate"):
        raise UsageError(f"--layer '{text}': {name} is the model's own (its output / its head's input); "
                         "name the head with --head MODULE.PATH instead")
    return LayerTap(name, path.strip(), side)


def parse_weights(weights: str | None) -> tuple[str, Any]:
    """(kind, value): ("default", None), ("random", seed), ("file", Path) or ("name", str)."""
    if weights is None:
        return "default", None
    if weights == "random" or weights.startswith("random:"):
        seed = weights.partition(":")[2] or str(RANDOM_SEED)
        if not seed.isdigit():
            raise UsageError(f"--weights {weights}: the seed after 'random:' must be an integer >= 0")
        return "random", int(seed)
    path = Path(weights)
    if path.suffix in {".safetensors", ".pt", ".pth", ".ckpt", ".bin"} or path.exists():
        if not path.is_file():
            raise OodError(f"weights file not found: {weights}")
        return "file", path
    return "name", weights


def weights_text(kind: str, value: Any) -> str:
    if kind == "random":
        return f"random:seed={value}"
    if kind == "file":
        return f"file:{value.name}:sha256={sha256_file(value)}"
    return str(value)


def close_matches(name: str, known, what: str) -> str:
    near = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return f"{what}; close matches: {', '.join(near)}" if near else what


@dataclass
class ModelSource:
    """One ``SOURCE:NAME`` as resolved: what to build and what identifies it.

    ``weights_id`` and ``preprocess`` are known at resolution; ``build`` makes the adapter
    (imports torch) once per weights value and keeps it, so a model built to read the
    preprocessing it carries is not built twice.
    """

    source: str  # torchvision | timm | hf | python
    name: str  # what follows "SOURCE:"
    store_name: str  # the backbone's name in the store (no '/')
    weights: str | None
    weights_id: str
    preprocess: Preprocess | None
    head: str | None = None  # --head MODULE.PATH
    taps: tuple[LayerTap, ...] = ()  # --layer NAME=PATH
    strict: bool = True
    has_logits: bool = True
    details: dict = field(default_factory=dict)  # source-specific: the hub revision, a folder, ...
    _built: dict = field(default_factory=dict, repr=False)

    def identity(self) -> str:
        """Everything that decides the parameters and where each layer is read, as one string."""
        parts = [self.weights_id]
        if self.head:
            parts.append(f"head={self.head}")
        parts += [f"layer {t.describe()}" for t in self.taps]
        return "; ".join(parts)

    def module(self, weights: str | None = None):
        """The bare ``nn.Module`` with its weights, made once per weights value (imports torch)."""
        key = weights if weights is not None else self.weights
        if key not in self._built:
            from oodcli.backbones import adapters

            kind, value = self.details["weights"] if key == self.weights else parse_weights(key)
            self._built[key] = adapters.make_module(self, kind, value)
        return self._built[key]

    def build(self, weights: str | None, input_size: int):
        """The hook-based ``Backbone`` over ``module(weights)``, its layers probed at ``input_size``
        (open_clip models: the CLIP image encoder's own layers)."""
        if self.source == "open_clip":
            from oodcli.backbones import open_clip_source

            return open_clip_source.image_backbone(self, self.module(weights), input_size)
        from oodcli.backbones import adapters

        return adapters.HookedBackbone(self, self.module(weights), input_size)

    def text_tower(self, weights: str | None = None):
        """The text tower alone (open_clip models), with the weights that made the image features."""
        from oodcli.backbones import open_clip_source

        kind, value = self.details["weights"] if weights == self.weights else parse_weights(weights)
        return open_clip_source.text_tower(self, kind, value)


@dataclass(frozen=True)
class SourceSpec(BackboneSpec):
    """A ``BackboneSpec`` whose network comes from a ``ModelSource``; ``layers`` are the ones asked for
    (``requesting``), each checked against the built network before anything is written."""

    source: ModelSource | None = field(default=None, repr=False, compare=False)

    def weights_identity(self, weights: str | None) -> str:
        return self.source.identity()

    def build(self, weights: str | None = None):
        net = self.source.build(weights, self.preprocess.crop)
        missing = [layer for layer in self.layers if layer not in net.layer_shapes]
        if missing:
            reason = getattr(net, "missing", {}).get(missing[0], "it was not found")
            raise UsageError(f"model '{self.name}' has no layer '{missing[0]}': {reason}")
        return net

    def requesting(self, layers: tuple[str, ...]) -> "SourceSpec":
        return dataclasses.replace(self, layers=tuple(layers))


#: each source: how to name a model of it, and what --weights takes
SOURCES = {
    "torchvision": ("torchvision:<name>  (a classification model of torchvision.models)",
                    "an enum member (default DEFAULT), FILE or random"),
    "timm": ("timm:<name>[.<tag>]  (timm.create_model)", "pretrained (default; timm's hub), FILE or random"),
    "hf": ("hf:<repo>[@<revision>] or hf:<folder>  (AutoModelForImageClassification / AutoModel)",
           "the repo's (default), FILE or random"),
    "python": ("python:<file.py or module>:<factory>  (returns an nn.Module; --preprocess unless it "
               "carries .preprocess)", "the factory's (default), FILE (--strict false: keys that fit) or random"),
    "open_clip": ("open_clip:<arch>@<tag|FILE|random> or open_clip:<folder with open_clip_config.json>  "
                  "(a CLIP: image_embeds, penultimate, patch_tokens, patch_values; its text tower for MCM, "
                  "NegLabel, CoOp, ...)", "after '@' (or --weights): a pretrained tag (open_clip's hub), FILE or "
                  "random; a folder: its checkpoint"),
}
#: the layers of a CLIP (the built-in clip-* models' names); which of them a model has is found when built
CLIP_LAYERS = ("image_embeds", "patch_tokens", "patch_values", "penultimate")


def source_of(name: str) -> str | None:
    """The source a model name starts with, or None for a built-in name."""
    head, colon, _ = name.partition(":")
    return head if colon else None


def resolve(model: str, weights: str | None = None, head: str | None = None, layers=(), strict: bool = True,
            preprocess: str | None = None) -> SourceSpec:
    """The spec of ``SOURCE:NAME``; bad input is a one-line UsageError/OodError."""
    source, _, name = model.partition(":")
    if source not in SOURCES:
        raise UsageError(close_matches(source, SOURCES, f"unknown model source '{source}' in '{model}'; "
                                                         f"sources: {', '.join(SOURCES)} (see --list-models)"))
    if not name:
        raise UsageError(f"--model {model}: name the model after '{source}:' ({SOURCES[source][0]})")
    taps = tuple(parse_layer(text) for text in layers or ())
    names = [t.name for t in taps]
    if len(set(names)) != len(names):
        raise UsageError(f"--layer: '{next(n for n in names if names.count(n) > 1)}' is named twice")
    if source == "open_clip" and (head or taps):
        raise UsageError(f"{'--head' if head else '--layer'} goes with classifiers; an open_clip model offers "
                         f"{', '.join(CLIP_LAYERS)} (--layers)")
    resolved: ModelSource = _RESOLVERS[source](name, weights, preprocess)
    resolved.head, resolved.taps, resolved.strict = head, taps, strict
    pre = resolved.preprocess
    if pre is None:  # only python: models can lack it; ask the module, then refuse
        pre = _carried_preprocess(resolved, preprocess)
    if preprocess is not None:
        pre = parse_preprocess(preprocess, pre)
    layer_names = (*(n for n in STANDARD_LAYERS if resolved.has_logits or n != "logits"),
                   *(n for n in names if n not in STANDARD_LAYERS))
    defaults = (*(("logits", "penultimate") if resolved.has_logits else ("penultimate",)),
                *(n for n in names if n not in STANDARD_LAYERS))
    rebuild = {"model": _absolute_model(source, name), "head": head, "layers": list(layers or ()), "strict": strict}
    if source == "open_clip":  # a CLIP: its family's layers and its text tower
        return SourceSpec(
            name=resolved.store_name, family="clip", description=f"open_clip model {name}", layers=CLIP_LAYERS,
            default_layers=("image_embeds",), preprocess=pre, builder=resolved.module, default_weights=weights,
            text_builder=resolved.text_tower, activation=resolved.details["activation"], source=resolved,
            rebuild=rebuild,
        )
    return SourceSpec(
        name=resolved.store_name, family=source, description=f"{source} model {name}", layers=layer_names,
        default_layers=defaults, preprocess=pre, builder=resolved.module, default_weights=weights,
        source=resolved, rebuild=rebuild,
    )


def _absolute_model(source: str, name: str) -> str:
    """``SOURCE:NAME`` with a local file or folder (python: module files, hf: saved folders) made absolute."""
    if source == "python":
        module, colon, factory = name.rpartition(":")
        if module.endswith(".py") and Path(module).exists():
            return f"python:{Path(module).resolve()}:{factory}"
    elif source == "hf" and Path(name).exists():
        return f"hf:{Path(name).resolve()}"
    elif source == "open_clip":  # a folder and a weights file after '@', each made absolute
        arch, at, tail = name.partition("@")
        local = arch.removeprefix("local-dir:")
        arch = str(Path(local).resolve()) if Path(local).is_dir() else arch
        tail = str(Path(tail).resolve()) if tail and Path(tail).is_file() else tail
        return f"open_clip:{arch}{at}{tail}"
    return f"{source}:{name}"


def _store_name(source: str, name: str) -> str:
    """A node-safe backbone name: '/' (hub ids, paths) becomes '--', as the Hugging Face cache does."""
    return f"{source}:{name.strip('/').replace('/', '--')}"


# ---- torchvision ---------------------------------------------------------------------------


def _torchvision(name: str, weights: str | None, preprocess: str | None) -> ModelSource:
    from torchvision import models

    known = models.list_models(module=models)
    if name not in known:
        raise UsageError(close_matches(name, known, f"torchvision has no classification model '{name}'"))
    kind, value = parse_weights(weights)
    pre = IMAGENET_DEFAULT
    if kind in ("default", "name"):
        enum = models.get_model_weights(name)
        member = "DEFAULT" if kind == "default" else value
        if member not in enum.__members__:
            raise UsageError(f"unknown weights '{member}' for torchvision:{name}; choose one of: "
                             f"{', '.join(enum.__members__)}, random, or a state_dict file")
        member = enum[member].name  # DEFAULT -> the member it stands for
        kind, value = "name", member
        pre = _torchvision_preprocess(enum[member].transforms(), name)
    return ModelSource("torchvision", name, _store_name("torchvision", name), weights,
                       f"torchvision:{name}:" + weights_text(kind, value), pre, details={"weights": (kind, value)})


def _torchvision_preprocess(transform, name: str) -> Preprocess:
    """A weights enum's ``transforms()`` (torchvision's ImageClassification) as a ``Preprocess``."""
    mode = str(getattr(transform.interpolation, "value", transform.interpolation))
    if mode not in ("bilinear", "bicubic"):
        raise OodError(f"torchvision:{name}'s weights resize with {mode} interpolation, which oodcli does not "
                       "offer; give --preprocess ...,interpolation=bilinear")
    return Preprocess(resize=int(transform.resize_size[0]), crop=int(transform.crop_size[0]),
                      mean=tuple(transform.mean), std=tuple(transform.std), interpolation=mode)


# ---- timm ----------------------------------------------------------------------------------


def _timm(name: str, weights: str | None, preprocess: str | None) -> ModelSource:
    import timm

    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        raise UsageError(close_matches(arch, timm.list_models(), f"timm has no model '{arch}'"))
    kind, value = parse_weights(weights)
    if kind == "name" and value != "pretrained":
        raise UsageError(f"--weights {value} for timm:{name}: give pretrained (timm's hub), a file or random")
    cfg = timm.models.get_pretrained_cfg(name) if "." in name else timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise UsageError(f"timm has no pretrained tag '{name}'; tags of {arch}: "
                         f"{', '.join(timm.list_pretrained(arch + '.*')[:8]) or 'none'}")
    if kind in ("default", "name"):
        kind, value = "name", f"pretrained:{cfg.hf_hub_id or ''}:{cfg.tag or ''}"
    return ModelSource("timm", name, _store_name("timm", name), weights, f"timm:{name}:" + weights_text(kind, value),
                       _timm_preprocess(cfg, name), details={"weights": (kind, value)})


def _timm_preprocess(cfg, name: str) -> Preprocess:
    """timm's resolved data config (input size, crop_pct, interpolation, mean, std) as a ``Preprocess``."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    crop = int(data["input_size"][-1])
    mode = data.get("interpolation", "bicubic")
    if mode not in ("bilinear", "bicubic"):
        mode = "bicubic"
    return Preprocess(resize=int(crop / data.get("crop_pct", 0.875)), crop=crop, mean=tuple(data["mean"]),
                      std=tuple(data["std"]), interpolation=mode)


# ---- Hugging Face transformers -------------------------------------------------------------


def _hf(name: str, weights: str | None, preprocess: str | None) -> ModelSource:
    import json

    repo, _, revision = name.partition("@")
    folder = Path(repo)
    kind, value = parse_weights(weights)
    if kind == "name":
        raise UsageError(f"--weights {value} for hf:{name}: the repo or folder holds the weights; "
                         "give random or a state_dict file instead, or no --weights")
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise OodError(f"hf:{repo}: the folder has no config.json (write it with save_pretrained)")
        config = json.loads((folder / "config.json").read_text())
        base = f"hf:dir:{folder.name}:sha256={sha256_dir(folder)}"
        store = _store_name("hf", folder.resolve().name)
    else:
        config = _hub_config(repo, revision or "main")
        base = f"hf:{repo}@{revision or 'main'}"
        store = _store_name("hf", repo)
    classifies = any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or [])
    ident = base if kind == "default" else f"{base}:{weights_text(kind, value)}"
    return ModelSource("hf", name, store, weights, ident, _hf_preprocess(repo, revision or None),
                       has_logits=classifies, details={"repo": repo, "revision": revision or None,
                                                       "classifies": classifies, "weights": (kind, value)})


def _hub_config(repo: str, revision: str) -> dict:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(repo, revision=revision).to_dict()
    except Exception as exc:  # no such repo, no internet: one line
        raise OodError(f"hf:{repo} is neither a folder nor a reachable Hugging Face repo "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _hf_preprocess(repo: str, revision: str | None) -> Preprocess:
    """The model's ``AutoImageProcessor`` (size, crop, mean, std, resample) as a ``Preprocess``."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, revision=revision)
    except Exception as exc:
        raise OodError(f"hf:{repo} has no image processor ({type(exc).__name__}); save one beside the model "
                       "(AutoImageProcessor.save_pretrained) or give --preprocess") from None
    def get(sizes, key):  # a dict in older transformers, a SizeDict in newer ones
        return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)

    size, crop_size = getattr(proc, "size", None), getattr(proc, "crop_size", None)
    shortest = get(size, "shortest_edge")
    side = shortest or get(size, "height") or 224
    crop = side
    if getattr(proc, "do_center_crop", False) and crop_size is not None:
        crop = get(crop_size, "height") or side
    crop_pct = getattr(proc, "crop_pct", None)
    if crop_pct and shortest and side < 384:  # ConvNeXt's processor: resize side/crop_pct, crop side
        side = int(side / crop_pct)
    mean = tuple(getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(proc, "image_std", None) or (0.5, 0.5, 0.5))
    if not getattr(proc, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(proc, "resample", 2)
    mode = "bicubic" if int(getattr(resample, "value", resample) or 2) == 3 else "bilinear"
    return Preprocess(resize=int(side), crop=int(min(crop, side)), mean=mean, std=std, interpolation=mode)


# ---- the user's own factory -----------------------------------------------------------------


def _python(name: str, weights: str | None, preprocess: str | None) -> ModelSource:
    target, colon, factory = name.rpartition(":")
    if not colon or not target or not factory.isidentifier():
        raise UsageError(f"--model python:{name} is not python:<module or file.py>:<callable> "
                         "(e.g. python:my_models.py:build)")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise OodError(f"python:{name}: no file {target}")
        code = f"file:{path.name}:sha256={sha256_file(path)}"
        label = path.name
    else:
        import importlib.util

        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UsageError(f"python:{name}: no module '{target}' on the Python path (or give a file.py)")
        origin = Path(found.origin) if found.origin and Path(found.origin).is_file() else None
        code = f"module:{target}" + (f":sha256={sha256_file(origin)}" if origin else "")
        label = target
    kind, value = parse_weights(weights)
    if kind == "name":
        raise UsageError(f"--weights {value} for python:{name}: give a state_dict file, random, or no --weights "
                         "(the factory's own parameters)")
    if kind == "default":
        kind, value = "name", f"factory:seed={RANDOM_SEED}"  # the factory runs with torch seeded
    return ModelSource("python", name, f"python:{label}:{factory}", weights,
                       f"{code}:{factory}; " + weights_text(kind, value), None,
                       details={"target": target, "factory": factory, "weights": (kind, value)})


def _carried_preprocess(resolved: ModelSource, preprocess: str | None) -> Preprocess:
    """A ``python:`` model's preprocessing: all of it from ``--preprocess`` (nothing is built), else what
    the module carries as ``.preprocess`` (a dict of Preprocess fields), else a one-line refusal."""
    given = {item.partition("=")[0].strip() for item in (preprocess or "").split(",") if "=" in item}
    needed = {"resize", "crop", "mean", "std"}
    if needed <= given:
        return Preprocess(resize=1, crop=1)  # replaced whole by --preprocess
    carried = getattr(resolved.module(), "preprocess", None)
    if isinstance(carried, Preprocess):
        return carried
    if isinstance(carried, dict):
        try:
            return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in carried.items()})
        except TypeError:
            raise UsageError(f"python:{resolved.name}: the module's .preprocess {carried} is not a dict of "
                             f"{', '.join(PREPROCESS_KEYS)}") from None
    missing = [k for k in PREPROCESS_KEYS if k in needed - given]
    raise UsageError(f"model python:{resolved.name} carries no preprocessing (no .preprocess on the module); give "
                     f"--preprocess with {', '.join(missing)}, e.g. --preprocess "
                     "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225")


# ---- open_clip ---------------------------------------------------------------------------------

#: open_clip's defaults for what a pretrained tag or a folder's preprocess_cfg does not set (its PreprocessCfg)
OPEN_CLIP_PREPROCESS = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                        "interpolation": "bicubic", "resize_mode": "shortest"}
#: where open_clip's from_pretrained saves a model's weights in a folder, in the order it looks for them
OPEN_CLIP_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pt",
                         "model.safetensors", "pytorch_model.bin")


def _open_clip_configs() -> dict[str, Path]:
    """open_clip's architecture configurations (its package's model_configs/*.json), found without
    importing it (and torch)."""
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        raise OodError("open_clip is not installed; pip install open_clip_torch")
    folder = Path(list(found.submodule_search_locations)[0]) / "model_configs"
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def _open_clip(name: str, weights: str | None, preprocess: str | None) -> ModelSource:
    """``open_clip:ARCH@WEIGHTS`` (an architecture of open_clip's table; weights a pretrained tag, a file or
    random) or ``open_clip:FOLDER[@WEIGHTS]`` (open_clip's own format: open_clip_config.json with model_cfg
    and preprocess_cfg, and the checkpoint beside it). The preprocessing is what open_clip's
    ``create_model`` attaches: its defaults, overlaid by the tag's (or the folder's) settings, at the
    image size of the vision tower."""
    arch, at, tail = name.partition("@")
    if at and weights is not None:
        raise UsageError(f"--model open_clip:{name} names its weights after '@'; drop --weights {weights} "
                         "(or the '@...')")
    if at and not tail:
        raise UsageError(f"--model open_clip:{name}: name the weights after '@' (a pretrained tag, FILE or random)")
    given = tail if at else weights
    kind, value = parse_weights(given)
    local = Path(arch.removeprefix("local-dir:"))
    tag: dict = {}
    if local.is_dir() or arch.startswith("local-dir:"):
        config_file = local / "open_clip_config.json"
        if not config_file.is_file():
            raise OodError(f"open_clip:{arch}: the folder has no open_clip_config.json (open_clip's format, with "
                           "model_cfg and preprocess_cfg)")
        try:
            config = json.loads(config_file.read_text())
            model_cfg, pre_cfg = config["model_cfg"], config.get("preprocess_cfg") or {}
        except (ValueError, KeyError, TypeError):
            raise OodError(f"open_clip:{arch}: {config_file.name} is not JSON with a model_cfg") from None
        if kind == "name":
            raise UsageError(f"open_clip:{name}: a folder's weights are its checkpoint; give @FILE, @random or "
                             "nothing after the folder")
        if kind == "default":
            found = next((local / f for f in OPEN_CLIP_CHECKPOINTS if (local / f).is_file()), None)
            if found is None:
                raise OodError(f"open_clip:{arch}: the folder holds no checkpoint ({OPEN_CLIP_CHECKPOINTS[0]}); "
                               "give @FILE or @random")
            kind, value = "file", found
        base, label, tokenizer = f"open_clip:dir:{local.resolve().name}:config_sha256={sha256_file(config_file)}",             local.resolve().name, f"local-dir:{local.resolve()}"
    else:
        configs = _open_clip_configs()
        if arch not in configs:
            raise UsageError(close_matches(arch, configs, f"open_clip has no model '{arch}'")
                             + " (or give a folder with open_clip_config.json)")
        model_cfg, pre_cfg = json.loads(configs[arch].read_text()), {}
        if kind == "default":
            raise UsageError(f"--model open_clip:{arch}: name its weights: open_clip:{arch}@TAG (a pretrained tag; "
                             f"'python -c \"import open_clip; print(open_clip.list_pretrained_tags_by_model('{arch}'))\"' "
                             "lists them), @FILE or @random")
        if kind == "name":  # a pretrained tag: open_clip's table says where it lives and how it was trained
            import open_clip

            tag = open_clip.get_pretrained_cfg(arch, value) or {}
            if not tag:
                raise UsageError(close_matches(value, open_clip.list_pretrained_tags_by_model(arch),
                                               f"open_clip has no pretrained tag '{value}' for {arch}")
                                 + "; or give a weights FILE or random")
            pre_cfg = {k: tag[k] for k in OPEN_CLIP_PREPROCESS if tag.get(k) is not None}
            value = f"pretrained:{value}:{tag.get('hf_hub') or tag.get('url') or ''}"
        base, label, tokenizer = f"open_clip:{arch}", arch, arch
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise OodError(f"open_clip:{arch}: the model configuration lacks embed_dim, vision_cfg or text_cfg")
    from oodcli.backbones.registry import openai_checkpoint

    quick_gelu = bool(model_cfg.get("quick_gelu") or tag.get("quick_gelu")
                      or (kind == "file" and openai_checkpoint(value)))
    return ModelSource(
        "open_clip", name, _store_name("open_clip", label), weights, f"{base}:" + weights_text(kind, value),
        _open_clip_preprocess(model_cfg, pre_cfg, name, preprocess), has_logits=False,
        details={"arch": arch, "folder": str(local.resolve()) if tokenizer.startswith("local-dir:") else None,
                 "tokenizer": tokenizer, "model_cfg": model_cfg, "quick_gelu": quick_gelu,
                 "activation": "quick_gelu" if quick_gelu else None, "weights": (kind, value)},
    )


def _open_clip_preprocess(model_cfg: dict, pre_cfg: dict, name: str, preprocess: str | None) -> Preprocess:
    """open_clip's inference transform (``image_transform`` of the model's preprocess cfg) as a ``Preprocess``."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise OodError(f"open_clip:{name} takes {size[0]}x{size[1]} images; oodcli crops square images only")
        size = size[0]
    cfg = {**OPEN_CLIP_PREPROCESS, **{k: v for k, v in pre_cfg.items() if k in OPEN_CLIP_PREPROCESS and v is not None}}
    mode = cfg["resize_mode"]
    if mode not in ("shortest", "squash") and "resize_mode" not in (preprocess or ""):
        raise OodError(f"open_clip:{name} resizes with resize_mode '{mode}', which oodcli does not offer; "
                       "give --preprocess resize_mode=shortest or resize_mode=squash")
    triple = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3  # noqa: E731
    return Preprocess(resize=int(size), crop=int(size), mean=triple(cfg["mean"]), std=triple(cfg["std"]),
                      interpolation="bilinear" if cfg["interpolation"] == "bilinear" else "bicubic",
                      resize_mode=mode if mode in ("shortest", "squash") else "shortest")


_RESOLVERS = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "python": _python, "open_clip": _open_clip}
register_source_resolver(resolve)
