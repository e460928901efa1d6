"""CLIP image encoders via open_clip, for zero-shot OOD methods (MCM, GL-MCM).

CLIP has no fixed classifier: ``head()`` is None; class prototypes come from text,
so the backbone also exposes ``encode_text``, ``tokenizer`` and ``logit_scale``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from oodcli.backbones.modules import Backbone, load_state_dict_into, read_state_dict
from oodcli.backbones.registry import CLIP_224  # noqa: F401  (the specs are declared there)
from oodcli.backbones.registry import CLIP_TINY as TINY
from oodcli.backbones.registry import clip_activation, torchscript_archive
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
            "patch_tokens": (grid * grid, dim),  # final-layer tokens, ln_post + proj per patch, L2-normalised
            "patch_values": (grid * grid, dim),  # the last block's value path per patch (what local methods read)
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
        for name in ("patch_tokens", "patch_values"):
            if name in layers and getattr(visual, "attn_pool", None) is not None:
                raise UsageError(f"{name} is not available for CLIP models with attentional pooling")
        block_input = []  # the input of the last residual block, caught on the way through
        hook = None
        if "patch_values" in layers:
            block = visual.transformer.resblocks[-1]
            _check_value_path(block)
            hook = block.register_forward_pre_hook(lambda module, args: block_input.append(args[0]))
        previous = visual.output_tokens
        visual.output_tokens = True  # forward then returns (pooled, tokens)
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = previous
            if hook is not None:
                hook.remove()
        out = {"penultimate": pooled, "image_embeds": F.normalize(pooled, dim=-1)}
        if "patch_tokens" in layers:
            # _pool hands back tokens already through ln_post unless the LN runs after pooling
            if getattr(visual, "final_ln_after_pool", False):
                tokens = visual.ln_post(tokens)
            out["patch_tokens"] = F.normalize(tokens @ visual.proj, dim=-1)
        if "patch_values" in layers:
            h = block_input[-1]
            if not getattr(visual.transformer, "batch_first", True):
                h = h.transpose(0, 1)  # LND -> NLD
            v = value_path(visual.transformer.resblocks[-1], h)[:, h.shape[1] - tokens.shape[1]:]
            out["patch_values"] = F.normalize(visual.ln_post(v) @ visual.proj, dim=-1)
        return {name: out[name].float() for name in layers}


def _check_value_path(block) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or not hasattr(block, "ln_1"):
        raise UsageError("patch_values needs a CLIP ViT whose blocks use standard multi-head attention "
                         "(open_clip's default block); this model's last block is another kind")


def value_path(block, x: torch.Tensor) -> torch.Tensor:
    """The value path of residual block ``block`` on its input ``x`` [N, L, W] (MaskCLIP style).

    The attention's token mixing is skipped: each token goes through the value part of
    the input projection and the output projection on its own,
    ``v = x + ls_1(out_proj(V(ln_1(x))))``, then the block's MLP, ``v + ls_2(mlp(ln_2(v)))``
    (``ls_1``/``ls_2`` are layer scales where the model has them, else identity). This is
    the local feature of GL-MCM, LoCoOp, Local-Prompt and IIM (their ``clip/model.py``).
    """
    attn = block.attn
    width = x.shape[-1]
    if attn.in_proj_weight is not None:  # q, k and v packed in one [3W, W] matrix
        weight = attn.in_proj_weight[2 * width:]
    else:
        weight = attn.v_proj_weight
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
    y = attn.out_proj(F.linear(block.ln_1(x), weight, bias))
    identity = torch.nn.Identity()
    v = x + getattr(block, "ls_1", identity)(y)
    return v + getattr(block, "ls_2", identity)(block.mlp(block.ln_2(v)))


def build_real(arch: str, crop: int, weights: str | None) -> Backbone:
    import open_clip

    pretrained = None if weights in (None, "random") else weights
    if pretrained is None:
        torch.manual_seed(0)
    if pretrained is not None and Path(pretrained).is_file():  # a weights file: its format names the activation
        quick_gelu = clip_activation(arch, pretrained) == "quick_gelu"
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
        load_state_dict_into(model, read_clip_state(pretrained), pretrained)
        return ClipBackbone(model, open_clip.get_tokenizer(arch), crop)
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
    quick_gelu = weights not in (None, "random") and clip_activation("tiny", weights) == "quick_gelu"
    model = open_clip.CLIP(**TINY_CFG, quick_gelu=quick_gelu)
    if weights not in (None, "random"):
        load_state_dict_into(model, read_clip_state(weights), weights)
    return ClipBackbone(model, open_clip.get_tokenizer("ViT-B-16"), TINY.crop)


#: entries of OpenAI's TorchScript state_dict that are settings, not parameters
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_clip_state(path: str) -> dict[str, torch.Tensor]:
    """A CLIP weights file as an open_clip state_dict: a TorchScript archive (OpenAI's format)
    or a state_dict, without OpenAI's setting entries; OpenAI's half-precision tensors are
    cast on loading."""
    if torchscript_archive(path):
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as e:
            raise OodError(f"cannot load TorchScript archive {path}: {str(e).splitlines()[0]}") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        state = read_state_dict(path)
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}


# ---- the text half alone -----------------------------------------------------------------

#: the keys of a CLIP state dict that belong to the text tower (open_clip's names)
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class TextTower(torch.nn.Module):
    """CLIP's text encoder without its image encoder: what prompts and prompt learning run.

    ``text`` is open_clip's ``TextTransformer`` (or a whole CLIP for random weights, whose
    text parameters are defined by the seeded initialisation of the full model). Its
    attention is causal and the embedding is read at the end-of-text token, so every
    forward here cuts the token sequence after the last end token (most of the 77
    positions are padding): several times faster, same result.
    """

    def __init__(self, text, tokenizer, logit_scale: float):
        super().__init__()
        self.text = text.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.logit_scale = float(logit_scale)
        self.pool_type = getattr(text, "pool_type", None) or getattr(text, "text_pool_type", None)
        self.eos_id = getattr(text, "eos_id", None) if hasattr(text, "eos_id") else getattr(text, "text_eos_id", None)

    @property
    def width(self) -> int:
        return int(self.text.positional_embedding.shape[1])

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    @property
    def reads_end_token(self) -> bool:
        return self.pool_type in ("argmax", "eos") and getattr(self.text, "attn_mask", None) is not None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where each sequence's end-of-text token is (the position CLIP reads)."""
        if self.pool_type == "argmax":  # the end token has the largest id
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(tokens)

    def encode_embeddings(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of token embeddings ``x`` [N, L, width] read at ``ends`` [N]."""
        text = self.text
        n = int(ends.max()) + 1
        dtype = text.transformer.get_cast_dtype()
        x = x[:, :n].to(dtype) + text.positional_embedding[:n].to(dtype)
        x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask[:n, :n]))
        x = x[torch.arange(len(x), device=x.device), ends]
        proj = text.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings [len(texts), D] of plain prompts."""
        tokens = self.tokenize(texts)
        if not self.reads_end_token:  # other pooling: open_clip's own forward, no shortcut
            encode = getattr(self.text, "encode_text", None) or self.text
            return F.normalize(encode(tokens).float(), dim=-1)
        return self.encode_embeddings(self.embed_tokens(tokens), self.end_positions(tokens))


def _text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(TEXT_KEYS)}


def _logit_scale(state: dict[str, torch.Tensor], source: str) -> float:
    if "logit_scale" not in state:
        raise OodError(f"checkpoint {source} has no logit_scale; it is not a CLIP checkpoint")
    return float(state["logit_scale"].float().exp().reshape(-1)[0])


def _text_only(embed_dim: int, text_cfg: dict, quick_gelu: bool, state: dict, source: str):
    from open_clip.model import CLIPTextCfg, _build_text_tower

    text = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu)
    load_state_dict_into(text, _text_state(state), source)
    return text


def text_tower_tiny(weights: str | None) -> TextTower:
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    if weights in (None, "random"):
        model = build_tiny("random").model
        return TextTower(model, tokenizer, float(model.logit_scale.detach().exp()))
    state = read_clip_state(weights)
    quick_gelu = clip_activation("tiny", weights) == "quick_gelu"
    text = _text_only(TINY_CFG["embed_dim"], TINY_CFG["text_cfg"], quick_gelu, state, weights)
    return TextTower(text, tokenizer, _logit_scale(state, weights))


def text_tower_real(arch: str, weights: str | None) -> TextTower:
    """The text tower of open_clip ``arch`` with a pretrained tag (downloaded once) or a local checkpoint."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(arch)
    if weights in (None, "random"):
        model = build_real(arch, 224, "random").model
        return TextTower(model, tokenizer, float(model.logit_scale.detach().exp()))
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise OodError(f"open_clip has no model configuration '{arch}'")
    if Path(weights).exists():
        state, quick_gelu = read_clip_state(weights), clip_activation(arch, weights) == "quick_gelu"
    else:
        pretrained = open_clip.get_pretrained_cfg(arch, weights)
        if not pretrained:
            raise OodError(f"open_clip has no pretrained weights '{weights}' for {arch}; use a tag it lists or a local checkpoint path")
        try:
            path = open_clip.pretrained.download_pretrained(pretrained)
            state = open_clip.factory.load_state_dict(path, weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise OodError(
                f"cannot load CLIP {arch} weights '{weights}': {str(e).splitlines()[0]}; "
                "an open_clip pretrained tag needs internet once, or pass a local checkpoint path"
            ) from None
        quick_gelu = bool(pretrained.get("quick_gelu")) or bool(cfg.get("quick_gelu", False))
    text = _text_only(cfg["embed_dim"], cfg["text_cfg"], quick_gelu, state, str(weights))
    return TextTower(text, tokenizer, _logit_scale(state, str(weights)))
