"""Every backbone family's specs, declared without importing a network (or torch).

Each spec names its builder as ``Lazy("oodcli.backbones.<family>:<function>", ...)``:
the family module (torch, torchvision, transformers, open_clip) is imported only
when ``spec.build`` runs, i.e. when a split actually needs computing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from oodcli.backbones.spec import (  # noqa: F401  (DATASET_NORMALIZATION: its old home)
    DATASET_NORMALIZATION, BackboneSpec, Lazy, Preprocess, get_spec, register, safetensors_metadata,
)
from oodcli.errors import OodError, UsageError

# ---- preprocessing of each family --------------------------------------------------------

IMAGENET = Preprocess(resize=256, crop=224)
TV_TINY = Preprocess(resize=32, crop=32)
CIFAR = Preprocess(resize=32, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
DIGITS = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
DINO = Preprocess(resize=256, crop=224, interpolation="bicubic")
DINO_TINY = Preprocess(resize=32, crop=32, interpolation="bicubic")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_224 = Preprocess(resize=224, crop=224, mean=_CLIP_MEAN, std=_CLIP_STD, interpolation="bicubic")
CLIP_TINY = Preprocess(resize=32, crop=32, mean=_CLIP_MEAN, std=_CLIP_STD, interpolation="bicubic")

# ---- torchvision ImageNet classifiers (oodcli.backbones.torchvision_models) ----------------

_CNN_LAYERS = ("logits", "penultimate", "early", "featmap")  # featmap: last stage before global pooling
_VIT_LAYERS = ("logits", "penultimate", "early")  # a ViT has tokens, no activation map
#: layers only some families have, and what to say when another is asked for one
SPECIAL_LAYERS = {
    "featmap": "the last stage's activation map before global pooling, which only CNN backbones have "
               "(digits_cnn, cifar_resnet*, resnet*)",
}
_TV = "oodcli.backbones.torchvision_models"

for _arch, _default, _dim in (
    ("resnet18", "IMAGENET1K_V1", 512),
    ("resnet34", "IMAGENET1K_V1", 512),
    ("resnet50", "IMAGENET1K_V2", 2048),
):
    register(BackboneSpec(
        name=_arch,
        family="torchvision",
        description=f"torchvision {_arch} ImageNet classifier (penultimate {_dim}-d)",
        layers=_CNN_LAYERS,
        default_layers=("logits", "penultimate"),
        preprocess=IMAGENET,
        builder=Lazy(f"{_TV}:build_resnet", _arch),
        default_weights=_default,
    ))

register(BackboneSpec(
    name="resnet18-tiny",
    family="torchvision",
    description="random-init torchvision resnet18, 10 classes, 32x32 input (tests and offline demos)",
    layers=_CNN_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=TV_TINY,
    builder=Lazy(f"{_TV}:build_resnet18_tiny"),
    default_weights="random",
))

register(BackboneSpec(
    name="vit_b_16",
    family="torchvision",
    description="torchvision ViT-B/16 ImageNet classifier (penultimate 768-d class token)",
    layers=_VIT_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=IMAGENET,
    builder=Lazy(f"{_TV}:build_vit_b_16"),
    default_weights="IMAGENET1K_V1",
))

register(BackboneSpec(
    name="vit-tiny",
    family="torchvision",
    description="random-init 2-layer torchvision ViT, 10 classes, 32x32 input (tests and offline demos)",
    layers=_VIT_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=TV_TINY,
    builder=Lazy(f"{_TV}:build_vit_tiny"),
    default_weights="random",
))

# ---- CIFAR ResNets (oodcli.backbones.cifar_resnet) ---------------------------------------

for _arch in ("cifar_resnet18", "cifar_resnet34"):
    register(BackboneSpec(
        name=_arch,
        family="cifar_resnet",
        description=f"CIFAR {_arch.split('_')[1]} (OpenOOD layout); needs --weights PATH to a state_dict",
        layers=_CNN_LAYERS,
        default_layers=("logits", "penultimate"),
        preprocess=CIFAR,  # CIFAR-10's statistics; a benchmark with its own (cifar100) replaces them
        builder=Lazy("oodcli.backbones.cifar_resnet:build", _arch),
        needs_weights_file=True,
        follows_data=True,
    ))

register(BackboneSpec(
    name="cifar_resnet18-tiny",
    family="cifar_resnet",
    description="random-init cifar_resnet18, 10 classes (tests and offline demos)",
    layers=_CNN_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=CIFAR,
    builder=Lazy("oodcli.backbones.cifar_resnet:build", "cifar_resnet18"),
    default_weights="random",
    follows_data=True,
))

# ---- DINOv2 (oodcli.backbones.dinov2) -------------------------------------------------------

_DINO_LAYERS = ("cls", "patch_mean", "penultimate", "patch_tokens")

for _name in ("dinov2-small", "dinov2-base", "dinov2-large"):
    register(BackboneSpec(
        name=_name,
        family="dinov2",
        description=f"DINOv2 {_name.split('-')[1]} ViT/14 features (no classifier: no logits)",
        layers=_DINO_LAYERS,
        default_layers=("cls", "patch_mean"),
        preprocess=DINO,
        builder=Lazy("oodcli.backbones.dinov2:build", _name, DINO.crop),
        default_weights=f"facebook/{_name}",
    ))

register(BackboneSpec(
    name="dinov2-tiny",
    family="dinov2",
    description="random-init 2-layer DINOv2, 32x32 input (tests and offline demos)",
    layers=_DINO_LAYERS,
    default_layers=("cls", "patch_mean"),
    preprocess=DINO_TINY,
    builder=Lazy("oodcli.backbones.dinov2:build", "dinov2-tiny", DINO_TINY.crop),
    default_weights="random",
))

# ---- CLIP (oodcli.backbones.clip) ---------------------------------------------------------

_CLIP_LAYERS = ("image_embeds", "patch_tokens", "patch_values", "penultimate")



def clip_activation(arch: str, weights: str | None) -> str:
    """The activation a CLIP network runs: "quick_gelu" for a ``-quickgelu`` architecture, for
    OpenAI's weights (the ``openai`` tag, or a file in OpenAI's format: see
    ``openai_checkpoint``), else "gelu" (other open_clip tags that were trained with QuickGELU
    are set by open_clip's own table when the network is built). No torch is imported."""
    if arch.endswith("-quickgelu") or weights == "openai":
        return "quick_gelu"
    if weights not in (None, "random") and Path(weights).is_file() and openai_checkpoint(weights):
        return "quick_gelu"
    return "gelu"


def openai_checkpoint(path: str | Path) -> bool:
    """Whether a weights file is in OpenAI's CLIP format, which was trained with QuickGELU: a
    TorchScript archive (what OpenAI distributes, and what ``open_clip.load_openai_model``
    loads), or a state_dict saved from one, which keeps its ``input_resolution``,
    ``context_length`` and ``vocab_size`` entries (open_clip's own state_dicts do not have
    them). Read from the archive's listing and its pickle, without torch or running its code."""
    import pickle
    import zipfile

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                import struct

                (size,) = struct.unpack("<Q", f.read(8))
                keys = set(json.loads(f.read(size)))
        except Exception:
            return False
        return {"input_resolution", "context_length", "vocab_size"} <= keys
    if not zipfile.is_zipfile(path):
        return False
    if torchscript_archive(path):
        return True
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        data = next((n for n in names if n.endswith("/data.pkl")), None)
        if data is None:
            return False

        class Keys(pickle.Unpickler):  # builds nothing: tensors become None, classes a stub
            def find_class(self, module, name):
                if name in ("OrderedDict",) and module == "collections":
                    import collections

                    return collections.OrderedDict
                return lambda *a, **k: None

            def persistent_load(self, pid):
                return None

        try:
            state = Keys(z.open(data)).load()
        except Exception:
            return False
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    keys = {str(k).removeprefix("module.") for k in state} if isinstance(state, dict) else set()
    return {"input_resolution", "context_length", "vocab_size"} <= keys


def torchscript_archive(path: str | Path) -> bool:
    """Whether a file is a TorchScript archive (its zip holds the scripted code and constants)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def adapt_clip(arch: str):
    def adapt(spec: BackboneSpec, weights: str | None) -> BackboneSpec:
        return dataclasses.replace(spec, activation=clip_activation(arch, weights if weights is not None
                                                                     else spec.default_weights))
    return adapt


for _name, _arch in (("clip-vit-b-16", "ViT-B-16"), ("clip-vit-b-16-quickgelu", "ViT-B-16-quickgelu")):
    register(BackboneSpec(
        name=_name,
        family="clip",
        description=f"CLIP ViT-B/16 image encoder (open_clip {_arch}"
                    + (", QuickGELU for any weights" if "quickgelu" in _arch else "")
                    + "); text prototypes for MCM/GL-MCM; no logits",
        layers=_CLIP_LAYERS,
        default_layers=("image_embeds",),
        preprocess=CLIP_224,
        builder=Lazy("oodcli.backbones.clip:build_real", _arch, CLIP_224.crop),
        text_builder=Lazy("oodcli.backbones.clip:text_tower_real", _arch),
        default_weights="openai",
        adapt=adapt_clip(_arch),
    ))

register(BackboneSpec(
    name="clip-tiny",
    family="clip",
    description="random-init 2-layer CLIP, 32x32 input (tests and offline demos)",
    layers=_CLIP_LAYERS,
    default_layers=("image_embeds",),
    preprocess=CLIP_TINY,
    builder=Lazy("oodcli.backbones.clip:build_tiny"),
    text_builder=Lazy("oodcli.backbones.clip:text_tower_tiny"),
    default_weights="random",
    adapt=adapt_clip("tiny"),
))

# ---- the digits CNN (oodcli.backbones.digits_cnn) ------------------------------------------

register(BackboneSpec(
    name="digits_cnn",
    family="digits_cnn",
    description="small CNN for the embedded digits benchmark; needs --weights PATH (.safetensors)",
    layers=_CNN_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=DIGITS,
    builder=Lazy("oodcli.backbones.digits_cnn:build"),
    needs_weights_file=True,
))

register(BackboneSpec(
    name="digits_cnn-tiny",
    family="digits_cnn",
    description="random-init digits_cnn, 6 classes (tests and offline demos)",
    layers=_CNN_LAYERS,
    default_layers=("logits", "penultimate"),
    preprocess=DIGITS,
    builder=Lazy("oodcli.backbones.digits_cnn:build"),
    default_weights="random",
))

# ---- APEX / PALM prototype models (oodcli.backbones.apex) ------------------------------------

APEX_LAYERS = ("embedding", "penultimate")
APEX_FORMAT = "oodcli-prototypes/1"  # the header format of models from train apex|palm


def read_apex_meta(path: str | Path) -> dict:
    """The settings of a model from 'oodcli train apex|palm', read from the file header only."""
    path = Path(path)
    if not path.is_file():
        raise OodError(f"weights file not found: {path}")
    try:
        metadata = safetensors_metadata(path)
    except Exception as exc:
        raise OodError(f"cannot read {path} as safetensors ({type(exc).__name__})") from None
    if metadata.get("format") != APEX_FORMAT:
        raise OodError(f"{path} is not a model written by 'oodcli train apex|palm'")
    return json.loads(metadata["meta"])


def adapt_apex(spec: BackboneSpec, weights: str | None) -> BackboneSpec:
    """The preprocessing the model was trained with (the base network's, with the benchmark's
    normalisation or the store's ``--preprocess``), read from the file's header (no torch)."""
    if weights is None:
        return spec
    meta = read_apex_meta(weights)
    if meta["method"] != spec.name:
        raise UsageError(f"{weights} holds a {meta['method']} model; extract it with --model {meta['method']}")
    recorded = meta.get("base_preprocess")  # what the model was trained on (files from older oodcli: the base's)
    if isinstance(recorded, dict):
        preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    else:
        preprocess = get_spec(meta["base_model"]).preprocess
    return dataclasses.replace(spec, preprocess=preprocess)


for _method, _what in (("apex", "APM (adaptive K per class)"), ("palm", "PALM (fixed K)")):
    register(BackboneSpec(
        name=_method,
        family="apex",
        description=f"{_what} model from 'oodcli train {_method}'; needs --weights FILE.safetensors",
        layers=APEX_LAYERS,
        default_layers=APEX_LAYERS,
        preprocess=Preprocess(resize=32, crop=32),  # placeholder: the base network's, per --weights
        builder=Lazy("oodcli.backbones.apex:build", _method),
        needs_weights_file=True,
        adapt=adapt_apex,
    ))
