"""Scores of inputs perturbed at extraction (``oodcli extract --perturb``, ``oodcli.perturb``):
ODIN (Liang et al., 2018) and Mahalanobis with input preprocessing (Lee et al., 2018).

The perturbation's settings (T, eps, the Mahalanobis fit split) were fixed when the
layer was extracted; these scorers read them from the layer's attributes, refuse splits
perturbed differently, and record them with the scores. 'score all' runs them only on
stores that hold the perturbed layers.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import softmax
from oodcli.store import features_node


def recorded_settings(store, backbone: str, splits: list[str], layer: str) -> dict:
    """The perturbation settings of ``layer``, the same on every split, or a one-line error."""
    seen = {}
    for split in splits:
        attrs = store.node_attrs(f"{features_node(split, backbone)}/{layer}")
        seen[split] = {k: v for k, v in attrs.items() if k != "complete"}
    first, settings = next(iter(seen.items()))
    for split, other in seen.items():
        if other != settings:
            diff = sorted(k for k in set(settings) | set(other) if settings.get(k) != other.get(k))
            raise OodError(f"splits '{first}' and '{split}' hold '{layer}' perturbed with different settings "
                           f"({', '.join(diff)}); re-extract them with the same --perturb and --overwrite")
    return settings


@register
class ODIN(Scorer):
    """ODIN: max softmax of logits / T on the input perturbed at extraction, T = 1000, eps = 0.0014 (Liang et al., 2018)."""

    name = "odin"
    layers = ("logits@odin",)

    def __init__(self):
        self.settings: dict = {}

    def hparams(self) -> dict:
        return {k: self.settings[k] for k in ("temperature", "epsilon") if k in self.settings}

    def complete_inputs(self, store, backbone: str, splits: list[str]) -> list[str]:
        self.settings = recorded_settings(store, backbone, splits, self.layers[0])
        return []

    def score_batch(self, batch):
        logits = np.asarray(batch["logits@odin"], dtype=np.float64) / float(self.settings["temperature"])
        return softmax(logits, axis=1).max(axis=1)


@register
class MahalanobisPerturbed(Scorer):
    """Mahalanobis on penultimate features of the input moved toward its closest class mean at extraction (Lee et al., 2018)."""

    name = "mahalanobis-perturbed"
    layers = ("penultimate@mahalanobis",)
    min_train_classes = 2

    def __init__(self):
        self.settings: dict = {}

    def hparams(self) -> dict:
        return {k: self.settings[k] for k in ("epsilon", "train") if k in self.settings}

    def complete_inputs(self, store, backbone: str, splits: list[str]) -> list[str]:
        """The Gaussian of the train split the perturbation used (the Mahalanobis scorer's fit),
        refused if those train features changed since."""
        from oodcli.perturb import fit_reference, reference_fingerprint
        from oodcli.scorers.mahalanobis import Distances

        self.settings = recorded_settings(store, backbone, splits, self.layers[0])
        train = self.settings["train"]
        if not store.exists(features_node(train, backbone)) or \
                reference_fingerprint(store, backbone, train) != self.settings.get("train_fingerprint"):
            raise OodError(f"the '{backbone}' features of train split '{train}' changed since these splits were "
                           f"perturbed; re-extract them with --perturb mahalanobis --overwrite")
        model_id = store.node_attrs(features_node(splits[0], backbone)).get("model_id")
        state = fit_reference(store, backbone, train, model_id)
        self.classes = Distances(state["means"], state["precision"])
        return []

    def score_batch(self, batch):
        return -self.classes.min_sq(batch["penultimate@mahalanobis"])
