"""APEX's posterior-aware OOD score (PAOS, eq. 10-13) and PALM's Mahalanobis score.

PAOS calibrates the class-wise Mahalanobis distance (class means, one shared
covariance: ``fit_gaussians`` of the Mahalanobis scorer) by each class's confidence,
the negative free energy of its prototypes' qualities:

    Conf(c) = tau_q * log sum_k exp(Q(p_k^c) / tau_q),   Q = Q_C + Q_S       (eq. 12)
    S(h)    = min_c (h - mu_c)^T Sigma^-1 (h - mu_c) / (1 + alpha * Conf(c))  (eq. 13)

and the stored score is -S (higher = more ID). alpha = 0.5 is the paper's best value
(sec. 4.4.4). The paper gives no tau_q; 1.0 (the Gibbs distribution at unit
temperature) is our default. Ablations (Table 4): ``cohesion=false`` drops Q_C,
``separation=false`` drops Q_S, ``alpha=0`` is plain Mahalanobis (APM's score).

Which features: "h is the input sample feature from the backbone network", with "the
feature embeddings from the penultimate layer" (sec. 4.1), so ``layer`` defaults to
``penultimate``: the trained encoder's output for end-to-end models. For a head-only
model over a frozen backbone that layer did not learn anything, so score its
``embedding`` (``-p apex.layer=embedding``), the space the prototypes live in.

The prototype qualities are read from ``backbones/<backbone>/prototypes/`` (vectors,
classes, q_c, q_s), which extract writes for ``apex``/``palm`` models; any other
prototype method (the paper applies PAOS to CIDER) can put its prototypes there too.
Both methods need such a backbone; without ``--backbone``, ``score`` picks the one named
after the method (``apex``, ``palm``) when the store holds it.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.logits import logsumexp
from oodcli.scorers.mahalanobis import Distances, fit_gaussians

PROTOTYPES = ("vectors", "classes", "q_c", "q_s")


def class_confidence(q: np.ndarray, proto_class: np.ndarray, classes: np.ndarray, tau_q: float) -> np.ndarray:
    """Conf(c) of eq. (12) for each label in ``classes``."""
    conf = np.empty(len(classes))
    for i, c in enumerate(classes):
        own = q[proto_class == c]
        if len(own) == 0:
            raise OodError(f"class {c} has no prototype; the prototypes do not match the train split")
        conf[i] = tau_q * logsumexp(own / tau_q)
    return conf


def load_prototypes(store, backbone: str, model_id: str | None) -> dict[str, np.ndarray]:
    """``backbones/<backbone>/prototypes/*``, refused when they belong to other weights than the features."""
    node = f"backbones/{backbone}"
    if not all(store.is_array(f"{node}/prototypes/{name}") for name in PROTOTYPES):
        raise OodError(
            f"store {store.path} has no prototypes for '{backbone}' ({node}/prototypes); score a model trained "
            "with 'oodcli train apex|palm' and extracted with --model apex|palm, e.g. --backbone apex"
        )
    owner = store.node_attrs(node).get("model_id")
    if model_id is not None and owner is not None and owner != model_id:
        raise OodError(f"the '{backbone}' prototypes in {store.path} come from other weights than the features; re-extract")
    return {name: store.read(f"{node}/prototypes/{name}") for name in PROTOTYPES}


@register
class PAOS(Scorer):
    """APEX's PAOS: Mahalanobis distance to each class mean, divided by 1 + alpha * Conf(c) from prototype qualities."""

    name = "apex"
    layers = ("penultimate",)
    needs_fit = True
    min_train_classes = 2

    def __init__(self, alpha: float = 0.5, tau_q: float = 1.0, cohesion: bool = True, separation: bool = True,
                 layer: str = "penultimate"):
        if alpha < 0 or tau_q <= 0:
            raise ValueError("alpha must be >= 0 and tau_q > 0")
        if not (cohesion or separation) and alpha:
            raise UsageError("with both cohesion and separation off there is no quality; use alpha=0 instead")
        self.alpha, self.tau_q, self.cohesion, self.separation = float(alpha), float(tau_q), cohesion, separation
        self.layer = layer
        self.layers = (layer,)

    def applicable(self, store, backbone, train_split):
        """'score all' includes it only on a backbone that carries prototypes."""
        return all(store.is_array(f"backbones/{backbone}/prototypes/{name}") for name in PROTOTYPES)

    def fit(self, store, backbone, split):
        state = fit_gaussians(self, store, backbone, split, background=False)
        model_id = store.node_attrs(f"splits/{split}/{backbone}").get("model_id")
        protos = load_prototypes(store, backbone, model_id)
        q = self.cohesion * protos["q_c"].astype(np.float64) + self.separation * protos["q_s"].astype(np.float64)
        state["conf"] = class_confidence(q, protos["classes"], state["classes"], self.tau_q)
        return state

    def ready(self, store, backbone, split):
        self.distances = Distances(self.state["means"], self.state["precision"])
        self.scale = 1.0 + self.alpha * np.asarray(self.state["conf"], np.float64)
        if (self.scale <= 0).any():
            raise OodError(f"1 + alpha * Conf(c) is not positive for some class (alpha={self.alpha}); lower alpha")

    def score_batch(self, batch):
        return -(self.distances.sq(batch[self.layer]) / self.scale).min(axis=1)


@register
class PALM(PAOS):
    """PALM's score: Mahalanobis distance on a PALM/APM model's features (PAOS with alpha = 0)."""

    name = "palm"

    def __init__(self, layer: str = "penultimate"):
        super().__init__(alpha=0.0, layer=layer)
