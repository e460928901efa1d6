"""Scores computed from the classifier's logits alone: MSP, MaxLogit, Energy."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from oodcli.scorers.base import Scorer, register


@register
class MSP(Scorer):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def __init__(self):
        pass

    def score_batch(self, batch):
        return softmax(np.asarray(batch["logits"], dtype=np.float64), axis=1).max(axis=1)


@register
class MaxLogit(Scorer):
    """Largest unnormalised logit (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def __init__(self):
        pass

    def score_batch(self, batch):
        return batch["logits"].max(axis=1)


@register
class Energy(Scorer):
    """Negative free energy T * logsumexp(logits / T) (Liu et al., 2020); T = 1 as published."""

    name = "energy"

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)

    def score_batch(self, batch):
        t = self.temperature
        return t * logsumexp(np.asarray(batch["logits"], dtype=np.float64) / t, axis=1)
