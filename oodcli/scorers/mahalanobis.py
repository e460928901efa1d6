"""Gaussian scores on penultimate features: Mahalanobis (Lee et al., 2018) and
Relative Mahalanobis, RMDS (Ren et al., 2021).

Both fit class means and one covariance shared by all classes (the maximum-likelihood
estimate, divided by N) in two streamed passes over the train split: class sums, then
the scatter around the class means, accumulated in float64 chunk by chunk. RMDS's
class-agnostic covariance is that within-class scatter plus the between-class scatter
of the means. Precision matrices are pseudo-inverses, so a singular covariance
(N < D) still works.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register


def class_sums(blocks, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature sums and counts over streamed blocks (classes are label values)."""
    sums, counts = np.zeros((0, dim)), np.zeros(0, np.int64)
    for x, y in blocks:
        k = int(y.max()) + 1
        if k > len(counts):
            sums = np.vstack([sums, np.zeros((k - len(counts), dim))])
            counts = np.r_[counts, np.zeros(k - len(counts), np.int64)]
        order = np.argsort(y, kind="stable")
        ys = y[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ys)) + 1]
        sums[ys[starts]] += np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        counts += np.bincount(y, minlength=len(counts))
    return sums, counts


def fit_gaussians(scorer: Scorer, store, backbone: str, split: str, background: bool) -> dict:
    """Class means + shared precision (and, with ``background``, the class-agnostic Gaussian)."""
    layer = scorer.layers[0]

    def labelled(what):
        for b in scorer.blocks(store, backbone, split, what, labels=True):
            yield b[layer], b["labels"]

    dim = store.shape(f"splits/{split}/{backbone}/{layer}")[1]
    sums, counts = class_sums(labelled("fit pass 1/2"), dim)
    n = counts.sum()
    means_by_label = sums / np.maximum(counts, 1)[:, None]
    mean0 = sums.sum(0) / n
    scatter = np.zeros((dim, dim))
    for x, y in labelled("fit pass 2/2"):
        diff = x.astype(np.float64) - means_by_label[y]
        scatter += diff.T @ diff
    classes = np.flatnonzero(counts)
    means = means_by_label[classes]
    state = {"classes": classes, "means": means, "precision": np.linalg.pinv(scatter / n, hermitian=True)}
    if background:
        # total scatter = within-class scatter + between-class scatter (no third pass needed)
        between = (means - mean0).T @ ((means - mean0) * counts[classes][:, None])
        state |= {"mean0": mean0, "precision0": np.linalg.pinv((scatter + between) / n, hermitian=True)}
    return state


class Distances:
    """min_c (x - mu_c)^T P (x - mu_c) per row, expanded as x'Px - 2 x'P mu_c + mu_c'P mu_c
    so a block costs two matmuls; the class terms are computed once."""

    def __init__(self, means: np.ndarray, precision: np.ndarray):
        self.precision = precision
        self.means_p = means @ precision  # [C, D]
        self.const = np.sum(self.means_p * means, axis=1)  # [C]

    def sq(self, x: np.ndarray) -> np.ndarray:
        """Squared distance of every row to every class mean, [N, C]."""
        x = x.astype(np.float64)
        quad = np.sum((x @ self.precision) * x, axis=1)
        return quad[:, None] - 2.0 * x @ self.means_p.T + self.const

    def min_sq(self, x: np.ndarray) -> np.ndarray:
        return self.sq(x).min(axis=1)


@register
class Mahalanobis(Scorer):
    """Negative smallest squared Mahalanobis distance to a class mean, shared covariance (Lee et al., 2018)."""

    name = "mahalanobis"
    layers = ("penultimate",)
    needs_fit = True
    min_train_classes = 2

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        return fit_gaussians(self, store, backbone, split, background=False)

    def ready(self, store, backbone, split):
        self.classes = Distances(self.state["means"], self.state["precision"])

    def score_batch(self, batch):
        return -self.classes.min_sq(batch["penultimate"])


@register
class RMDS(Scorer):
    """Relative Mahalanobis: -min_c [MD_c(x) - MD_0(x)], MD_0 from one class-agnostic Gaussian (Ren et al., 2021)."""

    name = "rmds"
    layers = ("penultimate",)
    needs_fit = True
    min_train_classes = 2

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        return fit_gaussians(self, store, backbone, split, background=True)

    def ready(self, store, backbone, split):
        self.classes = Distances(self.state["means"], self.state["precision"])
        self.background = Distances(self.state["mean0"][None, :], self.state["precision0"])

    def score_batch(self, batch):
        x = batch["penultimate"]
        return -(self.classes.min_sq(x) - self.background.min_sq(x))
