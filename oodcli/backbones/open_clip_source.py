"""The torch side of ``--model open_clip:...`` (``oodcli.backbones.sources``): the model built through
open_clip's own ``create_model``, its image encoder as a ``Backbone`` with the layers of the built-in
``clip-*`` models, and its text tower alone for the prompt methods.

A ViT image tower with open_clip's standard blocks gives all four layers (``ClipBackbone``); other
towers (a timm trunk as in SigLIP, a modified ResNet, attentional pooling) give ``image_embeds`` and
``penultimate`` (``encode_image``), and the patch layers are missing with the reason.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from oodcli.backbones.clip import ClipBackbone, TextTower, _check_value_path, _logit_scale, _text_only, read_clip_state
from oodcli.backbones.modules import Backbone, load_state_dict_into
from oodcli.errors import OodError, UsageError

if TYPE_CHECKING:
    from oodcli.backbones.sources import ModelSource


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def make_module(source: ModelSource, kind: str, value) -> nn.Module:
    """The whole open_clip model (``make_module`` in ``adapters`` has seeded torch): a pretrained tag through
    open_clip's own download and loading, else the architecture built by open_clip and a weights file
    (read with ``weights_only``) loaded strictly, or its seeded random initialisation."""
    import open_clip

    d = source.details
    label = f"open_clip:{source.name}"
    model_name = d["tokenizer"]  # the architecture's name, or local-dir:FOLDER
    logging.disable(logging.WARNING)  # open_clip logs "initialized randomly" for every model it builds bare
    try:
        if kind == "name":
            tag = value.split(":")[1]
            return open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=d["quick_gelu"])
        model = open_clip.create_model(model_name, load_weights=False, pretrained_text=False,
                                       force_quick_gelu=d["quick_gelu"])
    except Exception as exc:  # no internet for a tag, a configuration open_clip cannot build
        raise OodError(f"cannot build {label} ({_one_line(exc)}); a pretrained tag needs the internet once, "
                       "or give a weights FILE") from None
    finally:
        logging.disable(logging.NOTSET)
    if kind == "file":
        load_state_dict_into(model, _state_for(model, read_clip_state(value)), str(value))
    return model


def _state_for(model: nn.Module, state: dict) -> dict:
    """A CLIP state dict in the layout of ``model``: open_clip's CustomTextCLIP keeps the text tower under
    ``text.``, the plain CLIP at the top (the conversion open_clip's own ``load_checkpoint`` makes)."""
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    return state


class _Tokenizer:
    """open_clip's tokenizer of the model, made on first use: a SigLIP's comes from the Hugging Face hub,
    which extracting image features must not need."""

    def __init__(self, source: ModelSource):
        self.name, self.label, self._made = source.details["tokenizer"], f"open_clip:{source.name}", None

    def __call__(self, texts):
        if self._made is None:
            import open_clip

            try:
                self._made = open_clip.get_tokenizer(self.name)
            except Exception as exc:
                raise OodError(f"cannot load the tokenizer of {self.label} ({_one_line(exc)}); a Hugging Face "
                               "tokenizer needs the internet once") from None
        return self._made(texts)


def _tokenizer(source: ModelSource) -> _Tokenizer:
    return _Tokenizer(source)


def image_backbone(source: ModelSource, model: nn.Module, crop: int) -> Backbone:
    """The image encoder of ``model`` with the built-in CLIP layers where its tower has them."""
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if isinstance(visual, VisionTransformer) and visual.proj is not None and visual.attn_pool is None:
        net = ClipBackbone(model, _tokenizer(source), crop)
        net.missing = {}
        try:
            _check_value_path(visual.transformer.resblocks[-1])
        except UsageError as exc:
            del net.layer_shapes["patch_values"]
            net.missing["patch_values"] = str(exc)
        return net
    return PooledClip(model, _tokenizer(source), crop)


class PooledClip(ClipBackbone):
    """An open_clip model whose image tower yields only its pooled embedding (``encode_image``)."""

    def __init__(self, model, tokenizer, crop: int):
        Backbone.__init__(self)
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        with torch.no_grad():
            dim = model.encode_image(torch.zeros(1, 3, crop, crop, dtype=param.dtype, device=param.device)).shape[-1]
        self.layer_shapes = {"image_embeds": (dim,), "penultimate": (dim,)}
        why = f"the image tower ({type(model.visual).__name__}) pools its tokens itself; patch layers need a ViT"
        self.missing = {"patch_tokens": why, "patch_values": why}
        self.eval()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        pooled = self.model.encode_image(x)
        out = {"penultimate": pooled, "image_embeds": F.normalize(pooled, dim=-1)}
        return {name: out[name].float() for name in layers}


def text_tower(source: ModelSource, kind: str, value) -> TextTower:
    """The text tower of the model that made the image features. Random weights: the whole model is
    initialised as extraction did (the text parameters depend on the seeded order of the whole), then its
    image tower dropped. A file or tag: the text transformer alone, built from the configuration and
    loaded with the checkpoint's text entries."""
    import open_clip

    d = source.details
    cfg = copy.deepcopy(d["model_cfg"])
    if "hf_model_name" in cfg["text_cfg"]:
        raise OodError(f"open_clip:{source.name}'s text tower is a Hugging Face model ({cfg['text_cfg']['hf_model_name']}); "
                       "the prompt methods run open_clip's own text transformer: use its image features with other methods")
    tokenizer = _tokenizer(source)
    if kind == "random":
        from oodcli.backbones import adapters

        model = adapters.make_module(source, kind, value)
        scale = float(model.logit_scale.detach().exp())
        text = model.text if hasattr(model, "text") else model
        model.visual = None  # only the text half is kept
        return TextTower(text, tokenizer, scale)
    if kind == "name":
        tag = value.split(":")[1]
        try:
            path = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(d["arch"], tag))
            state = open_clip.factory.load_state_dict(path, weights_only=True)
        except Exception as exc:
            raise OodError(f"cannot load open_clip:{source.name} weights ({_one_line(exc)}); a pretrained tag "
                           "needs the internet once, or give a weights FILE") from None
    else:
        state = read_clip_state(value)
    where = str(value)
    if "positional_embedding" not in state:  # CustomTextCLIP (SigLIP, ...): the tower's entries are under text.
        state = {**{k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")},
                 **{k: v for k, v in state.items() if k == "logit_scale"}}
    text = _text_only(cfg["embed_dim"], cfg["text_cfg"], d["quick_gelu"], state, where)
    return TextTower(text, tokenizer, _logit_scale(state, where))
