"""ReAct (Sun et al., 2021): clip penultimate activations at a high percentile of the
train activations, then take the energy through the saved classifier head.

The percentile is exact (numpy's linear interpolation) over every train activation
while the train split has at most ``MAX_VALUES`` of them; above that it is taken over
an evenly strided subsample of rows (every s-th row, read in the same streamed pass),
which keeps memory bounded (64 MiB) and moves a 90th percentile by far less than
the spread between samples.
"""

from __future__ import annotations

import math

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy
from oodcli.store import features_node

MAX_VALUES = 1 << 24  # activations kept for the percentile (16.8M float32 = 64 MiB)


def train_percentiles(scorer: Scorer, store, backbone: str, split: str, *qs: float) -> tuple[list[float], int]:
    """The qs-th percentiles of all train activations (or of a row subsample), from one streamed
    pass; returns ([value per q], row stride)."""
    rows, dim = store.shape(f"{features_node(split, backbone)}/{scorer.layers[0]}")
    stride = max(1, math.ceil(rows * dim / MAX_VALUES))
    kept, start = [], 0
    for block in scorer.blocks(store, backbone, split, "fit pass 1/1"):
        x = block[scorer.layers[0]]
        first = -start % stride  # first row in this block whose global index is a multiple of stride
        kept.append(x[first::stride].ravel())
        start += len(x)
    return [float(v) for v in np.percentile(np.concatenate(kept), qs)], stride


@register
class ReAct(Scorer):
    """Energy after clipping activations at the train split's 90th percentile (Sun et al., 2021)."""

    name = "react"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self, percentile: float = 90.0):
        self.percentile = float(percentile)
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (0, 100]")

    def fit(self, store, backbone, split):
        (threshold,), stride = train_percentiles(self, store, backbone, split, self.percentile)
        return {"threshold": threshold, "row_stride": stride}

    def score_batch(self, batch):
        clipped = np.minimum(batch["penultimate"].astype(np.float64), self.state["threshold"])
        return energy(clipped @ self.weight.T + self.bias)
