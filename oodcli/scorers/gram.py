"""Gram-matrix deviations (Sastry & Oore, 2020), on the stored ``featmap`` layer.

For a feature map F [C, HW] and each order p = 1..P, the paper's per-channel statistic is
the row sum of the p-th order Gram matrix, rooted back to the scale of F:
g_p = sign(s) |s|^(1/p) with s = (F^p)(F^p)' 1 (F^p elementwise). The row sum is taken
as sum_k F^p_ik (sum_j F^p_jk), which is the same number without the C x C matrix.

Fit: per class c (the class the network predicts, as the paper does for train data),
the min and max of every g_p over the train samples predicted as c. Deviation of a sample
predicted as c: summed over channels and orders, relu(min - g) / |min| + relu(g - max) / |max|
(a 1e-6 guard as in the reference code). A class no train sample is predicted as gets the
range over all classes. Score: minus the deviation divided by the sample's maximum softmax
probability, as Sastry & Oore's released code (``test_deviations / test_confs_PRED``) and
OpenOOD (``-deviations / confs``) compute it: a confident prediction with the same deviation
is more in-distribution. ``confidence="none"`` scores minus the bare deviation.

The paper sums such deviations over many layers, each divided by its mean deviation on
held-out ID data; a store keeps one feature map (the last stage), where that division is
a constant factor, so it is left out: the ranking is the same. Default P = 10 (the paper's).
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import softmax

GUARD = 1e-6


def gram_features(fmap: np.ndarray, powers: int) -> np.ndarray:
    """[N, C, H, W] -> [N, P, C]: the rooted row sums of the Gram matrices of orders 1..P."""
    f = fmap.reshape(len(fmap), fmap.shape[1], -1).astype(np.float64)
    out = np.empty((len(f), powers, f.shape[1]))
    for p in range(1, powers + 1):
        fp = f**p
        s = np.einsum("nck,nk->nc", fp, fp.sum(axis=1))
        out[:, p - 1] = np.sign(s) * np.abs(s) ** (1.0 / p)
    return out


@register
class Gram(Scorer):
    """GRAM: minus the deviation of feature-map Gram statistics from the train range of the predicted class (Sastry & Oore, 2020)."""

    name = "gram"
    layers = ("featmap", "logits")
    needs_fit = True

    def __init__(self, powers: int = 10, confidence: str = "msp"):
        self.powers = int(powers)
        if self.powers < 1:
            raise ValueError("powers must be >= 1")
        if confidence not in ("msp", "none"):
            raise ValueError(f"confidence must be msp or none, not {confidence!r}")
        self.confidence = confidence

    def fit(self, store, backbone, split):
        classes = store.shape(f"backbones/{backbone}/head/bias")[0] if store.is_array(f"backbones/{backbone}/head/bias") \
            else store.shape(f"splits/{split}/{backbone}/logits")[1]
        mins = np.full((classes, self.powers, store.shape(f"splits/{split}/{backbone}/featmap")[1]), np.inf)
        maxs = -mins
        for block in self.blocks(store, backbone, split, "fit"):
            g, pred = gram_features(block["featmap"], self.powers), block["logits"].argmax(axis=1)
            for c in np.unique(pred):
                mins[c] = np.minimum(mins[c], g[pred == c].min(axis=0))
                maxs[c] = np.maximum(maxs[c], g[pred == c].max(axis=0))
        unseen = ~np.isfinite(mins[:, 0, 0])  # no train sample predicted as it: the range of all classes
        mins[unseen], maxs[unseen] = mins[~unseen].min(axis=0), maxs[~unseen].max(axis=0)
        return {"mins": mins, "maxs": maxs}

    def score_batch(self, batch):
        g, pred = gram_features(batch["featmap"], self.powers), batch["logits"].argmax(axis=1)
        lo, hi = self.state["mins"][pred], self.state["maxs"][pred]
        dev = np.maximum(lo - g, 0) / np.abs(lo + GUARD) + np.maximum(g - hi, 0) / np.abs(hi + GUARD)
        total = dev.sum(axis=(1, 2))
        if self.confidence == "msp":
            total = total / softmax(batch["logits"].astype(np.float64), axis=1).max(axis=1)
        return -total
