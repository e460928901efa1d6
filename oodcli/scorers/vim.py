"""Virtual-logit matching, ViM (Wang et al., 2022), and its residual norm alone.

Features are centred on u = -pinv(W) b, the point the head maps to zero logits.
The principal subspace is spanned by the top-D eigenvectors of the centred
second-moment matrix of the train features (accumulated in float64 chunk by chunk);
the residual of a feature is its part outside that subspace.

ViM's virtual logit is alpha * ||x_res||, alpha = sum of train max-logits / sum of
train residual norms, and its score is energy - virtual logit (a monotone function
of minus the virtual class's softmax probability, which is how the paper defines it).
Residual scores -||x_res||.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy
from oodcli.store import features_node


def default_dim(feature_dim: int) -> int:
    """The paper's principal dimension D: 1000 for >= 2048-d features, 512 for >= 768-d, else half."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class _Subspace(Scorer):
    """Shared fit: the origin u and an orthonormal basis of the residual space."""

    layers = ("penultimate",)
    needs_fit = True
    uses_head = True
    fit_passes = 1  # passes over the train split, for the progress labels

    def __init__(self, dim: int | None = None):
        self.dim = None if dim is None else int(dim)

    def fit(self, store, backbone, split):
        feature_dim = store.shape(f"{features_node(split, backbone)}/penultimate")[1]
        dim = self.dim if self.dim is not None else default_dim(feature_dim)
        if not 0 < dim < feature_dim:
            raise UsageError(f"{self.name}.dim={dim} must be between 1 and the feature size - 1 ({feature_dim - 1})")
        origin = -np.linalg.pinv(self.weight) @ self.bias
        moment, n = np.zeros((feature_dim, feature_dim)), 0
        for block in self.blocks(store, backbone, split, f"fit pass 1/{self.fit_passes}"):
            centred = block["penultimate"].astype(np.float64) - origin
            moment += centred.T @ centred
            n += len(centred)
        _, vectors = np.linalg.eigh(moment / n)  # ascending eigenvalues
        residual_basis = np.ascontiguousarray(vectors[:, : feature_dim - dim])  # all but the top `dim`
        return {"origin": origin, "residual_basis": residual_basis, "dim_used": dim}

    def residual_norm(self, x: np.ndarray, state: dict | None = None) -> np.ndarray:
        """||x_res||: the norm of the centred feature's part outside the principal subspace."""
        state = state or self.state
        return np.linalg.norm((x.astype(np.float64) - state["origin"]) @ state["residual_basis"], axis=1)


@register
class ViM(_Subspace):
    """Energy minus the virtual logit alpha * ||x_res|| (Wang et al., 2022); D by feature size."""

    name = "vim"
    fit_passes = 2

    def fit(self, store, backbone, split):
        state = super().fit(store, backbone, split)
        max_logits, residuals = 0.0, 0.0
        for block in self.blocks(store, backbone, split, "fit pass 2/2"):
            x = block["penultimate"]
            max_logits += float(np.sum((x.astype(np.float64) @ self.weight.T + self.bias).max(axis=1)))
            residuals += float(np.sum(self.residual_norm(x, state)))
        if residuals <= 0:
            raise OodError(f"the train features of '{split}' have no residual outside {state['dim_used']} "
                           "principal dimensions; lower vim.dim")
        return state | {"alpha": max_logits / residuals}

    def score_batch(self, batch):
        x = batch["penultimate"]
        logits = x.astype(np.float64) @ self.weight.T + self.bias
        return energy(logits) - self.state["alpha"] * self.residual_norm(x)


@register
class Residual(_Subspace):
    """Minus the norm of the feature outside the principal subspace (ViM's residual alone)."""

    name = "residual"

    def score_batch(self, batch):
        return -self.residual_norm(batch["penultimate"])
