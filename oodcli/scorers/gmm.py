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
GROUP_VALUES = 1 << 22  # whitened values held per group of classes while scoring (32 MiB of float64)


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

    def _lay_out(self):
        """The fitted state laid out for scoring all classes at once: per class its components'
        means in whitened coordinates (mu_k L, padded to the largest component count with weight
        0) and log det L, so one batched product per group of classes replaces a loop over classes."""
        s = self.state
        chol = s["precision_cholesky"]
        classes, dim = len(chol), chol.shape[1]
        counts = np.bincount(s["component_class"], minlength=classes)
        self._white = np.zeros((classes, counts.max(), dim))
        self._log_weight = np.full((classes, counts.max()), -np.inf)
        for c in range(classes):
            comps = np.flatnonzero(s["component_class"] == c)
            self._white[c, : len(comps)] = s["means"][comps] @ chol[c]
            self._log_weight[c, : len(comps)] = np.log(s["weights"][comps])
        self._white_sq = np.sum(self._white**2, axis=2)
        self._log_det = np.array([np.sum(np.log(np.diag(c))) for c in chol])

    def release(self):
        self._white = self._log_weight = self._white_sq = self._log_det = None

    def score_batch(self, batch):
        if getattr(self, "_white", None) is None:  # laid out on the first batch of a fitted or cached state
            self._lay_out()
        s = self.state
        y = (batch["penultimate"].astype(np.float64) - s["mean"]) @ s["basis"]
        dim = y.shape[1]
        chol = s["precision_cholesky"]
        best = np.full(len(y), -np.inf)
        group = max(1, GROUP_VALUES // max(1, len(y) * dim))  # classes whose whitened rows are held at once
        for g in range(0, len(chol), group):
            # log N(y; mu_k, S) = -|yL - mu_k L|^2 / 2 + log det L - dim/2 log 2pi, with S^-1 = L L',
            # the squared distance expanded as |yL|^2 - 2 yL.(mu_k L) + |mu_k L|^2
            white = np.matmul(y[None], chol[g : g + group])  # (classes, rows, dim)
            sq = np.sum(white**2, axis=2)[:, :, None] - 2 * np.matmul(white, self._white[g : g + group].transpose(0, 2, 1))
            sq += self._white_sq[g : g + group, None, :]
            log_density = -0.5 * sq + (self._log_det[g : g + group] - 0.5 * dim * np.log(2 * np.pi))[:, None, None]
            per_class = logsumexp(log_density + self._log_weight[g : g + group, None, :], axis=2)
            best = np.maximum(best, per_class.max(axis=0))
        return best
