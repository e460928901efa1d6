"""NECO (Ben Ammar et al., ICLR 2024): neural-collapse-based OOD detection.

Under neural collapse, ID features of the train set span a low-dimensional simplex while
OOD features fall near its orthogonal complement. Features are standardised by the train
mean and standard deviation (scikit-learn's StandardScaler: population std, a zero std left
as 1), then the score is ||P z|| / ||z||, P the projection on the first d principal
components of the standardised train features (their covariance's top eigenvectors, what
scikit-learn's PCA finds). Fitted in two streamed passes: moments, then the covariance.

Defaults from the authors' code (test_all_ood.py): d = 100, and the ratio multiplied by the
max logit for their ViT and Swin models, not for ResNets: ``maxlogit=true`` asks for that
(it reads the stored logits). On features of 100 dimensions or fewer d = 100 would keep all
of them (a ratio of 1 for every row); the default then takes half, as ViM's default does.

Reading: for DeiT and Swin their script divides by the norm of the raw, unstandardised
feature while projecting the standardised one; the paper's formula (eq. 6) takes both
norms of the same vector, and this follows the paper.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.store import features_node

AUTHORS_DIM = 100


def default_dim(feature_dim: int) -> int:
    """The authors' d = 100, or half the feature size when it has 100 dimensions or fewer."""
    return AUTHORS_DIM if feature_dim > AUTHORS_DIM else max(1, feature_dim // 2)


@register
class NECO(Scorer):
    """NECO: norm of the standardised feature's projection on the first d train principal components over its norm, d = 100 (Ben Ammar et al., 2024)."""

    name = "neco"
    layers = ("penultimate",)
    needs_fit = True

    def __init__(self, dim: int | None = None, maxlogit: bool = False):
        self.dim = None if dim is None else int(dim)
        if self.dim is not None and self.dim < 1:
            raise ValueError("dim must be >= 1")
        self.maxlogit = bool(maxlogit)
        if self.maxlogit:
            self.layers = ("penultimate", "logits")

    def fit(self, store, backbone, split):
        feature_dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        dim = self.dim if self.dim is not None else default_dim(feature_dim)
        if dim >= feature_dim:
            raise UsageError(f"neco.dim={dim} must be below the feature size ({feature_dim})")
        total, total_sq, n = np.zeros(feature_dim), np.zeros(feature_dim), 0
        for block in self.blocks(store, backbone, split, "fit pass 1/2"):
            x = block["penultimate"].astype(np.float64)
            total, total_sq, n = total + x.sum(0), total_sq + (x**2).sum(0), n + len(x)
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
        state = {"mean": mean, "scale": np.where(std > 0, std, 1.0), "dim_used": dim}
        moment = np.zeros((feature_dim, feature_dim))
        for block in self.blocks(store, backbone, split, "fit pass 2/2"):
            z = self.standardised(block["penultimate"], state)
            moment += z.T @ z
        _, vectors = np.linalg.eigh(moment / n)  # ascending; a standardised train set has mean 0
        return state | {"basis": np.ascontiguousarray(vectors[:, ::-1][:, :dim])}

    def standardised(self, x: np.ndarray, state: dict | None = None) -> np.ndarray:
        state = state or self.state
        return (x.astype(np.float64) - state["mean"]) / state["scale"]

    def score_batch(self, batch):
        z = self.standardised(batch["penultimate"])
        ratio = np.linalg.norm(z @ self.state["basis"], axis=1) / np.maximum(np.linalg.norm(z, axis=1), 1e-12)
        return ratio * batch["logits"].astype(np.float64).max(axis=1) if self.maxlogit else ratio
