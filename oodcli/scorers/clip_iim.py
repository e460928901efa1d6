"""Scores with IIM's prompts (``oodcli train iim``): S-MCM, S-MCM*, R-MCM and GL-MCM with local prompts.

As in Fig. 2 of IIM (Chen, Fang and Xue, AAAI 2026), the global term S_MCM (eq. 2) uses the
fixed CLIP text encoder's class prototypes ("a photo of a {}.", the zero-shot ones, cached
under ``fitted/text``), while the local terms use the trained local prototypes t_c^l and the
C_n OOD prototypes t_c~^l. With ``v_h`` the H patch features of an image, C ID classes and
``s(v, t) = exp(cos(v, t) / T)`` (T = 1):

- ``s-mcm`` (eq. 12-14): S_MCM + S_i2t + alpha S_t2i, alpha = 1, where
  S_i2t = mean of the top-k over (h, c) of s(v_h, t_c^l) / (sum_c s(v_h, t_c^l) + sum_c~ s(v_h, t_c~^l)),
  S_t2i = (H / C) mean of the top-k over (h, c) of s(v_h, t_c^l) / sum_h s(v_h, t_c^l);
  k = 50 (the paper's test k). The text-to-image entries are, per class, a softmax over
  the image's patches; H / C brings their mean (1 / H) to that of the image-to-text ones (1 / C).
  ``s-mcm.double_exp=true`` computes S_i2t with OOD prototypes as the official
  ``R_MCM_Score`` does: it exponentiates twice, a softmax over classes and OOD prototypes
  of e^{cos / T} / T rather than of cos / T. The default is eq. 12 as printed; the
  official headline "with neg" numbers (S-MCM / SLCM and R-MCM with OOD prompts, Table 1)
  come from the double exponential, so set it to reproduce them. S_t2i, S-MCM* and the
  MCM term use a single exponential in both.
- ``s-mcm-star`` (S-MCM*): the same without the OOD prototypes in S_i2t's denominator.
- ``r-mcm-trained`` (eq. 4, R-MCM with trained prompts): S_MCM + S_i2t (with the OOD
  prototypes); it is ``s-mcm`` with alpha = 0 (``double_exp`` as there). The zero-shot R-MCM* is ``r-mcm``.
- ``gl-mcm-local`` (eq. 3 with the local prompts): S_MCM + max_{h,c} softmax_c(cos(v_h, t_c^l) / T).

The patch features are ``local_layer``: ``patch_values`` by default (the last ViT block's
value path, then ``ln_post`` and the projection: what the official IIM code, after
Local-Prompt and GL-MCM, reads), ``patch_tokens`` (the final-layer tokens) as the option.
A prompt file is scored on the layer it was trained on only (``oodcli train iim --local-layer``).

Local and OOD prototypes are cached under ``fitted/text/<backbone>/<label set>/iim-<hash>``
per (prompt file, label set). Patch tokens stream chunk by chunk, and within a chunk the
patch-prompt similarities are computed for a bounded number of rows at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from oodcli import text
from oodcli.errors import UsageError
from oodcli.scorers.base import register
from oodcli.scorers.clip_zeroshot import LOCAL_LAYERS, _ClipText, _unit
from oodcli.store import Store, digest

if TYPE_CHECKING:
    import torch

ENTRY_BUDGET = 1 << 22  # patch-prompt similarities held at once (a few times 16 MiB of float32)


class _LocalPrompted(_ClipText):
    """Shared part: global zero-shot prototypes, the prompt file's local and OOD ones, the streamed local terms."""

    layers = ("image_embeds", LOCAL_LAYERS[0])
    uses_ood = False  # reads the OOD prototype prompts
    uses_k = True
    double_exp = False  # S_i2t with OOD prototypes as the official R_MCM_Score: a softmax of e^{cos/T}/T

    def _setup(self, prompts, temperature, templates, labels, k=None, local_layer=LOCAL_LAYERS[0]):
        self.prompts, self.temperature, self.templates, self.labels = prompts, float(temperature), templates, labels
        self._use_local_layer(local_layer)
        if k is not None:
            self.k = int(k)
            if self.k < 1:
                raise UsageError(f"{self.name}.k must be at least 1, not {self.k}")
        self._check_common()

    def applicable(self, store: Store, backbone: str, train_split: str) -> bool:
        """Needs METHOD.prompts=FILE from 'oodcli train iim'."""
        return self.prompts is not None

    def check_inputs(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> None:
        source = text.clip_source(store, backbone, model_id)
        self._prompt_file(source, text.label_set(store, self.labels)[1])

    def _prompt_file(self, source, names: list[str]):
        from oodcli.train.iim import ood_context
        from oodcli.train.prompts import check_local_layer, check_prompts_fit, read_prompt_file

        if self.prompts is None:
            raise UsageError(f"{self.name} needs trained prompts: --param {self.name}.prompts=FILE (from 'oodcli train iim')")
        prompts = read_prompt_file(self.prompts)
        if self.uses_ood and ood_context(prompts) is None:
            raise UsageError(
                f"{self.prompts} holds {prompts.method} prompts without OOD prototype prompts; "
                "make them with 'oodcli train iim'"
            )
        check_prompts_fit(prompts, source, names)
        check_local_layer(prompts, self.local_layer, f"{self.name}.local_layer")
        return prompts

    def extra_text(self, store, source, encoder, progress) -> bool:
        """The local (and OOD) prototypes of the prompt file for this label set; True on a cache hit."""
        from oodcli.train.iim import iim_features

        prompts = self._prompt_file(source, self.class_names)
        key = {"weights": source.identity, "names": digest(self.class_names), "prompts": prompts.sha256}
        node = text.text_node(source.backbone, self.label_set, f"iim-{prompts.sha256[:12]}")
        hit = text.read_cached(store, node, key)
        if hit is not None:
            embeds = hit[0]
        else:
            local, ood = iim_features(prompts, source, self.class_names)
            embeds = local if ood is None else np.concatenate([local, ood])
            text.write_cached(store, node, key, embeds, class_names=self.class_names, method=prompts.method,
                              prompt_file=prompts.path, ood_prompts=0 if ood is None else len(ood))
        c = len(self.class_names)
        self.local = np.ascontiguousarray(embeds[:c])
        self.ood = np.ascontiguousarray(embeds[c:]) if len(embeds) > c else None
        return hit is not None

    def release(self) -> None:
        super().release()
        self.local = self.ood = None

    # ---- the local terms, on [b, H, C] patch-class logits cos / T ---------------------------
    def _check_k(self, entries: int) -> None:
        if self.uses_k and self.k > entries:
            raise UsageError(f"{self.name}.k={self.k} exceeds the {entries} patch-class entries per image; lower it")

    def i2t(self, logits: torch.Tensor, ood_logits: torch.Tensor | None) -> torch.Tensor:
        """S_i2t: mean top-k over (h, c) of the class share of each patch's similarity mass (OOD prototypes included if given)."""
        import torch

        if ood_logits is not None and self.double_exp:
            logits, ood_logits = logits.exp() / self.temperature, ood_logits.exp() / self.temperature
        mass = logits if ood_logits is None else torch.cat([logits, ood_logits], dim=-1)
        share = (logits - mass.logsumexp(dim=-1, keepdim=True)).exp()
        return share.flatten(1).topk(self.k, dim=1).values.mean(dim=1)

    def t2i(self, logits: torch.Tensor) -> torch.Tensor:
        """S_t2i: (H / C) mean top-k over (h, c) of each class's softmax over the image's patches."""
        h, c = logits.shape[1], logits.shape[2]
        share = logits.softmax(dim=1)
        return share.flatten(1).topk(self.k, dim=1).values.mean(dim=1) * (h / c)

    def local_score(self, logits: torch.Tensor, ood_logits: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def score_batch(self, batch):
        import torch

        patches = batch[self.local_layer]
        n, h = patches.shape[0], patches.shape[1]
        local = torch.from_numpy(self.local)
        ood = torch.from_numpy(self.ood) if self.uses_ood else None
        self._check_k(h * len(local))
        width = len(local) + (0 if ood is None else len(ood))
        step = max(1, ENTRY_BUDGET // (h * width))
        parts = []
        for i in range(0, n, step):
            x = _unit(patches[i : i + step])
            logits = x @ local.T / self.temperature
            ood_logits = None if ood is None else x @ ood.T / self.temperature
            parts.append(self.local_score(logits, ood_logits))
        local_term = torch.cat(parts) if parts else torch.zeros(0)
        return (self.mcm(batch["image_embeds"]) + local_term).numpy()


@register
class SMCM(_LocalPrompted):
    """S-MCM (IIM): MCM + image-to-text top-k with OOD prototypes + alpha x text-to-image top-k (local prompts)."""

    name = "s-mcm"
    uses_ood = True

    def __init__(self, prompts: str | None = None, k: int = 50, alpha: float = 1.0, temperature: float = 1.0,
                 templates: str = "photo", labels: str | None = None, double_exp: bool = False,
                 local_layer: str = LOCAL_LAYERS[0]):
        self.alpha, self.double_exp = float(alpha), bool(double_exp)
        self._setup(prompts, temperature, templates, labels, k, local_layer)

    def local_score(self, logits, ood_logits):
        return self.i2t(logits, ood_logits) + self.alpha * self.t2i(logits)


@register
class SMCMStar(SMCM):
    """S-MCM* (IIM): S-MCM without the OOD prototype prompts."""

    name = "s-mcm-star"
    uses_ood = False

    def __init__(self, prompts: str | None = None, k: int = 50, alpha: float = 1.0, temperature: float = 1.0,
                 templates: str = "photo", labels: str | None = None, local_layer: str = LOCAL_LAYERS[0]):
        super().__init__(prompts, k, alpha, temperature, templates, labels, local_layer=local_layer)


@register
class RMCMTrained(_LocalPrompted):
    """R-MCM with IIM's trained prompts: MCM + top-k mean of the patch-class share against local and OOD prototypes."""

    name = "r-mcm-trained"
    uses_ood = True

    def __init__(self, prompts: str | None = None, k: int = 50, temperature: float = 1.0,
                 templates: str = "photo", labels: str | None = None, double_exp: bool = False,
                 local_layer: str = LOCAL_LAYERS[0]):
        self.double_exp = bool(double_exp)
        self._setup(prompts, temperature, templates, labels, k, local_layer)

    def local_score(self, logits, ood_logits):
        return self.i2t(logits, ood_logits)


@register
class GLMCMLocal(_LocalPrompted):
    """GL-MCM with IIM's trained local prompts: MCM + the largest per-patch class softmax."""

    name = "gl-mcm-local"
    uses_k = False

    def __init__(self, prompts: str | None = None, temperature: float = 1.0, templates: str = "photo",
                 labels: str | None = None, local_layer: str = LOCAL_LAYERS[0]):
        self._setup(prompts, temperature, templates, labels, local_layer=local_layer)

    def local_score(self, logits, ood_logits):
        return logits.softmax(dim=-1).flatten(1).amax(dim=1)
