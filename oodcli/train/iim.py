"""IIM, Intra-Image Mining (Chen, Fang and Xue, AAAI 2026): few-shot local and OOD prototype prompts.

CLIP stays frozen; the image side is read from the store and only the text tower runs.
The patch features are ``patch_values`` by default: the last ViT block's value path (its
attention's token mixing skipped), each patch then through ``ln_post`` and the projection,
L2-normalised, as the official code's ``clip_w_local`` model (after Local-Prompt and
GL-MCM) computes them; ``local_layer="patch_tokens"`` (``--local-layer``) trains on the
final-layer tokens instead. The prompt file records the layer, and the IIM scores refuse
the other one.
With ``v_h`` the patch features of an image of class y and
``s(v, t) = exp(logit_scale * cos(v, T(t)) / T)``, T = 1:

- **Temperature**: training runs at tau = T / logit_scale (0.01 for OpenAI's CLIP), as the
  authors' code does (``logit_scale * cos``, then ``exp(logit / T)`` with T = 1; Local-Prompt,
  whose "T fixed at 1" the paper follows, does the same). On the bare cosine (tau = 1) the
  loss stays near uniform and its gradients are hundreds of times smaller. The scores
  (``oodcli.scorers.clip_iim``) use T = 1 on the cosine, as both codes do at test time.
- **Local prompts** (sec. "Positive Patches"): t_c^l = [z_1 .. z_L; z_c], L = 16 learnable
  context vectors before each class name, through CLIP's text tower; their features meet
  patch tokens only (never the global embedding). The paper's notation does not say
  whether z_1 .. z_L are shared by the classes or their own: class-specific contexts (C x
  L vectors, CoOp's CSC) are the default because every official config (and the official
  ``train.py`` default) sets ``CSC: True``, so the published numbers use them (the
  official shared path does not even run). ``csc=False`` (``--no-csc``) shares one
  context among all classes, which also gives prototypes to classes never trained on.
- **OOD prototype prompts** (sec. "Negative Prompts"): C_n = 300 prompts that go through
  the text encoder like the local ones (eq. 7 and 10 write T(t_c~^l)); they are prompts,
  not free vectors in embedding space. Each has its own L learnable context vectors and no
  class name: C_n is chosen apart from C, so a negative prompt cannot carry an ID class
  name (our reading; the paper shows no template). They reuse the local prompts' template
  with an empty name: ``[SOS, z~_1 .. z~_L, ., EOS]``.
- **Patch mining** (eq. 5-6): the patches ranked 1..k by s(v_h, t_y^l) are the positives,
  those ranked k+1..2k the ID-like OOD patches I_{2k~k}. So 2k patches are needed.
- **Hard negative mining** (below eq. 5): S_k^c(x) is the sum of s over the top-k patches
  *of class c* (each class picks its own k patches), for every ID class; S_k^y is eq. 5.
- **Losses** (eq. 8-11), per image and then averaged over the batch (the paper writes
  them per image (x, y) and states no reduction; the batch mean is the usual one), with
  ``denominators='paper'``:

    L_pos = -log S_k^y / (sum_c S_k^c + sum_c~ S~^c~)
    L_neg = -log sum_c~ S~^c~ / (sum_c S~^c + sum_c~ S~^c~)
    L_div = mean_{i<j} cos(T(t~_i), T(t~_j)) + mean_{i<j} cos(T(t_i^l), T(t_j^l))
    L = L_pos + lambda_neg L_neg + lambda_div L_div

  with S~^c = sum over the ID-like OOD patches p of s(v_p, t_c) (eq. 7), for ID classes
  and OOD prompts alike. Eq. 8 is taken as printed: its OOD-prompt sum runs over the
  ID-like OOD patches (S~_{2k~k}), not over the positives, so L_pos mildly pushes the OOD
  prompts away from those patches while L_neg (weighted 5) pulls them in. L_div is
  computed once per step (it depends on the prompts only). Its first mean is 0 when
  C_n = 1, its second when C = 1 (no pairs).
- **Denominators** (default ``'official'``): the authors' code departs from the printed
  eq. 8-9 in two places, and its published numbers come from it: in L_pos the OOD
  prompts' sum is each OOD prompt's own top-k over all patches (like S_k^c, as
  Local-Prompt does too); in L_neg the ID classes' sum is each class's own patches ranked
  k+1..2k, not class y's ID-like patches ("the above strictly follows our paper, in
  practice, we find that the below one is better", their comment). ``'paper'`` is eq. 8-9
  as printed.
- **Defaults** (implementation details): L = 16, T = 1 (after the logit scale), k = 50 (needs 2k <= patches; the
  tiny demo CLIP has 16 patches, so use e.g. k = 4), C_n = 300, lambda_neg = 5,
  lambda_div = 0.5, SGD lr 2.5e-4, batch 32, 50 epochs. The paper names SGD and the
  learning rate only; momentum 0.9, weight decay 5e-4 and CoOp's schedule (one warm-up
  epoch at 1e-5, then cosine) are the CoOp/Local-Prompt setup it says it follows. The
  paper does not say how prompts start: both kinds start as N(0, 0.02) (CoOp's 16-token
  start), each OOD prompt drawn independently so that L_div's pairs differ from the start.
- **What differs from the official code, by design**: the official trainer also tunes CLIP's
  text projection (``text_encoder.text_projection``) for the local and OOD prompts, while
  the paper says the VLM stays frozen; oodcli follows the paper and learns the contexts
  only. The official code trains on random-resized-crop views (scale 0.85-1) with flips;
  oodcli reads one cached view per shot from the feature store (the image encoder never
  runs), so each epoch sees the same patches.

The few-shot accuracy reported is that of the local prompts as a patch classifier:
argmax_c S_k^c(x) against the label.

A prompt file holds ``ctx`` [C, L, width] (class-specific local contexts, in the order of
its ``class_names``; [1, L, width] when shared) and ``ood_ctx`` [C_n, L, width];
the OOD prompts are kept under their own key so that NegPrompt, whose negatives are
templates put before each class name, never reads them as its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from oodcli.backbones import clip_text
from oodcli.errors import OodError, UsageError
from oodcli.outputs import check_output_file
from oodcli.train.prompts import (
    LOCAL_LAYERS,
    PromptFile,
    PromptLearner,
    PromptTrainResult,
    _load_data,
    data_meta,
    fit_epochs,
    initial_context,
    write_prompt_file,
)

OOD_KEY = "ood_ctx"
DENOMINATORS = ("official", "paper")
OOD_NAME = ""  # OOD prompts carry no class name: [SOS, z~_1 .. z~_L, ., EOS]
ACCURACY_BATCH = 256


# ---- mining and losses (eq. 5-10) -----------------------------------------------------------


def select_patches(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives [B, k], ID-like OOD patches [B, k]): the patch indices ranked 1..k and k+1..2k
    by ``similarity`` [B, H] to the image's own class (eq. 5-6)."""
    if not 1 <= k <= similarity.shape[1] // 2:
        raise UsageError(
            f"k={k} needs 2k = {2 * k} patches (top-k positives, the next k as ID-like OOD patches) "
            f"and the features have {similarity.shape[1]} per image; use k <= {similarity.shape[1] // 2}"
        )
    order = similarity.topk(2 * k, dim=1).indices
    return order[:, :k], order[:, k:]


def iim_terms(
    patches: torch.Tensor, local: torch.Tensor, ood: torch.Tensor, labels: torch.Tensor, k: int,
    temperature: float = 1.0, denominators: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_pos, L_neg) of eq. 8-9, averaged over the batch.

    ``patches`` [B, H, D], ``local`` [C, D] (local prototypes), ``ood`` [C_n, D] (OOD
    prototypes), all L2-normalised; ``labels`` [B] in 0..C-1. Sums of s = exp(cos / tau)
    are taken in log space (logsumexp), so any temperature is safe (training passes
    tau = T / logit_scale). ``denominators``: 'paper' is eq. 8-9 as printed; 'official'
    (the authors' code) puts each OOD prompt's own top-k over all patches in L_pos's
    denominator and each class's own patches ranked k+1..2k in L_neg's.
    """
    if denominators not in DENOMINATORS:
        raise UsageError(f"unknown --denominators '{denominators}'; choose from {', '.join(DENOMINATORS)}")
    logits = patches @ local.T / temperature  # [B, H, C]   log s(v_h, t_c^l)
    ood_logits = patches @ ood.T / temperature  # [B, H, C_n] log s(v_h, t_c~^l)
    own = logits[torch.arange(len(labels), device=logits.device), :, labels]  # [B, H]
    _, neg_idx = select_patches(own.detach(), k)
    log_sk = logits.topk(k, dim=1).values.logsumexp(dim=1)  # [B, C]: log S_k^c, each class its own top-k
    log_sk_y = log_sk.gather(1, labels[:, None])[:, 0]  # log S_k^y (eq. 5)

    def over_ood_patches(x: torch.Tensor) -> torch.Tensor:  # eq. 7: log sum_{p in I_2k~k} s(v_p, .)
        return x.gather(1, neg_idx[:, :, None].expand(-1, -1, x.shape[2])).logsumexp(dim=1)

    neg_ood = over_ood_patches(ood_logits)  # [B, C_n]: log S~^c~ over the ID-like patches of class y
    if denominators == "paper":
        pos_ood = neg_ood  # eq. 8: the OOD prompts over the ID-like patches
        neg_id = over_ood_patches(logits)  # eq. 9: the ID classes over class y's ID-like patches
    else:
        pos_ood = ood_logits.topk(k, dim=1).values.logsumexp(dim=1)  # each OOD prompt's own top-k patches
        neg_id = logits.topk(2 * k, dim=1).values[:, k:].logsumexp(dim=1)  # each class's own ranks k+1..2k
    l_pos = torch.logsumexp(torch.cat([log_sk, pos_ood], dim=1), dim=1) - log_sk_y
    l_neg = torch.logsumexp(torch.cat([neg_id, neg_ood], dim=1), dim=1) - neg_ood.logsumexp(dim=1)
    return l_pos.mean(), l_neg.mean()


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """mean_{i<j} cos(f_i, f_j) of unit rows [N, D]: (|sum f|^2 - N) / (N (N - 1)); 0 when N < 2."""
    n = len(features)
    if n < 2:
        return features.sum() * 0.0
    total = features.sum(dim=0)
    return ((total * total).sum() - (features * features).sum()) / (n * (n - 1))


def diversity_term(ood: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """L_div of eq. 10: mean pairwise cosine of the OOD prototypes plus that of the local ones."""
    return mean_pairwise_cosine(ood) + mean_pairwise_cosine(local)


def local_accuracy(patches: torch.Tensor, local: torch.Tensor, labels: torch.Tensor, k: int, temperature: float) -> float:
    """Share of images whose label has the largest S_k^c (the local prompts as a patch classifier)."""
    if not len(labels):
        return 0.0
    right = 0
    with torch.no_grad():
        for i in range(0, len(labels), ACCURACY_BATCH):
            x = torch.nn.functional.normalize(patches[i : i + ACCURACY_BATCH].to(local.device).float(), dim=-1)
            score = (x @ local.T / temperature).topk(k, dim=1).values.logsumexp(dim=1)
            right += int((score.argmax(dim=1) == labels[i : i + ACCURACY_BATCH]).sum())
    return right / len(labels)


# ---- prompt files and their text features -------------------------------------------------


def ood_context(prompts: PromptFile) -> torch.Tensor | None:
    """The OOD prototype prompts' context [C_n, L, width] of a prompt file, or None if it has none."""
    ood = prompts.extra.get(OOD_KEY)
    if ood is None:
        return None
    if ood.ndim != 3 or ood.shape[1:] != prompts.ctx.shape[1:] or not len(ood):
        raise OodError(f"prompt file {prompts.path} has a malformed '{OOD_KEY}' tensor; train it again")
    return ood


def ood_features(learner: PromptLearner, ood_ctx: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """[C_n, D] L2-normalised features of the OOD prototype prompts (no class name)."""
    names = [OOD_NAME] * len(ood_ctx)  # each prompt its own context: only the start token is shared
    return learner.class_specific(names, ood_ctx) if grad else learner.class_specific_features(names, ood_ctx)


def local_features(learner: PromptLearner, names: list[str], ctx: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """[C, D] L2-normalised local prototypes of ``names``: ``ctx`` [C, L, width] class-specific
    (row c before names[c]) or [1, L, width] shared."""
    if ctx.shape[0] == 1 and len(names) != 1:
        return learner(names, ctx)[0] if grad else learner.features(names, ctx)[0]
    return learner.class_specific(names, ctx) if grad else learner.class_specific_features(names, ctx)


def prototype_features(learner: PromptLearner, names: list[str], ctx: torch.Tensor,
                       ood_ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local [C, D], OOD [C_n, D]) prototypes of a training step, with gradients. Class-specific
    local contexts and the OOD prompts share nothing but the start token, so they go through the
    text tower as one set of sequences (length buckets mix them); a shared local context keeps
    its own pass, its prefix computed once."""
    if ctx.shape[0] == 1 and len(names) != 1:
        return learner(names, ctx)[0], learner.class_specific([OOD_NAME] * len(ood_ctx), ood_ctx)
    feats = learner.class_specific(list(names) + [OOD_NAME] * len(ood_ctx), torch.cat([ctx, ood_ctx]))
    return feats[: len(names)], feats[len(names) :]


def local_context(prompts: PromptFile, names: list[str]) -> torch.Tensor:
    """The local context for ``names``: the shared one, or each name's own class-specific row."""
    if not prompts.meta.get("csc"):
        return prompts.ctx
    trained = {name: i for i, name in enumerate(prompts.meta.get("class_names", []))}
    missing = [n for n in names if n not in trained]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise OodError(
            f"prompt file {prompts.path} has class-specific contexts for its {len(trained)} training classes only, "
            f"none for {', '.join(missing[:3])}{more}; score its own classes or train with --no-csc"
        )
    return prompts.ctx[[trained[n] for n in names]]


def iim_features(prompts: PromptFile, source, names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(local prototypes [C, D] of ``names``, OOD prototypes [C_n, D] or None), float32, L2-normalised."""
    from oodcli import text

    ood = ood_context(prompts)
    ctx = local_context(prompts, names)
    tower = text.build_text_tower(source)
    learner = PromptLearner(tower, ctx)
    local = local_features(learner, names, learner.ctx).cpu().numpy().astype(np.float32)
    if ood is None:
        return local, None
    return local, ood_features(learner, ood.to(tower.device)).cpu().numpy().astype(np.float32)


# ---- training -------------------------------------------------------------------------------


def train_iim(
    store_path: str | Path,
    out: str | Path,
    backbone: str | None = None,
    split: str = "train",
    shots: int = 16,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 2.5e-4,
    n_ctx: int = 16,
    ctx_init: str | None = None,
    k: int = 50,
    ood_prompts: int = 300,
    lambda_neg: float = 5.0,
    lambda_div: float = 0.5,
    temperature: float = 1.0,
    csc: bool = True,
    denominators: str = "official",
    local_layer: str = LOCAL_LAYERS[0],
    train_classes: str | None = None,
    train_class_fraction: float | None = None,
    labels: str | None = None,
    seed: int = 0,
    precision: str = "auto",
    log=None,
) -> PromptTrainResult:
    """Learn IIM's local and OOD prototype prompts on a store's cached CLIP patch tokens; write ``out``.

    ``temperature`` is T of exp(logit_scale * cos / T) (the authors' T = 1: tau = 1 / logit_scale);
    ``csc`` class-specific local contexts (the official default); ``denominators`` 'official' or 'paper'
    (see ``iim_terms``); ``local_layer`` the patch features (``patch_values`` or ``patch_tokens``);
    ``precision`` 'auto' (bfloat16 autocast on CUDA) or 'fp32'."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output_file(out)
    if batch_size < 1 or lr <= 0 or temperature <= 0:
        raise UsageError("--batch-size, --lr and --temperature must be positive")
    if epochs < 1 or k < 1 or ood_prompts < 1:
        raise UsageError("--epochs, --k and --ood-prompts must be at least 1")
    if lambda_neg < 0 or lambda_div < 0:
        raise UsageError("--lambda-neg and --lambda-div must be non-negative")
    if denominators not in DENOMINATORS:
        raise UsageError(f"unknown --denominators '{denominators}'; choose from {', '.join(DENOMINATORS)}")
    clip_text.check_precision(precision)

    data = _load_data(store_path, backbone, split, train_classes, train_class_fraction, shots, seed, labels,
                      patches=True, method="IIM", local_layer=local_layer)
    n_patches = data.patches.shape[1]
    if 2 * k > n_patches:
        raise UsageError(
            f"--k {k} needs 2k = {2 * k} patches per image (k positives, the next k as ID-like OOD patches) "
            f"and these features have {n_patches}; use --k {max(1, n_patches // 2)} or less"
        )
    train_names = [data.names[c] for c in data.classes]
    from oodcli import text as text_mod

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tower = text_mod.build_text_tower(data.source)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = initial_context(tower, n_ctx, ctx_init, gen)
    if csc:  # one context per class: C x L vectors, each drawn on its own (a phrase start is repeated)
        if ctx_init:
            start = start.expand(len(train_names), -1, -1).clone()
        else:
            start = torch.cat([start, torch.randn(len(train_names) - 1, *start.shape[1:], generator=gen) * 0.02])
    learner = PromptLearner(tower, start, precision=precision)
    tau = temperature / tower.logit_scale  # the authors' exp(logit_scale * cos / T)
    ood_ctx = torch.nn.Parameter((torch.randn(ood_prompts, *learner.ctx.shape[1:], generator=gen) * 0.02).to(device))
    labels_t = data.labels.to(device)
    patches = data.patches  # [N, H, D] float16 on the CPU; a batch at a time goes to the device

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        local, ood = prototype_features(learner, train_names, learner.ctx, ood_ctx)
        x = torch.nn.functional.normalize(patches[idx].to(device).float(), dim=-1)
        l_pos, l_neg = iim_terms(x, local, ood, labels_t[idx.to(device)], k, tau, denominators)
        l_div = diversity_term(ood, local)
        loss = l_pos + lambda_neg * l_neg + lambda_div * l_div
        return loss, {"pos": l_pos.item(), "neg": l_neg.item(), "div": l_div.item()}

    def accuracy() -> float:
        return local_accuracy(patches, local_features(learner, train_names, learner.ctx), labels_t, k, tau)

    accuracy_before, history = fit_epochs(step_loss, [learner.ctx, ood_ctx], epochs, lr, len(patches), batch_size,
                                          gen, accuracy, tower.width, log, "few-shot local accuracy")

    meta = {
        "method": "iim",
        **data_meta(data, split),
        "width": tower.width,
        "n_ctx": learner.n_ctx,
        "ctx_init": ctx_init,
        "temperature": temperature,
        "logit_scale": tower.logit_scale,
        "tau": tau,
        "csc": csc,
        "denominators": denominators,
        "shots": shots,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "k": k,
        "patches": n_patches,
        "local_layer": local_layer,
        "ood_prompts": ood_prompts,
        "lambda_neg": lambda_neg,
        "lambda_div": lambda_div,
        "precision": learner.precision,
        "history": history,
    }
    write_prompt_file(out, {"ctx": learner.ctx, OOD_KEY: ood_ctx}, meta)
    return PromptTrainResult(str(out), "iim", len(train_names), shots, epochs, history[-1]["loss"],
                             accuracy_before, history[-1]["accuracy"], None, time.perf_counter() - t0, history)
