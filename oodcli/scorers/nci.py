"""Neural-collapse-inspired detector, NCI (Liu & Qin, CVPR 2025).

Under neural collapse, ID features centred on the train mean mu point along their
predicted class's head weight vector and lie far from the origin. The score adds
the two cues: w_f . (z - mu) / ||z - mu|| (proximity to the predicted class f's weight
vector) + alpha * ||z||_1 (the norm filter).

Reading: the paper calls the first term an angular proximity; the authors' own code
(their OpenOOD postprocessor) does not divide by ||w_f||, and this follows it, so the
numbers match OpenOOD's. alpha = 1e-4 is OpenOOD's default (its sweep: 1e-4 ... 0.1).
The prediction is argmax of the logits through the saved head.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register, train_mean


@register
class NCI(Scorer):
    """Proximity of z - train mean to the predicted class's weight vector + alpha * ||z||_1 (Liu & Qin, 2025)."""

    name = "nci"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self, alpha: float = 1e-4):
        self.alpha = float(alpha)
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError("alpha must be a finite number >= 0")

    def fit(self, store, backbone, split):
        return {"train_mean": train_mean(self, store, backbone, split)}

    def score_batch(self, batch):
        z = batch["penultimate"].astype(np.float64)
        pred = (z @ self.weight.T + self.bias).argmax(axis=1)
        centred = z - self.state["train_mean"]
        proximity = np.sum(self.weight[pred] * centred, axis=1) / np.maximum(np.linalg.norm(centred, axis=1), 1e-12)
        return proximity + self.alpha * np.abs(z).sum(axis=1)
