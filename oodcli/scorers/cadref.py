"""Class-aware relative features (Ling et al., CVPR 2025): CARef and CADRef.

Both compare a feature z with the mean train feature m_f of its predicted class f (the
argmax of the head's logits), relative to the feature's own size.

- CARef: minus the relative error ||z - m_f||_1 / ||z||_1.
- CADRef: the relative feature d = z - m_f is split by the sign of the predicted class's
  head weights s = sign(w_f): E+ = ||max(d * s, 0)||_1 / ||z||_1 (the part that raises the
  max logit) and E- = ||max(-d * s, 0)||_1 / ||z||_1 (the part that lowers it). The score is
  minus E+ / S(x) - E- / mean S(train), S a logit score: energy by default (the authors'
  --logit_method default), or msp, maxlogit, gen.

As the authors' code (LingAndZero/CADRef: utils/get_stat.py, ood_methods/), the class
means group the train features by the class the network predicts, not by label, and S is
averaged over every train row. Their GEN variant is 1 / sum of p^0.1 (1 - p)^0.1 over the
top max(10, C / 10) probabilities, kept here. A class no train row is predicted as (their
code leaves its mean empty) takes the mean of its labelled rows, or of all rows.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy, softmax
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import features_node

LOGIT_SCORES = ("energy", "msp", "maxlogit", "gen")


def logit_score(logits: np.ndarray, kind: str) -> np.ndarray:
    """S(x) of CADRef's error scaling, as the authors define each."""
    if kind == "energy":
        return energy(logits)
    if kind == "maxlogit":
        return logits.max(axis=1)
    p = softmax(logits, axis=1)
    if kind == "msp":
        return p.max(axis=1)
    top = np.sort(p, axis=1)[:, -max(10, logits.shape[1] // 10):]
    return 1.0 / np.sum(top**0.1 * (1 - top) ** 0.1, axis=1)


class _ClassAware(Scorer):
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def logits(self, z: np.ndarray) -> np.ndarray:
        return z @ self.weight.T + self.bias

    def fit(self, store, backbone, split):
        dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        classes = len(self.bias)

        def labelled():  # a second pass, only for classes no train row is predicted as
            for block in self.blocks(store, backbone, split, "fit: unpredicted classes", labels=True):
                yield block["penultimate"].astype(np.float64), block["labels"]

        sums, counts, total, s_total, n = np.zeros((classes, dim)), np.zeros(classes, np.int64), np.zeros(dim), 0.0, 0
        for block in self.blocks(store, backbone, split, "fit pass 1/1"):
            z = block["penultimate"].astype(np.float64)
            logits = self.logits(z)
            s, c = class_sums([(z, logits.argmax(axis=1))], dim)
            sums[: len(s)] += s
            counts[: len(c)] += c
            total += z.sum(0)
            s_total += float(self.extra(logits).sum())
            n += len(z)
        means = sums / np.maximum(counts, 1)[:, None]
        unseen = counts == 0
        if unseen.any():
            by_label, label_counts = class_sums(labelled(), dim)
            for c in np.flatnonzero(unseen):
                have = c < len(label_counts) and label_counts[c] > 0
                means[c] = by_label[c] / label_counts[c] if have else total / n
        return {"means": means, "train_logit_score": s_total / n}

    def extra(self, logits: np.ndarray) -> np.ndarray:
        """The per-row train statistic the method averages (CADRef's S); none for CARef."""
        return np.zeros(len(logits))

    def relative(self, z: np.ndarray):
        logits = self.logits(z)
        pred = logits.argmax(axis=1)
        return logits, pred, z - self.state["means"][pred], np.maximum(np.abs(z).sum(axis=1), 1e-12)


@register
class CARef(_ClassAware):
    """CARef: minus the L1 error of the feature to its predicted class's train mean over its L1 norm (Ling et al., 2025)."""

    name = "caref"

    def __init__(self):
        pass

    def score_batch(self, batch):
        _, _, d, size = self.relative(batch["penultimate"].astype(np.float64))
        return -np.abs(d).sum(axis=1) / size


@register
class CADRef(_ClassAware):
    """CADRef: CARef's error split by the sign of the predicted class's weights, scaled by energy (Ling et al., 2025)."""

    name = "cadref"

    def __init__(self, logit: str = "energy"):
        if logit not in LOGIT_SCORES:
            raise ValueError(f"logit must be one of {', '.join(LOGIT_SCORES)}, not {logit!r}")
        self.logit = logit

    def extra(self, logits):
        return logit_score(logits, self.logit)

    def score_batch(self, batch):
        logits, pred, d, size = self.relative(batch["penultimate"].astype(np.float64))
        aligned = d * np.sign(self.weight[pred])
        positive = np.maximum(aligned, 0).sum(axis=1) / size
        negative = np.maximum(-aligned, 0).sum(axis=1) / size
        return -(positive / logit_score(logits, self.logit) + negative / self.state["train_logit_score"])
