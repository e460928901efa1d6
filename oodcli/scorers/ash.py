"""Activation shaping, ASH (Djurisic et al., 2023), SCALE (Xu et al., 2024), and logit scaling,
LTS (Djurisic et al., 2024), which scales the logits by the same per-sample activation ratio.

Per sample, over its activations a (by default the D values of the pooled penultimate
vector): keep the k = n - round(n * p / 100) largest, i.e. zero those below the sample's
p-th percentile, then

- ASH-P: only prune;
- ASH-S: prune, then rescale what is kept by exp(sum before / sum after);
- ASH-B: prune, then set every kept value to (sum before) / k;
- SCALE: do not prune; rescale the whole map by ASH-S's exp(sum before / sum after);

then take the energy through the saved classifier head. All assume non-negative
(post-ReLU) activations, as the papers do.

Which activations: ``layer="penultimate"`` (the default) shapes the pooled vector. That is
what both sets of authors' code does: ASH's ImageNet ResNets apply ``apply_ash`` after the
average pool (andrijazz/ash), SCALE's network shapes the pooled vector as [B, D, 1, 1]
(kai422/SCALE), and OpenOOD v1.5 follows them; the papers' tables come from that code.
``layer="featmap"`` shapes the C*H*W values of the last stage's map (``oodcli extract
--layers ...,featmap``) and then average-pools, a reading of the papers' "activations of a
layer" that their code does not use; ``layer="auto"`` takes the map when every scored
split has one. The layer used is recorded in the scores' hyperparameters. A map stored
with ``--featmap-pool G`` is shaped at its G x G resolution, one stored chunk at a time.

Whether shaping helps depends on the layer: the rescale exp(sum / sum kept) assumes ID
samples spread more of their activation mass below the percentile than OOD ones (the SCALE
paper's observation on ImageNet ResNet-50). On the digits CNN's 128-d pooled vector it is
the other way round (sum / sum kept averages 2.7 on ID digits, 3.7-4.6 on OOD), so the
factor is larger for OOD and ASH-S ranks near-OOD above ID (AUROC 3.6), while on its
feature map the premise holds (99.2).

Default p: 90 for ASH (OpenOOD's ash.yml; the paper tunes p per variant and backbone),
85 for SCALE (OpenOOD's scale.yml).
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy
from oodcli.store import features_node

LAYERS = ("auto", "featmap", "penultimate")


def top_k_mask(x: np.ndarray, percentile: float) -> tuple[np.ndarray, int]:
    """Boolean mask of the k largest values in each row, k = D - round(D * p / 100)."""
    dim = x.shape[1]
    k = dim - int(round(dim * percentile / 100.0))
    if k < 1:
        raise UsageError(f"percentile {percentile} keeps none of {dim} activations; lower it")
    idx = np.argpartition(x, dim - k, axis=1)[:, dim - k :]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask, k


def rescale_factor(x: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """exp(sum before / sum after pruning) per row; 1 for a row with nothing kept to rescale."""
    before, after = x.sum(axis=1), pruned.sum(axis=1)
    ok = after > 0
    return np.where(ok, np.exp(np.divide(before, after, out=np.zeros_like(before), where=ok)), 1.0)


class _Shaping(Scorer):
    layers = ("penultimate",)  # what every classifier store has; the featmap is chosen per store
    uses_head = True

    def __init__(self, percentile: float = 90.0, layer: str = "penultimate"):
        self.percentile = float(percentile)
        if not 0.0 <= self.percentile < 100.0:
            raise ValueError("percentile must be in [0, 100)")
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, not {layer!r}")
        self.layer = layer
        self.used = "penultimate" if layer == "auto" else layer

    def hparams(self) -> dict:
        return {"percentile": self.percentile, "layer": self.used}  # the layer actually shaped

    def complete_inputs(self, store, backbone: str, splits: list[str]) -> list[str]:
        """Pick the layer to shape (see the module docstring); returns the note shown with the scores."""
        has = [store.is_array(f"{features_node(s, backbone)}/featmap") for s in splits]
        if self.layer == "featmap" or (self.layer == "auto" and any(has)):
            lacking = [s for s, h in zip(splits, has) if not h]
            if lacking:
                raise OodError(f"split '{lacking[0]}' has no '{backbone}' featmap while "
                               f"{'others do' if any(has) else 'layer=featmap asks for it'}; re-extract it with "
                               f"--layers ...,featmap (same --featmap-pool), or pass --param {self.name}.layer=penultimate")
            pools = {repr(store.node_attrs(f"{features_node(s, backbone)}/featmap").get("pool")) for s in splits}
            if len(pools) > 1:
                raise OodError(f"the '{backbone}' featmaps of these splits were pooled differently ({', '.join(sorted(pools))}); "
                               "re-extract them with the same --featmap-pool")
            self.used = "featmap"
        else:
            self.used = "penultimate"
        self.layers = (self.used,)
        if self.used == "penultimate" and self.layer == "auto":
            return ["no featmap in the store: shaped the pooled penultimate vector, not the feature map the paper "
                    "shapes (extract with --layers logits,penultimate,featmap for that)"]
        return []

    def shape(self, x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def score_batch(self, batch):
        x = batch[self.used].astype(np.float64)
        n = len(x)
        flat = x.reshape(n, -1)
        mask, k = top_k_mask(flat, self.percentile)
        shaped = self.shape(flat, mask, k)
        if x.ndim == 4:  # global average pooling of the shaped map: the network's own pooling
            shaped = shaped.reshape(x.shape).mean(axis=(2, 3))
        return energy(shaped @ self.weight.T + self.bias)


@register
class ASHP(_Shaping):
    """ASH-P: energy after pruning activations below each sample's 90th percentile (Djurisic et al., 2023)."""

    name = "ash-p"

    def shape(self, x, mask, k):
        return np.where(mask, x, 0.0)


@register
class ASHS(_Shaping):
    """ASH-S: prune below the 90th percentile, rescale by exp(sum before / sum after), energy (Djurisic et al., 2023)."""

    name = "ash-s"

    def shape(self, x, mask, k):
        pruned = np.where(mask, x, 0.0)
        return pruned * rescale_factor(x, pruned)[:, None]


@register
class ASHB(_Shaping):
    """ASH-B: prune below the 90th percentile, set kept values to sum / k, energy (Djurisic et al., 2023)."""

    name = "ash-b"

    def shape(self, x, mask, k):
        return mask * (x.sum(axis=1) / k)[:, None]


@register
class SCALE(_Shaping):
    """SCALE: scale all activations by exp(sum / sum above the 85th percentile), energy (Xu et al., 2024)."""

    name = "scale"

    def __init__(self, percentile: float = 85.0, layer: str = "penultimate"):
        super().__init__(percentile, layer)

    def shape(self, x, mask, k):
        return x * rescale_factor(x, np.where(mask, x, 0.0))[:, None]


@register
class LTS(Scorer):
    """LTS: energy of the logits times (sum / sum above the 95th percentile)^2 of relu(h) (Djurisic et al., 2024).

    Logit Scaling's factor S = (sum_i relu(h_i) / sum of the k largest relu(h_i))^2, k = D -
    round(D * p / 100), from the pooled penultimate vector h; the score is the energy of S * z,
    z the stored logits (the head's output on h itself, unshaped). p = 95 as in every config of
    the authors' code (andrijazz/lts, ``lts@95``), which is what pytorch-ood's LTS follows
    (its p = 0.05 is the kept fraction). The ReLU is the code's (the paper leaves it out); it
    only matters for features that can be negative (transformers). A row with no positive
    activation has no ratio and keeps its logits (S = 1).
    """

    name = "lts"
    layers = ("penultimate", "logits")

    def __init__(self, percentile: float = 95.0):
        self.percentile = float(percentile)
        if not 0.0 <= self.percentile < 100.0:
            raise UsageError(f"lts.percentile must be in [0, 100), not {self.percentile}")

    def score_batch(self, batch):
        h = np.maximum(batch["penultimate"].astype(np.float64), 0.0)
        mask, _ = top_k_mask(h, self.percentile)
        total, top = h.sum(axis=1), np.where(mask, h, 0.0).sum(axis=1)
        ratio = np.divide(total, top, out=np.ones_like(total), where=top > 0)
        return energy(batch["logits"].astype(np.float64) * (ratio**2)[:, None])
