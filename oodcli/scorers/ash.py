"""Activation shaping, ASH (Djurisic et al., 2023): per sample, zero every penultimate
activation below its own p-th percentile (keep the k = D - round(D * p / 100)
largest), then reshape what is left and take the energy through the saved head:

- ASH-P only prunes;
- ASH-S rescales the kept values by exp(sum before / sum after);
- ASH-B sets every kept value to (sum before) / k.

The store holds pooled penultimate vectors, so ASH acts on those (the paper also
shapes the feature map before pooling). It assumes non-negative (post-ReLU)
activations, as the paper does. Default p = 90 for all three variants (the paper
tunes p per variant and backbone).
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy


def top_k_mask(x: np.ndarray, percentile: float) -> tuple[np.ndarray, int]:
    """Boolean mask of the k largest values in each row, k = D - round(D * p / 100)."""
    dim = x.shape[1]
    k = dim - int(round(dim * percentile / 100.0))
    if k < 1:
        raise UsageError(f"percentile {percentile} keeps none of {dim} activations; lower it")
    idx = np.argpartition(x, dim - k, axis=1)[:, dim - k :]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask, k


class _ASH(Scorer):
    layers = ("penultimate",)
    uses_head = True

    def __init__(self, percentile: float = 90.0):
        self.percentile = float(percentile)
        if not 0.0 <= self.percentile < 100.0:
            raise ValueError("percentile must be in [0, 100)")

    def shape(self, x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def score_batch(self, batch):
        x = batch["penultimate"].astype(np.float64)
        mask, k = top_k_mask(x, self.percentile)
        return energy(self.shape(x, mask, k) @ self.weight.T + self.bias)


@register
class ASHP(_ASH):
    """ASH-P: energy after pruning activations below each sample's 90th percentile (Djurisic et al., 2023)."""

    name = "ash-p"

    def shape(self, x, mask, k):
        return np.where(mask, x, 0.0)


@register
class ASHS(_ASH):
    """ASH-S: prune below the 90th percentile, rescale by exp(sum before / sum after), energy (Djurisic et al., 2023)."""

    name = "ash-s"

    def shape(self, x, mask, k):
        pruned = np.where(mask, x, 0.0)
        before, after = x.sum(axis=1), pruned.sum(axis=1)
        ok = after > 0  # an all-zero sample has nothing to rescale
        scale = np.exp(np.divide(before, after, out=np.zeros_like(before), where=ok))
        return pruned * np.where(ok, scale, 1.0)[:, None]


@register
class ASHB(_ASH):
    """ASH-B: prune below the 90th percentile, set kept values to sum / k, energy (Djurisic et al., 2023)."""

    name = "ash-b"

    def shape(self, x, mask, k):
        return mask * (x.sum(axis=1) / k)[:, None]
