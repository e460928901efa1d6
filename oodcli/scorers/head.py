"""Scores that read the penultimate features through the saved classifier head (W [C, D], b [C]):
GradNorm (Huang et al., 2021) and DICE (Sun & Li, 2022)."""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register, train_mean
from oodcli.scorers.logits import energy, softmax


def gradnorm(h: np.ndarray, logits: np.ndarray, temperature: float = 1.0, include_bias: bool = False) -> np.ndarray:
    """L1 norm of d KL(u || softmax(z / T)) / dW for z = W h + b, in closed form.

    With u uniform over C classes, d KL / d z = (softmax(z / T) - u) / T =: g, so the
    gradient w.r.t. W is the outer product g h^T, whose L1 norm is ||g||_1 ||h||_1 (the
    paper's U * V); the bias gradient is g itself and adds ||g||_1."""
    h = np.asarray(h, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    g = np.abs(softmax(z / temperature, axis=1) - 1.0 / z.shape[1]).sum(axis=1) / temperature
    return g * (np.abs(h).sum(axis=1) + (1.0 if include_bias else 0.0))


@register
class GradNorm(Scorer):
    """L1 norm of the head's gradient of KL(uniform || softmax(logits / T)), T = 1 (Huang et al., 2021).

    Computed in closed form from the features and the head (no autograd). As in the paper's
    code and OpenOOD the gradient is w.r.t. the weight W only; ``include_bias=true`` adds the
    bias gradient. OpenOOD back-propagates the cross-entropy to an all-ones target, which is
    C times this KL gradient: the same ranking, scores C times larger.
    """

    name = "gradnorm"
    layers = ("penultimate",)
    uses_head = True

    def __init__(self, temperature: float = 1.0, include_bias: bool = False):
        self.temperature = float(temperature)
        self.include_bias = bool(include_bias)
        if not self.temperature > 0:
            raise UsageError(f"gradnorm.temperature must be positive, not {self.temperature}")

    def score_batch(self, batch):
        h = batch["penultimate"].astype(np.float64)
        return gradnorm(h, h @ self.weight.T + self.bias, self.temperature, self.include_bias)


@register
class DICE(Scorer):
    """Energy through a head sparsified to its top 10% contributions W * mean train feature (Sun & Li, 2022).

    The contribution of weight (c, d) is W[c, d] times the mean of feature d over the ID train
    split; weights whose contribution is at or below the p-th percentile of all C x D
    contributions (numpy's linear interpolation) are zeroed. p = 90 as in OpenOOD and the
    paper's CIFAR setting (the paper uses p = 70 on ImageNet).
    """

    name = "dice"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self, percentile: float = 90.0):
        self.percentile = float(percentile)
        if not 0.0 <= self.percentile < 100.0:
            raise UsageError(f"dice.percentile must be in [0, 100), not {self.percentile}")

    def fit(self, store, backbone, split):
        return {"mean_feature": train_mean(self, store, backbone, split)}

    def ready(self, store, backbone, split):
        contribution = self.weight * self.state["mean_feature"][None, :]
        keep = contribution > np.percentile(contribution, self.percentile)
        self.masked_weight = np.where(keep, self.weight, 0.0)

    def score_batch(self, batch):
        return energy(batch["penultimate"].astype(np.float64) @ self.masked_weight.T + self.bias)

    def release(self):
        self.masked_weight = None
