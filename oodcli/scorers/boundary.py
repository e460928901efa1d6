"""Feature-space distance to the decision boundaries, fDBD (Liu & Qin, ICML 2024).

For the predicted class f and every other class j, the distance of the penultimate
feature z to the hyperplane where their logits tie is |l_f - l_j| / ||w_f - w_j||
(logits through the saved head, bias included, in float64). fDBD averages it over
the C - 1 other classes and divides by ||z - mu||, mu the mean train feature: ID
features lie far from the boundaries relative to their spread around the mean.

Readings: the paper averages over the other classes; OpenOOD sums them, which only
scales every score by C - 1 (same ranking, same AUROC). ``normalizer="mean"`` is the
paper's and OpenOOD's default; ``"norm"`` divides by ||z|| instead, the alternative
OpenOOD sweeps (``distance_as_normalizer: False``).
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError
from oodcli.scorers.base import Scorer, register, train_mean

NORMALIZERS = ("mean", "norm")


def boundary_denominators(weight: np.ndarray) -> np.ndarray:
    """[C, C] matrix of ||w_p - w_j||, with 1 on the diagonal (the predicted class's own term is 0 anyway)."""
    sq = np.sum(weight**2, axis=1)
    diff = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * weight @ weight.T, 0.0))  # no [C, C, D] temporary
    np.fill_diagonal(diff, 1.0)
    return diff


@register
class FDBD(Scorer):
    """Mean feature distance to the predicted class's decision boundaries over ||z - train mean|| (Liu & Qin, 2024)."""

    name = "fdbd"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self, normalizer: str = "mean"):
        self.normalizer = str(normalizer)
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {', '.join(NORMALIZERS)}")

    def fit(self, store, backbone, split):
        return {"train_mean": train_mean(self, store, backbone, split)}

    def ready(self, store, backbone, split):
        if self.weight.shape[0] < 2:
            raise OodError("fdbd needs a head with at least 2 classes (it measures distances between classes)")
        self.denominators = boundary_denominators(self.weight)

    def score_batch(self, batch):
        z = batch["penultimate"].astype(np.float64)
        logits = z @ self.weight.T + self.bias
        pred = logits.argmax(axis=1)
        top = logits[np.arange(len(z)), pred]
        distances = np.abs(top[:, None] - logits) / self.denominators[pred]
        mean_distance = distances.sum(axis=1) / (logits.shape[1] - 1)
        reference = z - self.state["train_mean"] if self.normalizer == "mean" else z
        return mean_distance / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
