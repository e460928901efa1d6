"""Variational rectified activation, VRA (Xu et al., NeurIPS 2023).

The paper's variational optimum suppresses abnormally low and high activations; VRA
approximates it piecewise with two thresholds a < b taken as percentiles of the train
activations: v(z) = 0 for z < a, z for a <= z <= b, b for z > b. The rectified
penultimate feature goes through the saved head and is scored by energy.

Readings: the function is the paper's (and the authors' code: values below a become
0). Defaults are the paper's CIFAR-10 VRA setting, the 60th and 90th percentiles.
OpenOOD's postprocessor differs: it clips from below to a instead of zeroing and uses
the 10th and 90th percentiles of the ID validation split; ``below="clip"`` with
``low=10`` reproduces its rule on the train split. Percentiles are ReAct's
(``oodcli.scorers.react.train_percentiles``, both from one pass: exact up to its row-subsampling
cap).
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import energy
from oodcli.scorers.react import train_percentiles

BELOW = ("zero", "clip")


@register
class VRA(Scorer):
    """Energy after zeroing activations below the train's 60th percentile and clipping above its 90th (Xu et al., 2023)."""

    name = "vra"
    layers = ("penultimate",)
    needs_fit = True
    uses_head = True

    def __init__(self, low: float = 60.0, high: float = 90.0, below: str = "zero"):
        self.low, self.high, self.below = float(low), float(high), str(below)
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError("need 0 <= low < high <= 100 (percentiles of the train activations)")
        if self.below not in BELOW:
            raise ValueError(f"below must be one of {', '.join(BELOW)}")

    def fit(self, store, backbone, split):
        (low, high), stride = train_percentiles(self, store, backbone, split, self.low, self.high)
        return {"threshold_low": low, "threshold_high": high, "row_stride": stride}

    def score_batch(self, batch):
        z = batch["penultimate"].astype(np.float64)
        low, high = self.state["threshold_low"], self.state["threshold_high"]
        rectified = np.minimum(z, high)
        rectified = np.where(z < low, 0.0 if self.below == "zero" else low, rectified)
        return energy(rectified @ self.weight.T + self.bias)
