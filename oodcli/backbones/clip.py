"""CLIP image encoders via open_clip, for zero-shot OOD methods (MCM, GL-MCM).

CLIP has no fixed classifier: ``head()`` is None; class prototypes come from text,
so the backbone also exposes ``encode_text``, ``tokenizer`` and ``logit_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodcli.backbones.modules import Backbone, load_state_dict_into, read_state_dict
from oodcli.backbones.registry import CLIP_224  # noqa: F401  (the specs are declared there)
from oodcli.backbones.registry import CLIP_TINY as TINY
from oodcli.errors import OodError, UsageError

TINY_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)


class ClipBackbone(Backbone):
    def __init__(self, model, tokenizer, crop: int):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        visual = model.visual
        dim = visual.proj.shape[1]
        grid = crop // visual.patch_size[0]
        self.layer_shapes = {
            "image_embeds": (dim,),  # encode_image, L2-normalised
            "patch_tokens": (grid * grid, dim),  # ln_post + proj per patch, L2-normalised (GL-MCM)
            "penultimate": (dim,),  # encode_image before normalisation
        }
        self.eval()

    @property
    def logit_scale(self) -> float:
        """The similarity multiplier exp(learned log-scale), 100 for OpenAI CLIP."""
        return float(self.model.logit_scale.detach().exp())

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [len(texts), D], e.g. class prompts."""
        device = self.model.logit_scale.device
        return self.model.encode_text(self.tokenizer(list(texts)).to(device), normalize=True).float()

    def forward_layers(self, x, layers):
        layers = self.check_layers(layers)
        visual = self.model.visual
        if "patch_tokens" in layers and getattr(visual, "attn_pool", None) is not None:
            raise UsageError("patch_tokens is not available for CLIP models with attentional pooling")
        previous = visual.output_tokens
        visual.output_tokens = True  # forward then returns (pooled, tokens)
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = previous
        out = {"penultimate": pooled, "image_embeds": F.normalize(pooled, dim=-1)}
        if "patch_tokens" in layers:
            # _pool hands back tokens already through ln_post unless the LN runs after pooling
            if getattr(visual, "final_ln_after_pool", False):
                tokens = visual.ln_post(tokens)
            out["patch_tokens"] = F.normalize(tokens @ visual.proj, dim=-1)
        return {name: out[name].float() for name in layers}


def build_real(arch: str, crop: int, weights: str | None) -> Backbone:
    import open_clip

    pretrained = None if weights in (None, "random") else weights
    if pretrained is None:
        torch.manual_seed(0)
    # OpenAI's weights were trained with QuickGELU; the plain config would silently use GELU
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu"))
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except (OSError, RuntimeError, ValueError) as e:
        raise OodError(
            f"cannot load CLIP {arch} weights '{weights}': {str(e).splitlines()[0]}; "
            "use an open_clip pretrained tag (needs internet once) or a local checkpoint path"
        ) from None
    return ClipBackbone(model, open_clip.get_tokenizer(arch), crop)


def build_tiny(weights: str | None) -> Backbone:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    if weights not in (None, "random"):
        load_state_dict_into(model, read_state_dict(weights), weights)
    return ClipBackbone(model, open_clip.get_tokenizer("ViT-B-16"), TINY.crop)
