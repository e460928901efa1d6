"""Neural relation graph score, Relation (Kim et al., NeurIPS 2023).

The relation of a feature to a train sample is a kernel on both representations:
r = max(0, cos(z, z_t)) * (p . p_t), the clipped cosine similarity of the penultimate
features times the inner product of the softmax probabilities. The score sums, over
the whole train split, the relations above a cut-off (0.03) raised to the power
``pow``: an ID sample has many strong relations, an OOD one few.

Defaults are OpenOOD's (the authors' code): pow = 1, threshold = 0.03. Like KNN, the
bank (every normalised train feature and probability vector, float32) is held in RAM
while scoring and rebuilt from the train split in one streamed pass on each run; the
kernel is evaluated in float64 against bank pieces of ``PIECE`` rows. Scoring costs
N_query x N_train x (D + C) multiply-adds, as the method does by definition.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.knn import normalize
from oodcli.scorers.logits import softmax
from oodcli.store import features_node

PIECE = 4096  # bank rows per kernel evaluation: a 1024-row block costs 32 MiB of float64


@register
class Relation(Scorer):
    """Sum of cos+(z, z_t) * (p . p_t) over train samples above 0.03, each to the power pow (Kim et al., 2023)."""

    name = "relation"
    layers = ("penultimate", "logits")
    needs_fit = True

    def __init__(self, pow: float = 1.0, threshold: float = 0.03):
        self.pow = float(pow)
        self.threshold = float(threshold)
        if not np.isfinite(self.pow) or self.pow <= 0:
            raise ValueError("pow must be > 0")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError("threshold must be in [0, 1)")

    def fit(self, store, backbone, split):
        return {"bank_rows": store.shape(f"{features_node(split, backbone)}/penultimate")[0]}

    def ready(self, store, backbone, split):
        features, probs = [], []
        for block in self.blocks(store, backbone, split, "build bank"):
            features.append(normalize(block["penultimate"].astype(np.float64)).astype(np.float32))
            probs.append(softmax(block["logits"].astype(np.float64), axis=1).astype(np.float32))
        self.bank_features, self.bank_probs = np.concatenate(features), np.concatenate(probs)

    def score_batch(self, batch):
        z = normalize(batch["penultimate"].astype(np.float64))
        p = softmax(batch["logits"].astype(np.float64), axis=1)
        total = np.zeros(len(z))
        for start in range(0, len(self.bank_features), PIECE):
            rows = slice(start, start + PIECE)
            cosine = np.maximum(z @ self.bank_features[rows].astype(np.float64).T, 0.0)
            relation = cosine * (p @ self.bank_probs[rows].astype(np.float64).T)
            kept = np.where(relation > self.threshold, relation, 0.0)
            total += (kept**self.pow).sum(axis=1)
        return total

    def release(self):
        self.bank_features = self.bank_probs = None
