"""Prompt learning on cached CLIP features: CoOp, LoCoOp and NegPrompt.

CLIP's image encoder is frozen in all three methods, so its outputs (``image_embeds``,
and for LoCoOp the patch features, ``patch_values`` by default) are read from the store
and only the text tower runs while training: an epoch costs the text tower's forward and
backward over the class prompts, nothing more. The image encoder is never built here
(``TextTower`` is the text half alone).

- **CoOp** (Zhou et al., IJCV 2022): prompts ``[w_1 .. w_n, CLASS, .]`` with n shared
  learnable context vectors; cross-entropy over cos(image, text) / tau (NegPrompt eq. 1-2).
  Defaults follow CoOp's ImageNet setting: n = 16, random N(0, 0.02) initialisation
  (``ctx_init`` starts from a phrase such as "a photo of a" instead), SGD lr 0.002
  momentum 0.9 weight decay 5e-4, batch 32, cosine schedule after one warm-up epoch at
  lr 1e-5, 50 epochs. tau is the CLIP's own learned temperature (1 / logit scale: 0.01
  for OpenAI's ViT-B/16).
- **LoCoOp** (Miyai et al., NeurIPS 2023): CoOp's loss plus lambda times the negative
  entropy of the class softmax of the ID-irrelevant patches: a patch is irrelevant when
  the image's label is not among its top-K classes. lambda = 0.25 and K = 200 are the
  published ImageNet values; K must stay below the number of training classes. The patches
  are the last ViT block's value-path tokens (``patch_values``), as LoCoOp's code reads
  them; ``--local-layer patch_tokens`` trains on the final-layer tokens instead.
- **NegPrompt** (Li et al., CVPR 2024, paper sec. 3.2): the positive prompts of a CoOp
  (or LoCoOp) file are frozen (two stages); p shared negative contexts, each put before
  every class name, are learned with L = L_NIS + beta L_NPD + gamma L_NND (eq. 4-7),
  beta = 0.1, gamma = 0.05, p = 2, 10 epochs, the same optimiser as CoOp (the paper
  gives no other). L_NIS is by default the uniform cross-entropy over the softmax of all
  positive and negative logits (the authors' OE branch); ``nis_softmax='negatives'`` is
  eq. 4 as printed (``negprompt_losses`` says why the default is the other). The paper
  does not say how negative contexts start; as in the authors' code they start as the
  trained positive context plus U(-1e-5, 1e-5) noise, "prompts that resemble the
  positive prompts ... but with a negative class semantic" (sec. 3.2); distinct noise
  keeps L_NND's pairwise similarities from starting at exactly 1.

A prompt file is one safetensors file: ``ctx`` [1, n, width] (the positive context),
``neg_ctx`` [p, n, width] for NegPrompt, and the settings, the class names, the few-shot
row ids and the training history as JSON metadata. Class names are not baked in: the
same file turns any label set into text features (the open-vocabulary setting).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.backbones import clip_text
from oodcli.errors import OodError, UsageError
from oodcli.fewshot import class_range, few_shot_rows, rows_for_training
from oodcli.outputs import atomic_write, check_output_file
from oodcli.scorers.clip_zeroshot import LOCAL_LAYERS

METHODS = ("coop", "locoop", "negprompt")
LOCAL_METHODS = ("locoop", "iim")  # the prompt files trained on patch features
META_KEY = "oodcli_prompts"
FORMAT = 1
PLACEHOLDER = "X"  # one BPE token per context slot, as CoOp tokenises its prompts
ENCODE_CLASSES = 256  # class prompts per text-tower batch when no gradient is needed


# ---- the learner ---------------------------------------------------------------------------


class PromptLearner(torch.nn.Module):
    """Learned context vectors before each class name, through CLIP's frozen text tower.

    ``ctx`` is [P, n, width]: P prompt sets (1 for CoOp, p negative prompts for NegPrompt),
    each shared by every class. ``forward(names)`` gives the L2-normalised text features
    [P, len(names), D] of the prompts ``[SOS, ctx_1 .. ctx_n, name tokens, ., EOS]``.
    Only ``ctx`` is a parameter; the tower's weights stay frozen.

    ``fast`` (the default where the tower allows it) encodes through ``clip_text``: the
    start token and a shared context run once per prompt set and every class's suffix
    attends to their keys and values, in buckets of similar length; the same features as
    the plain path (``fast=False``, one full sequence per class, the reference). Steps with
    gradients run under bfloat16 autocast on CUDA (``precision='auto'``; ``'fp32'`` never),
    the context itself staying float32; features without gradients are always float32.
    """

    def __init__(self, tower, ctx: torch.Tensor, fast: bool = True, precision: str = "auto"):
        super().__init__()
        if not tower.reads_end_token:  # e.g. SigLIP: no causal mask, pooled elsewhere than the end token
            raise OodError(
                f"prompt learning needs a causal CLIP text tower read at its end token; this one pools by "
                f"'{tower.pool_type}'{'' if getattr(tower.text, 'attn_mask', None) is not None else ' without a causal mask'}; "
                "use an OpenAI / LAION-style CLIP (e.g. open_clip:ViT-B-16@openai) or its zero-shot methods"
            )
        self.tower = tower
        tower.requires_grad_(False)
        self.ctx = torch.nn.Parameter(ctx.detach().clone().float().to(tower.device))
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.fast = fast and clip_text.supports_prefix(tower)
        amp = clip_text.amp_dtype(self.ctx.device, precision)
        self.amp = amp if self.fast else None

    @property
    def precision(self) -> str:
        """What a training step runs in, as a prompt file records it."""
        return "fp32" if self.amp is None else f"{str(self.amp).removeprefix('torch.')} autocast"

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[1]

    def name_tokens(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [C, L, width] of the placeholder prompts, end positions [C]); kept per label set."""
        key = tuple(names)
        if key not in self._tokens:
            prompts = [" ".join([PLACEHOLDER] * self.n_ctx) + f" {name}." for name in names]
            tokens = self.tower.tokenize(prompts)
            slot = self.tower.tokenize([PLACEHOLDER])[0, 1]
            if not bool((tokens[:, 1 : 1 + self.n_ctx] == slot).all()):
                raise OodError("the tokenizer does not give one token per context slot; this CLIP cannot learn prompts here")
            ends = self.tower.end_positions(tokens)
            if int(ends.max()) >= tokens.shape[1] - 1:
                raise UsageError(f"a class name does not fit CLIP's {tokens.shape[1]} tokens after {self.n_ctx} context vectors")
            with torch.no_grad():
                emb = self.tower.embed_tokens(tokens[:, : int(ends.max()) + 1])
            self._tokens[key] = (emb, ends)
        return self._tokens[key]

    def _prefixed(self, prefix: torch.Tensor, suffix: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.amp is None or not torch.is_grad_enabled():
            return clip_text.encode_prefixed(self.tower, prefix, suffix, lengths)
        with torch.autocast(prefix.device.type, dtype=self.amp):
            return clip_text.encode_prefixed(self.tower, prefix, suffix, lengths)

    def forward(self, names: list[str], ctx: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.ctx if ctx is None else ctx
        emb, ends = self.name_tokens(names)
        p, n, width = ctx.shape
        c = len(names)
        if self.fast:  # [SOS, ctx] once per prompt set; the names' tokens after it, shared by the sets
            prefix = torch.cat([emb[:1, :1].expand(p, 1, width), ctx.to(emb.dtype)], dim=1)
            return self._prefixed(prefix, emb[None, :, 1 + n :], ends - n)
        x = torch.cat(
            [
                emb[None, :, :1].expand(p, c, 1, width),
                ctx[:, None].expand(p, c, n, width).to(emb.dtype),
                emb[None, :, 1 + n :].expand(p, c, emb.shape[1] - 1 - n, width),
            ],
            dim=2,
        )
        return self.tower.encode_embeddings(x.flatten(0, 1), ends.repeat(p)).view(p, c, -1)

    @torch.no_grad()
    def features(self, names: list[str], ctx: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` without gradients, in class batches (any label-set size in bounded memory)."""
        parts = [self.forward(names[i : i + ENCODE_CLASSES], ctx) for i in range(0, len(names), ENCODE_CLASSES)]
        return torch.cat(parts, dim=1)

    def class_specific(self, names: list[str], ctx: torch.Tensor) -> torch.Tensor:
        """Class-specific contexts (CoOp's CSC): ``ctx`` [C, n, width], row c put before ``names[c]`` alone;
        the L2-normalised features [C, D]."""
        if ctx.shape[0] != len(names):
            raise OodError(f"{ctx.shape[0]} class-specific contexts for {len(names)} class names")
        emb, ends = self.name_tokens(names)
        n = ctx.shape[1]
        if self.fast:  # only the start token is shared: each class's context is its own
            suffix = torch.cat([ctx.to(emb.dtype), emb[:, 1 + n :]], dim=1)
            return self._prefixed(emb[:1, :1], suffix[None], ends)[0]
        x = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + n :]], dim=1)
        return self.tower.encode_embeddings(x, ends)

    @torch.no_grad()
    def class_specific_features(self, names: list[str], ctx: torch.Tensor) -> torch.Tensor:
        """``class_specific`` without gradients, in class batches."""
        parts = [self.class_specific(names[i : i + ENCODE_CLASSES], ctx[i : i + ENCODE_CLASSES])
                 for i in range(0, len(names), ENCODE_CLASSES)]
        return torch.cat(parts)


NEG_INIT_NOISE = 1e-5  # half-width of the uniform noise added to the positive context (the authors' value)


def negative_context_start(pos_ctx: torch.Tensor, neg_prompts: int, generator: torch.Generator) -> torch.Tensor:
    """[p, n, width]: NegPrompt's negative contexts at the start, the positive context plus U(-1e-5, 1e-5)
    per coordinate, as the authors start them (the paper says nothing); distinct noise breaks the
    symmetry that L_NND needs broken while each negative starts where the positive prompt is."""
    noise = (torch.rand(neg_prompts, *pos_ctx.shape[1:], generator=generator) * 2 - 1) * NEG_INIT_NOISE
    return pos_ctx.float().expand(neg_prompts, -1, -1) + noise


def initial_context(tower, n_ctx: int, ctx_init: str | None, generator: torch.Generator) -> torch.Tensor:
    """[1, n, width]: the token embeddings of ``ctx_init`` ("a photo of a"), or N(0, 0.02)."""
    if ctx_init:
        tokens = tower.tokenize([ctx_init])
        n = int(tower.end_positions(tokens)[0]) - 1
        with torch.no_grad():
            return tower.embed_tokens(tokens)[:, 1 : 1 + n].float().cpu()
    if n_ctx < 1:
        raise UsageError(f"--n-ctx must be at least 1, not {n_ctx}")
    return torch.randn(1, n_ctx, tower.width, generator=generator) * 0.02


# ---- the losses ----------------------------------------------------------------------------


def coop_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """NegPrompt eq. 1-2: cross-entropy of softmax_c(cos(image, t_c) / tau) (inputs L2-normalised)."""
    return F.cross_entropy(image @ text.T / tau, labels)


def irrelevant_patches(local_logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """LoCoOp's rank rule: [B, H] True where the image's label is not among the patch's top-K classes."""
    top = local_logits.topk(top_k, dim=-1).indices  # [B, H, K]
    return ~(top == labels[:, None, None]).any(dim=-1)


def locoop_entropy_term(local_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-mean entropy of softmax_c over the selected patches (minimising it maximises their entropy)."""
    if not bool(mask.any()):
        return local_logits.sum() * 0.0
    logp = F.log_softmax(local_logits[mask], dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return -entropy.mean()


NIS_SOFTMAX = ("all", "negatives")


def negprompt_losses(image: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                     nis_softmax: str = "all") -> tuple[torch.Tensor, ...]:
    """(L_NIS, L_NPD, L_NND) of NegPrompt eq. 4-6.

    ``image`` [B, D], ``pos`` [k, D] (frozen positive features), ``neg`` [p, k, D]; all
    L2-normalised. L_NIS is the cross-entropy between the uniform distribution and a
    softmax of similarities / tau: with ``nis_softmax='all'`` (the default) over all k
    positive and p*k negative ones, as the authors' OE branch computes it; with
    ``'negatives'`` over the p*k negative ones alone, eq. 4 as printed
    (F(x) = Softmax(S^{f,neg})). L_NPD is the negated mean cosine of each negative feature
    with its class's positive one; L_NND the mean cosine between the different negative
    features of the same class (0 when p = 1).

    Why 'all' is the default: eq. 4 read literally is unchanged when every negative logit
    shifts by the same amount (its gradients sum to zero over the negatives), so it cannot
    move the negative prompts away from the ID images as sec. 3.2.1 says it does; eq. 5's
    sign (negatives pulled towards the positives) matches only the OE branch; and Table 5's
    one-stage row, below zero-shot accuracy, needs a term that flattens the positive
    softmax, which only the all-logit target does. The positives are frozen in stage two,
    so only the negatives learn from it here.
    """
    if nis_softmax not in NIS_SOFTMAX:
        raise UsageError(f"unknown --nis-softmax '{nis_softmax}'; choose from {', '.join(NIS_SOFTMAX)}")
    p, k, _ = neg.shape
    logits = image @ neg.reshape(p * k, -1).T / tau
    if nis_softmax == "all":
        logits = torch.cat([image @ pos.T / tau, logits], dim=1)
    logp = F.log_softmax(logits, dim=1)
    nis = -logp.mean(dim=1).mean()
    npd = -(neg * pos[None]).sum(dim=-1).mean()
    if p < 2:
        return nis, npd, neg.sum() * 0.0
    sims = torch.einsum("ikd,lkd->kil", neg, neg)  # [k, p, p]
    off = ~torch.eye(p, dtype=torch.bool, device=neg.device)
    nnd = sims[:, off].sum() / (k * p * (p - 1))
    return nis, npd, nnd


# ---- the few-shot training set -------------------------------------------------------------


def class_subset(n_classes: int, train_classes: str | None, fraction: float | None) -> list[int]:
    """The training classes: ``FIRST-LAST`` (inclusive), the first ``fraction`` of them, or all."""
    return class_range(n_classes, train_classes, fraction, option="--train-classes")


def read_rows(store, node: str, rows: np.ndarray, split: str) -> np.ndarray:
    """The given rows of an array, reading only the chunks that hold them."""
    step = store.chunk_rows(node)
    out = []
    for chunk in np.unique(rows // step):
        start = int(chunk) * step
        block = store.read(node, slice(start, min(start + step, store.shape(node)[0])))
        out.append(block[rows[(rows >= start) & (rows < start + step)] - start])
    values = np.concatenate(out) if out else np.zeros((0, *store.shape(node)[1:]), store.dtype(node))
    if not np.isfinite(values).all():
        raise OodError(f"split '{split}' has NaN or inf in {node}; check the input data or re-extract with --dtype float32")
    return values


# ---- prompt files --------------------------------------------------------------------------


def file_hash(path: str | Path) -> str:
    """The prompt file's identity: the key of its cached text features."""
    from oodcli.backbones.spec import sha256_file

    return sha256_file(Path(path))


@dataclass
class PromptFile:
    """A trained prompt file, read and checked."""

    path: str
    sha256: str
    meta: dict
    ctx: torch.Tensor  # [1, n, width]
    neg_ctx: torch.Tensor | None  # [p, n, width] (NegPrompt)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # any other tensors (IIM's ood_ctx)

    @property
    def method(self) -> str:
        return self.meta["method"]


def read_trained_file(path: str | Path, what: str = "prompt file", make: str = "oodcli train coop") -> tuple[Path, dict, dict]:
    """(path, metadata, tensors) of a file written by ``write_prompt_file``, or one line saying why it is not one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise OodError(f"{what} {path} not found; make one with '{make}'")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
        meta = json.loads(raw) if raw else None
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise OodError(f"{what} {path} is corrupt or not a safetensors file ({type(e).__name__}); train it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OodError(f"{path} is not an oodcli {what} (no '{META_KEY}' metadata of format {FORMAT})")
    return path, meta, tensors


def read_prompt_file(path: str | Path) -> PromptFile:
    """Load a prompt file, or one line saying why it is not one."""
    path, meta, tensors = read_trained_file(path)
    if "ctx" not in tensors:
        raise OodError(f"{path} is not an oodcli prompt file (no context tensor 'ctx')")
    ctx, neg = tensors["ctx"].float(), tensors.get("neg_ctx")
    # one shared context, or (IIM's class-specific contexts) one per trained class
    contexts = len(meta.get("class_names", [])) if meta.get("csc") else 1
    if ctx.ndim != 3 or ctx.shape[0] != contexts or (neg is not None and (neg.ndim != 3 or neg.shape[1:] != ctx.shape[1:])):
        raise OodError(f"prompt file {path} has malformed context tensors; train it again")
    if meta.get("method") == "negprompt" and neg is None:
        raise OodError(f"prompt file {path} says NegPrompt but holds no negative prompts; train it again")
    extra = {k: v.float() for k, v in tensors.items() if k not in ("ctx", "neg_ctx")}
    return PromptFile(str(path), file_hash(path), meta, ctx, None if neg is None else neg.float(), extra)


def check_same_clip(meta: dict, what: str, source, retrain: str) -> None:
    """Refuse a trained file (``what``: 'prompt file PATH', ...) made on another CLIP than the features'."""
    if meta.get("weights") != source.identity or meta.get("backbone") != source.backbone:
        raise OodError(
            f"{what} was trained on {meta.get('backbone')} weights '{meta.get('weights')}', "
            f"but these features come from {source.backbone} '{source.identity}'; {retrain}"
        )


def check_prompts_fit(prompts: PromptFile, source, names: list[str]) -> None:
    """Refuse prompts learned on another CLIP, or on classes that are not in ``names``."""
    meta = prompts.meta
    check_same_clip(meta, f"prompt file {prompts.path}", source, "train prompts on this store")
    foreign = [n for n in meta.get("class_names", []) if n not in set(names)]
    if foreign:
        more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise OodError(
            f"prompt file {prompts.path} was trained on classes that this label set lacks "
            f"({', '.join(foreign[:3])}{more}); use prompts trained for these classes or pass METHOD.labels=FILE"
        )


def check_local_layer_name(local_layer: str) -> None:
    if local_layer not in LOCAL_LAYERS:
        raise UsageError(f"--local-layer must be one of {', '.join(LOCAL_LAYERS)}, not '{local_layer}'")


def check_local_layer(prompts: PromptFile, local_layer: str, option: str) -> None:
    """Refuse scoring prompts on other patch features than the ones they were trained on.

    LoCoOp and IIM files record the layer as ``local_layer``; a file without the record
    predates ``patch_values`` and was trained on ``patch_tokens``. CoOp and NegPrompt
    training reads no patch features, so their files fit either layer.
    """
    if prompts.method not in LOCAL_METHODS:
        return
    trained = prompts.meta.get("local_layer", "patch_tokens")
    if trained != local_layer:
        raise OodError(
            f"prompt file {prompts.path} was trained on the patch features {trained}, not {local_layer}; "
            f"score it with -p {option}={trained}, or train it again with --local-layer {local_layer}"
        )


def write_prompt_file(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={META_KEY: json.dumps({"format": FORMAT, **meta})}))


# ---- training ------------------------------------------------------------------------------


@dataclass
class PromptTrainResult:
    path: str
    method: str
    classes: int  # training classes
    shots: int
    epochs: int
    loss: float  # last epoch's mean loss
    accuracy_before: float  # few-shot accuracy of the starting prompts
    accuracy: float  # few-shot accuracy after training
    test_accuracy: float | None  # on the ID test split, over every class of the label set
    seconds: float
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Data:
    """What a prompt trainer reads: the store's CLIP, the label set and the few-shot features."""

    source: object
    names: list[str]  # the whole label set
    classes: list[int]  # training classes (contiguous)
    rows: np.ndarray  # train split rows used
    ids: np.ndarray  # their positions in the split's source data set (the same rows on a few-shot split)
    image: torch.Tensor  # [N, D]
    labels: torch.Tensor  # [N], relabelled to 0..len(classes)-1
    patches: torch.Tensor | None  # [N, H, D] float16 (LoCoOp)
    split_fingerprint: str | None
    store_path: Path


def _load_data(store_path, backbone, split, classes_text, fraction, shots, seed, labels_file, patches,
               method: str = "LoCoOp", local_layer: str = LOCAL_LAYERS[0]) -> _Data:
    from oodcli import text
    from oodcli.scorers.base import check_features
    from oodcli.scoring import default_backbone, extract_command
    from oodcli.store import features_node, list_splits, open_store, split_node

    if shots < 1:
        raise UsageError(f"--shots must be at least 1, not {shots}")
    if patches:
        check_local_layer_name(local_layer)
    with open_store(store_path) as store:
        backbone = backbone or default_backbone(store)
        source = text.clip_source(store, backbone)
        layers = ("image_embeds", local_layer) if patches else ("image_embeds",)
        if split not in list_splits(store):
            raise OodError(f"store {store.path} has no split '{split}'; extract the ID train split first")
        node = features_node(split, backbone)
        if store.exists(node) and not store.is_array(f"{node}/image_embeds"):
            raise OodError(
                f"split '{split}' has no '{backbone}' image_embeds; make them with "
                f"'oodcli extract --model {backbone} --layers {','.join(layers)} --split {split} --store {store.path}'"
            )
        if patches and store.exists(node) and not store.is_array(f"{node}/{local_layer}"):
            other = [k for k in LOCAL_LAYERS if k != local_layer and store.is_array(f"{node}/{k}")]
            raise OodError(
                f"{method} reads the patch features {local_layer} and split '{split}' has no '{backbone}' {local_layer}; "
                f"re-extract with '{extract_command(store, backbone, split, layers)} --overwrite'"
                + (f", or train on its {other[0]} with --local-layer {other[0]}" if other else "")
            )
        check_features(store, backbone, split, layers)
        _, names = text.label_set(store, labels_file)
        all_labels = store.read(f"{split_node(split)}/labels")
        if (all_labels < 0).any():
            raise OodError(f"split '{split}' holds OOD rows (label -1); prompts learn from ID training data only")
        if all_labels.size and int(all_labels.max()) >= len(names):
            raise OodError(f"split '{split}' has labels beyond the {len(names)} class names of the label set")
        held = store.node_attrs(split_node(split)).get("few_shot")  # a split made by 'extract --shots'
        if held is not None and not classes_text and fraction is None:
            classes = list(range(held["classes"][0], held["classes"][1] + 1))  # the classes it holds
        else:
            classes = class_subset(len(names), classes_text, fraction)
        ids = store.read(f"{split_node(split)}/ids")
        rows = rows_for_training(split, all_labels, ids, held, classes, shots, seed, names)
        image = read_rows(store, f"{node}/image_embeds", rows, split).astype(np.float32)
        tokens = read_rows(store, f"{node}/{local_layer}", rows, split).astype(np.float16) if patches else None
        fingerprint = store.node_attrs(node).get("fingerprint")
    return _Data(
        source, names, classes, rows, ids[rows],
        F.normalize(torch.from_numpy(image), dim=-1),
        torch.from_numpy(all_labels[rows].astype(np.int64) - classes[0]),
        None if tokens is None else torch.from_numpy(tokens),
        fingerprint, Path(store_path),
    )


def data_meta(data: "_Data", split: str) -> dict:
    """What a prompt file records of the data it learned from (its CLIP, classes and few shots)."""
    return {
        "backbone": data.source.backbone,
        "weights": data.source.identity,
        "class_names": [data.names[c] for c in data.classes],
        "classes": data.classes,
        "split": split,
        "split_fingerprint": data.split_fingerprint,
        "shot_rows": data.ids.tolist(),  # rows of the source data set: the same from a whole or a few-shot split
    }


def _schedule(optimizer, epochs: int, warmup_lr: float = 1e-5):
    """CoOp's schedule: one constant warm-up epoch at ``warmup_lr``, then cosine decay per epoch."""
    base = optimizer.param_groups[0]["lr"]

    def factor(epoch: int) -> float:
        if epochs > 1 and epoch == 0:
            return warmup_lr / base if base > 0 else 1.0
        done = epoch - (1 if epochs > 1 else 0)
        span = max(1, epochs - (1 if epochs > 1 else 0))
        return 0.5 * (1 + math.cos(math.pi * done / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _accuracy(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((image @ text.T).argmax(dim=1) == labels).float().mean()) if len(labels) else 0.0


def _test_accuracy(learner: PromptLearner, data: _Data, device) -> float | None:
    """Top-1 accuracy on the store's ID ``test`` split over the whole label set, if it has one."""
    from oodcli.store import features_node, list_splits, open_store, split_node

    with open_store(data.store_path) as store:
        node = features_node("test", data.source.backbone)
        if "test" not in list_splits(store) or not store.is_array(f"{node}/image_embeds") or not store.node_attrs(node).get("complete"):
            return None
        image, labels = store.read(f"{node}/image_embeds").astype(np.float32), store.read(f"{split_node('test')}/labels")
    keep = labels >= 0
    if not keep.any():
        return None
    text = learner.features(data.names)[0]
    pred = (F.normalize(torch.from_numpy(image[keep]).to(device), dim=-1) @ text.T).argmax(dim=1).cpu().numpy()
    return float((pred == labels[keep]).mean())


def fit_epochs(step_loss, params: list, epochs: int, lr: float, n_rows: int, batch_size: int,
               generator: torch.Generator, accuracy, width: int, log=None, accuracy_label: str = "few-shot accuracy",
               optimizer: torch.optim.Optimizer | None = None, schedule=None) -> tuple[float, list[dict]]:
    """The shared training loop: SGD (momentum 0.9, weight decay 5e-4) over ``params`` with
    CoOp's schedule, shuffled batches of row indices to ``step_loss(idx) -> (loss, parts)``.
    A given ``optimizer`` replaces SGD and runs at its own learning rate, stepped once per epoch
    by ``schedule`` (an LR scheduler of that optimizer) when one is given, constant otherwise.
    Returns (accuracy before training, per-epoch history: the learning rate, the mean loss and its parts)."""
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        schedule = _schedule(optimizer, epochs)
    history = []
    threads = torch.get_num_threads()
    if width <= 128:
        torch.set_num_threads(1)  # a tiny text tower's ops are too small to split
    try:
        before = accuracy()
        for epoch in range(epochs):
            order = torch.randperm(n_rows, generator=generator)
            total, parts_sum = 0.0, {}
            epoch_lr = optimizer.param_groups[0]["lr"]
            for i in range(0, n_rows, batch_size):
                idx = order[i : i + batch_size]
                loss, parts = step_loss(idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v * len(idx)
            if schedule is not None:
                schedule.step()
            row = {"epoch": epoch + 1, "lr": epoch_lr, "loss": total / n_rows, **{k: v / n_rows for k, v in parts_sum.items()}}
            if epoch == epochs - 1 or log:
                row["accuracy"] = accuracy()
            history.append(row)
            if log:
                extra = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "loss", "accuracy"))
                log(f"epoch {epoch + 1}/{epochs}  loss {row['loss']:.4f}  {extra}  {accuracy_label} {100 * row['accuracy']:.1f}%")
    finally:
        torch.set_num_threads(threads)
    return before, history


def train_prompts(
    method: str,
    store_path: str | Path,
    out: str | Path,
    backbone: str | None = None,
    split: str = "train",
    shots: int | None = None,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 0.002,
    n_ctx: int = 16,
    ctx_init: str | None = None,
    temperature: float | None = None,
    train_classes: str | None = None,
    train_class_fraction: float | None = None,
    labels: str | None = None,
    seed: int | None = None,
    locoop_lambda: float = 0.25,
    locoop_top_k: int = 200,
    local_layer: str = LOCAL_LAYERS[0],
    positive: str | Path | None = None,
    neg_prompts: int = 2,
    beta: float = 0.1,
    gamma: float = 0.05,
    nis_softmax: str = "all",
    precision: str = "auto",
    log=None,
) -> PromptTrainResult:
    """Train CoOp, LoCoOp or NegPrompt prompts on a store's cached CLIP features; write ``out``.

    ``shots`` and ``seed`` default to 16 and 0; NegPrompt takes them, and the training
    classes, from its positive file, so both stages learn from the same few shots.
    ``local_layer`` is the patch features LoCoOp's entropy term reads: ``patch_values``
    (the last block's value path, as LoCoOp's own code) or ``patch_tokens`` (the final-layer
    tokens); the file records it, and scoring refuses the other layer. ``precision`` 'auto'
    trains under bfloat16 autocast on CUDA (float32 on a CPU), 'fp32' in float32 everywhere.
    """
    if method not in METHODS:
        raise UsageError(f"unknown prompt method '{method}'; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    out = Path(out)
    check_output_file(out)
    if batch_size < 1 or lr <= 0 or (temperature is not None and temperature <= 0):
        raise UsageError("--batch-size, --lr and --temperature must be positive")
    clip_text.check_precision(precision)
    pos_file = None
    if method == "negprompt":
        if positive is None:
            raise UsageError("'train negprompt' needs --positive FILE: the prompts of 'oodcli train coop' (stage one)")
        if neg_prompts < 1:
            raise UsageError(f"--neg-prompts must be at least 1, not {neg_prompts}")
        if nis_softmax not in NIS_SOFTMAX:
            raise UsageError(f"unknown --nis-softmax '{nis_softmax}'; choose from {', '.join(NIS_SOFTMAX)}")
        pos_file = read_prompt_file(positive)
        if pos_file.method not in ("coop", "locoop"):
            raise UsageError(f"--positive {positive} holds {pos_file.method} prompts; give a CoOp or LoCoOp prompt file")
        recorded = pos_file.meta
        # stage two learns on stage one's few-shot data unless told otherwise
        shots = recorded["shots"] if shots is None else shots
        seed = recorded["seed"] if seed is None else seed
        if train_classes is None and train_class_fraction is None:
            train_classes = f"{recorded['classes'][0]}-{recorded['classes'][-1]}"
        backbone = backbone or recorded.get("backbone")
    shots = 16 if shots is None else shots
    seed = 0 if seed is None else seed
    epochs = epochs if epochs is not None else (10 if method == "negprompt" else 50)
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, not {epochs}")
    if method == "locoop" and locoop_lambda < 0:
        raise UsageError(f"--lambda must be non-negative, not {locoop_lambda}")

    data = _load_data(store_path, backbone, split, train_classes, train_class_fraction, shots, seed, labels,
                      patches=(method == "locoop"), local_layer=local_layer)
    train_names = [data.names[c] for c in data.classes]
    if method == "locoop" and not 1 <= locoop_top_k < len(train_names):
        raise UsageError(
            f"--top-k {locoop_top_k} must be between 1 and the number of training classes minus one "
            f"({len(train_names) - 1}); LoCoOp's 200 is for ImageNet's 1000 classes"
        )
    from oodcli import text as text_mod

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tower = text_mod.build_text_tower(data.source)
    tau = temperature if temperature is not None else 1.0 / tower.logit_scale
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if pos_file is not None:
        check_prompts_fit(pos_file, data.source, data.names)
        learner = PromptLearner(tower, pos_file.ctx, precision=precision)
        with torch.no_grad():
            positive_text = learner.features(train_names)[0]
        learner.ctx = torch.nn.Parameter(negative_context_start(pos_file.ctx, neg_prompts, gen).to(device))
    else:
        learner = PromptLearner(tower, initial_context(tower, n_ctx, ctx_init, gen), precision=precision)
    image, labels_t = data.image.to(device), data.labels.to(device)
    patches = data.patches

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        idx = idx.to(device)
        feats = learner(train_names)
        x, y = image[idx], labels_t[idx]
        if method == "negprompt":
            nis, npd, nnd = negprompt_losses(x, positive_text, feats, tau, nis_softmax)
            return nis + beta * npd + gamma * nnd, {"nis": nis.item(), "npd": npd.item(), "nnd": nnd.item()}
        text = feats[0]
        loss = coop_loss(x, text, y, tau)
        parts = {"ce": loss.item()}
        if method == "locoop":
            local = patches[idx.cpu()].to(device).float()
            local_logits = F.normalize(local, dim=-1) @ text.T / tau
            ent = locoop_entropy_term(local_logits, irrelevant_patches(local_logits, y, locoop_top_k))
            loss = loss + locoop_lambda * ent
            parts["entropy_term"] = ent.item()
        return loss, parts

    def accuracy() -> float:
        if method == "negprompt":  # eq. 3's classifier: the positive prompts decide the class
            return _accuracy(image, positive_text, labels_t)
        return _accuracy(image, learner.features(train_names)[0], labels_t)

    accuracy_before, history = fit_epochs(step_loss, [learner.ctx], epochs, lr, len(image), batch_size, gen,
                                          accuracy, tower.width, log)

    test_acc = _test_accuracy(learner if pos_file is None else PromptLearner(tower, pos_file.ctx), data, device)
    meta = {
        "method": method,
        **data_meta(data, split),
        "width": tower.width,
        "n_ctx": learner.n_ctx,
        "ctx_init": ctx_init if pos_file is None else pos_file.meta.get("ctx_init"),
        "temperature": tau,
        "shots": shots,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "precision": learner.precision,
        "history": history,
    }
    if method == "locoop":
        meta.update(locoop_lambda=locoop_lambda, locoop_top_k=locoop_top_k, local_layer=local_layer)
    if pos_file is not None:
        meta.update(neg_prompts=neg_prompts, beta=beta, gamma=gamma, nis_softmax=nis_softmax,
                    neg_init=f"positive + U(-{NEG_INIT_NOISE:g}, {NEG_INIT_NOISE:g})", positive=Path(pos_file.path).name,
                    positive_sha256=pos_file.sha256, positive_method=pos_file.method)
        tensors = {"ctx": pos_file.ctx, "neg_ctx": learner.ctx}
    else:
        tensors = {"ctx": learner.ctx}
    write_prompt_file(out, tensors, meta)
    return PromptTrainResult(str(out), method, len(train_names), shots, epochs, history[-1]["loss"],
                             accuracy_before, history[-1]["accuracy"], test_acc, time.perf_counter() - t0, history)


# ---- text features for scoring -------------------------------------------------------------


def prompt_features(prompts: PromptFile, source, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(positive features [C, D], negative features [p, C, D] or None) of ``names``, L2-normalised."""
    from oodcli import text as text_mod

    if prompts.meta.get("csc"):
        raise OodError(
            f"prompt file {prompts.path} holds class-specific contexts ({prompts.method}); "
            "score it with its own methods (s-mcm, s-mcm-star, r-mcm-trained, gl-mcm-local)"
        )
    tower = text_mod.build_text_tower(source)
    learner = PromptLearner(tower, prompts.ctx)
    pos = learner.features(names)[0].cpu().numpy()
    neg = None if prompts.neg_ctx is None else learner.features(names, prompts.neg_ctx.to(tower.device)).cpu().numpy()
    return pos.astype(np.float32), None if neg is None else neg.astype(np.float32)
