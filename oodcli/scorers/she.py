"""SHE, simplified Hopfield energy (Zhang et al., 2023): each class stores one pattern, the mean
penultimate feature of its correctly classified ID train samples; a sample scores the inner
product of its feature with the pattern of the class it is predicted as."""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import features_node


@register
class SHE(Scorer):
    """Inner product of the feature with its predicted class's mean correct train feature (Zhang et al., 2023).

    The prediction is the argmax of the stored logits. A class with no correctly classified
    train sample has no pattern (OpenOOD's mean of nothing is NaN); it gets the zero pattern,
    so samples predicted as that class score 0.
    """

    name = "she"
    layers = ("penultimate", "logits")
    needs_fit = True

    def __init__(self):
        pass

    def fit(self, store, backbone, split):
        node = features_node(split, backbone)
        dim, classes = store.shape(f"{node}/penultimate")[1], store.shape(f"{node}/logits")[1]

        def correct():
            for block in self.blocks(store, backbone, split, "fit pass 1/1", labels=True):
                right = block["logits"].argmax(axis=1) == block["labels"]
                yield block["penultimate"][right], block["labels"][right]

        sums, counts = class_sums((b for b in correct() if len(b[1])), dim)
        patterns, correct_counts = np.zeros((classes, dim)), np.zeros(classes, np.int64)
        patterns[: len(counts)] = sums / np.maximum(counts, 1)[:, None]
        correct_counts[: len(counts)] = counts
        return {"patterns": patterns, "correct_per_class": correct_counts}

    def score_batch(self, batch):
        x = batch["penultimate"].astype(np.float64)
        return np.sum(x * self.state["patterns"][batch["logits"].argmax(axis=1)], axis=1)
