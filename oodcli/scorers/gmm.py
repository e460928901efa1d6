"""Class-conditional Gaussian mixtures on penultimate features (``gmm``).

The train features are centred on their mean and projected on their top ``dim``
principal axes (PCA from the float64 second moment, one streamed pass). Each class
then gets its own mixture of ``components`` Gaussians with one covariance shared by
the components (scikit-learn's ``GaussianMixture``, covariance_type="tied",
k-means init, random_state=0). The score is the largest class log-likelihood
max_c log p(x | c), each mixture density normalised (so classes with broad and
narrow covariances compare fairly).

Readings: OpenOOD's ``gmm`` postprocessor fits one tied mixture of 50 components to
all train features after PCA to 50 dimensions and scores log sum_k w_k exp(-d_k / 2);
it is not class-conditional. The default keeps its PCA to 50 dimensions, its tied
covariance and its seed, and splits its 50 components over classes the way its
CIFAR-10 setting does on average: 5 per class (fewer when a class has fewer rows).
``class_conditional=false components=50`` is OpenOOD's ``gmm`` itself: one mixture over
all train rows, scored by its log density (OpenOOD's score up to a constant shared by
every component under the tied covariance, so the same ranking and the same metrics).

EM needs a class's rows in memory, so the second pass keeps the projected rows (dim
values each) of every s-th train row, s chosen so at most ``MAX_VALUES`` values
(128 MiB of float64) are held; below that every row is used.
"""

from __future__ import annotations

import math

import numpy as np

from oodcli.errors import OodError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import logsumexp
from oodcli.store import features_node

MAX_VALUES = 1 << 24  # projected train values kept for EM


@register
class GMM(Scorer):
    """Largest class log-likelihood under per-class tied Gaussian mixtures on PCA-50 features (OpenOOD's GMM, per class)."""

    name = "gmm"
    layers = ("penultimate",)
    needs_fit = True

    def __init__(self, components: int = 5, dim: int = 50, seed: int = 0, class_conditional: bool = True):
        self.components, self.dim, self.seed = int(components), int(dim), int(seed)
        self.class_conditional = bool(class_conditional)
        if self.components < 1:
            raise ValueError("components must be >= 1")
        if self.dim < 1:
            raise ValueError("dim must be >= 1")

    def fit(self, store, backbone, split):
        from sklearn.mixture import GaussianMixture

        rows, feature_dim = store.shape(f"{features_node(split, backbone)}/penultimate")
        dim = min(self.dim, feature_dim)
        total, moment = np.zeros(feature_dim), np.zeros((feature_dim, feature_dim))
        for block in self.blocks(store, backbone, split, "fit pass 1/2"):
            x = block["penultimate"].astype(np.float64)
            total += x.sum(axis=0)
            moment += x.T @ x
        mean = total / rows
        covariance = moment / rows - np.outer(mean, mean)
        _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
        basis = np.ascontiguousarray(vectors[:, ::-1][:, :dim])
        stride = max(1, math.ceil(rows * dim / MAX_VALUES))
        kept, labels, start = [], [], 0
        for block in self.blocks(store, backbone, split, "fit pass 2/2", labels=True):
            first = -start % stride
            kept.append((block["penultimate"][first::stride].astype(np.float64) - mean) @ basis)
            labels.append(block["labels"][first::stride])
            start += len(block["penultimate"])
        projected, labels = np.concatenate(kept), np.concatenate(labels)
        if not self.class_conditional:  # OpenOOD's gmm: one mixture over every train row
            labels = np.zeros_like(labels)
        means, weights, cholesky, owner = [], [], [], []
        classes = np.unique(labels)
        for c in classes:
            rows_c = projected[labels == c]
            if len(rows_c) < 2:
                raise OodError(f"class {c} of train split '{split}' has {len(rows_c)} row(s) "
                               "(after subsampling); a Gaussian mixture needs at least 2")
            mixture = GaussianMixture(n_components=min(self.components, len(rows_c)), covariance_type="tied",
                                      random_state=self.seed).fit(rows_c)
            means.append(mixture.means_)
            weights.append(mixture.weights_)
            cholesky.append(mixture.precisions_cholesky_)
            owner.append(np.full(len(mixture.weights_), len(owner)))
        return {"mean": mean, "basis": basis, "classes": classes, "means": np.concatenate(means),
                "weights": np.concatenate(weights), "precision_cholesky": np.stack(cholesky),
                "component_class": np.concatenate(owner), "row_stride": stride, "dim_used": dim}

    def score_batch(self, batch):
        s = self.state
        y = (batch["penultimate"].astype(np.float64) - s["mean"]) @ s["basis"]
        dim = y.shape[1]
        best = np.full(len(y), -np.inf)
        for c, chol in enumerate(s["precision_cholesky"]):
            comps = np.flatnonzero(s["component_class"] == c)
            # log N(y; mu_k, S) = -|L'(y - mu_k)|^2 / 2 + log det L - dim/2 log 2pi, with S^-1 = L L'
            diff = (y @ chol)[:, None, :] - (s["means"][comps] @ chol)[None, :, :]
            log_density = -0.5 * np.sum(diff**2, axis=2) + np.sum(np.log(np.diag(chol))) - 0.5 * dim * np.log(2 * np.pi)
            best = np.maximum(best, logsumexp(log_density + np.log(s["weights"][comps]), axis=1))
        return best
