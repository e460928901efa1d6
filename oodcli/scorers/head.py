"""Scores that read the penultimate features, most through the saved classifier head (W [C, D],
b [C]): GradNorm (Huang et al., 2021) and its feature factor, the L1 norm; DICE (Sun & Li, 2022);
the largest cosine to a class prototype (Techapanurak et al., 2020); the pNML regret (Bibas et
al., 2021)."""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register, train_mean
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import features_node
from oodcli.scorers.logits import energy, kl_gradient_l1, log_softmax


def gradnorm(h: np.ndarray, logits: np.ndarray, temperature: float = 1.0, include_bias: bool = False) -> np.ndarray:
    """L1 norm of d KL(u || softmax(z / T)) / dW for z = W h + b, in closed form.

    With u uniform over C classes, d KL / d z = (softmax(z / T) - u) / T =: g, so the
    gradient w.r.t. W is the outer product g h^T, whose L1 norm is ||g||_1 ||h||_1 (the
    paper's U * V); the bias gradient is g itself and adds ||g||_1."""
    h = np.asarray(h, dtype=np.float64)
    return kl_gradient_l1(logits, temperature) * (np.abs(h).sum(axis=1) + (1.0 if include_bias else 0.0))


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


@register
class L1Norm(Scorer):
    """L1 norm ||h||_1 of the penultimate feature, GradNorm's feature-space factor V (Huang et al., 2021).

    The GradNorm paper's analysis (Sec. 5) finds ID features larger in norm, so a larger norm
    scores as more ID here. The ``detectors`` package (Dadalto et al.), which has this method
    under the same name and cites that paper, returns -||h||_1 under its own sign convention.
    """

    name = "l1norm"
    layers = ("penultimate",)

    def __init__(self):
        pass

    def score_batch(self, batch):
        return np.abs(batch["penultimate"].astype(np.float64)).sum(axis=1)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (its cosine to anything is 0)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


PROTOTYPES = ("means", "head")


@register
class MaxCosine(Scorer):
    """Largest cosine similarity between the feature and a class prototype (Techapanurak et al., 2020).

    The paper trains a cosine classifier and scores its largest cosine, prototypes being the
    class weight vectors. For any classifier, post hoc, ``prototypes=means`` (the default)
    takes the class means of the train features, as the ``detectors`` package's MaxCosine does
    (classes absent from the train split have no mean and are left out); ``prototypes=head``
    takes the rows of the saved head W, the paper's reading.
    """

    name = "maxcosine"
    layers = ("penultimate",)
    needs_fit = True

    def __init__(self, prototypes: str = "means"):
        if prototypes not in PROTOTYPES:
            raise UsageError(f"maxcosine.prototypes must be one of {', '.join(PROTOTYPES)}, not {prototypes!r}")
        self.prototypes = prototypes
        self.uses_head = prototypes == "head"
        self.needs_fit = prototypes == "means"

    def fit(self, store, backbone, split):
        dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        blocks = ((b["penultimate"], b["labels"]) for b in self.blocks(store, backbone, split, "fit pass 1/1",
                                                                        labels=True))
        sums, counts = class_sums(blocks, dim)
        seen = np.flatnonzero(counts)
        return {"classes": seen, "means": sums[seen] / counts[seen, None]}

    def ready(self, store, backbone, split):
        self.unit_prototypes = unit_rows(self.state["means"] if self.needs_fit else self.weight)

    def prepare(self, store, backbone, train_split, model_id):
        status = super().prepare(store, backbone, train_split, model_id)
        if not self.needs_fit:
            self.ready(store, backbone, train_split)
        return status

    def score_batch(self, batch):
        return (unit_rows(batch["penultimate"].astype(np.float64)) @ self.unit_prototypes.T).max(axis=1)

    def release(self):
        self.unit_prototypes = None


@register
class PNML(Scorer):
    """1 - pNML regret of the single-layer pNML learner over the normalised features (Bibas et al., 2021).

    Features are scaled to unit L2 norm (train and test alike) and the head is applied to them:
    p = softmax(W x + b). With X the normalised train features, x^T g = x^T (X^T X)^+ x /
    (1 + x^T (X^T X)^+ x), and the regret is log(sum_c p_c / (p_c + (1 - p_c) p_c^(x^T g))) /
    log C, in [0, 1]; the score is 1 - regret, the quantity the authors' code evaluates.
    X^T X is accumulated in float64 over one streamed pass. When it is singular (fewer train
    rows than dimensions) a test feature can leave the train span; the authors' code then
    takes x^T g = max(||x_perp||^2, the above), x_perp the part outside the span, and so does
    this (it is 0 whenever X^T X is invertible). The pseudo-inverse drops eigenvalues below
    numpy's rank tolerance (D * eps * the largest), where the authors' 1e-15 would invert
    rounding noise.
    """

    name = "pnml"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        gram = np.zeros((dim, dim))
        for block in self.blocks(store, backbone, split, "fit pass 1/1"):
            x = unit_rows(block["penultimate"].astype(np.float64))
            gram += x.T @ x
        values, vectors = np.linalg.eigh(gram)
        keep = values > dim * np.finfo(np.float64).eps * max(values.max(), 0.0)
        if not keep.any():
            raise OodError(f"pnml: the train features of '{split}' are all zero; nothing spans them")
        basis = vectors[:, keep]
        return {"inverse": (basis / values[keep]) @ basis.T, "basis": basis, "rank": int(keep.sum())}

    def ready(self, store, backbone, split):
        if self.weight.shape[0] < 2:
            raise OodError("pnml needs a head with at least two classes (the regret is normalised by log C)")
        if self.weight.shape[1] != self.state["inverse"].shape[0]:
            raise OodError(f"pnml: the head takes {self.weight.shape[1]} features but the train features have "
                           f"{self.state['inverse'].shape[0]}; re-extract")

    def score_batch(self, batch):
        x = unit_rows(batch["penultimate"].astype(np.float64))
        inside = np.abs(np.sum((x @ self.state["inverse"]) * x, axis=1))  # x^T (X^T X)^+ x, through BLAS
        xtg = inside / (1.0 + inside)
        if self.state["rank"] < x.shape[1]:  # the part of x outside the train span counts fully
            outside = np.maximum(np.sum(x * x, axis=1) - np.sum((x @ self.state["basis"]) ** 2, axis=1), 0.0)
            xtg = np.maximum(xtg, outside)
        log_p = log_softmax(x @ self.weight.T + self.bias, axis=1)
        # p / (p + (1 - p) p^a) = 1 / (1 + (1 - p) p^(a - 1)), no 0/0 where p underflows
        with np.errstate(over="ignore"):
            terms = 1.0 / (1.0 + -np.expm1(log_p) * np.exp((xtg[:, None] - 1.0) * log_p))
        return 1.0 - np.log(terms.sum(axis=1)) / np.log(log_p.shape[1])
