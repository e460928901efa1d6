"""OpenMax (Bendale & Boult, 2016): per class, the mean activation vector (MAV, here the
logits) of the correctly classified ID train samples and a Weibull model of the largest
distances of those samples to it; at test time the top-alpha logits are shrunk by their
Weibull CDF and the removed mass becomes the logit of an unknown class.

Follows the authors' code as OpenOOD runs it: euclidean distance in logit space (the paper's
code also offers ``eucos`` = euclidean / 200 + cosine), tail of 20, alpha = 3, rank weights
(alpha + 1 - i) / alpha for the i-th largest logit. The Weibull fit reproduces libMR's
``FitHigh`` with scipy: the tail is translated by 10000 - min(tail) and a two-parameter
Weibull (location 0) is fitted by maximum likelihood; the CDF is evaluated on distances
translated the same way.

A class with fewer than two correctly classified train samples (or a tail of equal
distances) has no Weibull model; its Weibull CDF counts as 1 (fully unknown), as
pytorch-ood does for classes it never saw.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import logsumexp
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import features_node

TRANSLATION = 10000.0  # libMR's translate_amount for FitHigh
EUCOS_EUCLIDEAN_WEIGHT = 1.0 / 200.0  # the authors' eucos distance: euclidean / 200 + cosine
DISTANCES = ("euclidean", "eucos")
OUTPUTS = ("known", "max")


def fit_weibull(values: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood shape and scale of a Weibull with location 0 (scipy.stats)."""
    from scipy.stats import weibull_min

    shape, _, scale = weibull_min.fit(np.asarray(values, dtype=np.float64), floc=0)
    return float(shape), float(scale)


def weibull_cdf(x: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """1 - exp(-(x / scale)^shape) for x >= 0, else 0 (numpy, so scoring imports no scipy)."""
    x = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    with np.errstate(over="ignore"):
        return -np.expm1(-np.power(x / scale, shape))


def distances(z: np.ndarray, means: np.ndarray, kind: str) -> np.ndarray:
    """Distance of each row of z [N, C] to each of its mean vectors means [N, K, C] -> [N, K]."""
    euclidean = np.linalg.norm(z[:, None, :] - means, axis=2)
    if kind == "euclidean":
        return euclidean
    norms = np.linalg.norm(z, axis=1)[:, None] * np.linalg.norm(means, axis=2)
    cosine = 1.0 - np.einsum("nc,nkc->nk", z, means) / np.maximum(norms, 1e-300)
    return EUCOS_EUCLIDEAN_WEIGHT * euclidean + cosine


@register
class OpenMax(Scorer):
    """Log-odds of 1 - P(unknown) of the OpenMax layer, Weibull tails of logit distances to class means (Bendale & Boult, 2016).

    The score is log((1 - P(unknown)) / P(unknown)), the same ranking as 1 - P(unknown) but
    without its saturation at 1.0 in float32 (on the digits benchmark most ID and near-OOD
    samples tie there); it ranks exactly as OpenOOD's confidence (-P(unknown)), so it gives
    OpenOOD's metrics. ``output=max`` scores the largest of the C + 1 OpenMax probabilities
    (the unknown class's included), the confidence of Bendale & Boult's decision rule, which
    is not what OpenOOD reports.
    """

    name = "openmax"
    layers = ("logits",)
    needs_fit = True

    def __init__(self, tailsize: int = 20, alpha: int = 3, distance: str = "euclidean", output: str = "known"):
        self.tailsize, self.alpha = int(tailsize), int(alpha)
        self.distance, self.output = str(distance), str(output)
        if self.tailsize < 2 or self.alpha < 1:
            raise UsageError(f"openmax needs tailsize >= 2 and alpha >= 1, not {self.tailsize} and {self.alpha}")
        if self.distance not in DISTANCES:
            raise UsageError(f"openmax.distance must be one of {', '.join(DISTANCES)}, not {self.distance!r}")
        if self.output not in OUTPUTS:
            raise UsageError(f"openmax.output must be one of {', '.join(OUTPUTS)}, not {self.output!r}")

    def _correct(self, store, backbone, split, what):
        for block in self.blocks(store, backbone, split, what, labels=True):
            z = block["logits"].astype(np.float64)
            right = z.argmax(axis=1) == block["labels"]
            if right.any():
                yield z[right], block["labels"][right]

    def fit(self, store, backbone, split):
        classes = store.shape(f"{features_node(split, backbone)}/logits")[1]
        sums, counts = class_sums(self._correct(store, backbone, split, "fit pass 1/2"), classes)
        mavs = np.zeros((classes, classes))
        mavs[: len(counts)] = sums / np.maximum(counts, 1)[:, None]
        tails = [np.zeros(0) for _ in range(classes)]
        for z, y in self._correct(store, backbone, split, "fit pass 2/2"):
            d = distances(z, mavs[y][:, None, :], self.distance)[:, 0]
            for c in np.unique(y):
                merged = np.concatenate([tails[c], d[y == c]])
                tails[c] = np.sort(merged)[-self.tailsize :]
        shape, scale, shift = np.ones(classes), np.ones(classes), np.zeros(classes)
        modelled = np.zeros(classes, np.int8)
        for c, tail in enumerate(tails):
            if len(tail) >= 2 and np.ptp(tail) > 0:
                shift[c] = TRANSLATION - tail.min()
                shape[c], scale[c] = fit_weibull(tail + shift[c])
                modelled[c] = 1
        return {"mavs": mavs, "shape": shape, "scale": scale, "shift": shift, "modelled": modelled}

    def score_batch(self, batch):
        z = np.asarray(batch["logits"], dtype=np.float64)
        s = self.state
        alpha = min(self.alpha, z.shape[1])
        top = np.argpartition(-z, alpha - 1, axis=1)[:, :alpha]  # the alpha largest logits ...
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(z, top, axis=1), axis=1), axis=1)  # largest first
        rank_weight = (alpha + 1 - np.arange(1, alpha + 1)) / alpha
        d = distances(z, s["mavs"][top], self.distance)
        w = np.where(s["modelled"][top] == 1, weibull_cdf(d + s["shift"][top], s["shape"][top], s["scale"][top]), 1.0)
        rows = np.arange(len(z))[:, None]
        z_top = z[rows, top]
        revised = z.copy()
        revised[rows, top] = z_top * (1.0 - w * rank_weight)
        unknown = np.sum(z_top * w * rank_weight, axis=1)
        if self.output == "max":
            log_norm = logsumexp(np.concatenate([revised, unknown[:, None]], axis=1), axis=1)
            return np.exp(np.maximum(revised.max(axis=1), unknown) - log_norm)
        return logsumexp(revised, axis=1) - unknown  # log((1 - P(unknown)) / P(unknown))
