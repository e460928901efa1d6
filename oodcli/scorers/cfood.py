"""CF-OOD (Angiulli, Fassetti & Zupi): the Concentration-Free Outlier Factor on features.

CFOF (Angiulli, TKDD 2020) scores a point x by how large a neighbourhood must be before an
appreciable share of the data counts x among its neighbours: the smallest fraction kappa
such that x is among the kappa * n nearest neighbours of at least rho * n reference points.
Being a reverse-neighbour count it does not concentrate in high dimensions, where plain
distances do. Score: -kappa (a point close to many ID points needs a small neighbourhood).

As the authors' postprocessor in OpenOOD (cfood_postprocessor.py, their cfood.yml):
L2-normalised penultimate features; the reference set is a random fraction (0.1) of the
train split; each reference point's squared distances to the others are kept at a grid of
neighbourhood fractions kappa (100 values over 0.001..0.1, 81 over 0.105..0.5, 49 over 0.51..0.99,
at ranks int(kappa * n) - 1 counted after the point itself, repeated ranks dropped); x is
within the kappa-neighbourhood of reference point i when that distance is at least
||x - r_i||^2; kappa is the first grid value where the share of such i reaches rho = 0.01
(1 when none does). OpenOOD calls rho ``k`` and the fraction ``alpha``.

The reference set is held while scoring (as KNN's index is); fitting sorts n x n distances.
``fitted/cfood`` keeps the reference rows' positions and their grid distances, not the features.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.scorers.knn import normalize
from oodcli.store import features_node

BLOCK = 1024  # reference rows whose distances are sorted at once
QUERY = 256  # scored rows compared with the reference set at once (a QUERY x n distance matrix)


def kappa_grid() -> np.ndarray:
    """The neighbourhood fractions the authors' code evaluates."""
    return np.concatenate([np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)])


def grid_ranks(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(kappa values, neighbour ranks) for a reference set of n points, repeated ranks dropped."""
    kappas = kappa_grid()
    ranks = (kappas * n - 1).astype(np.int64)
    keep = np.r_[True, ranks[:-1] < ranks[1:]]
    return kappas[keep], ranks[keep]


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2.0 * a @ b.T, 0.0)


@register
class CFOOD(Scorer):
    """CF-OOD: minus the concentration-free outlier factor of the normalised feature among train references (Angiulli et al.)."""

    name = "cfood"
    layers = ("penultimate",)
    needs_fit = True

    def __init__(self, rho: float = 0.01, fraction: float = 0.1, seed: int = 0):
        self.rho = float(rho)
        if not 0.0 < self.rho <= 1.0:
            raise ValueError("rho must be in (0, 1]")
        self.fraction = float(fraction)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        self.seed = int(seed)

    def fit(self, store, backbone, split):
        rows = store.shape(f"{features_node(split, backbone)}/penultimate")[0]
        n = int(self.fraction * rows) if self.fraction < 1.0 else rows
        if n < 2:
            raise UsageError(f"cfood.fraction={self.fraction} keeps {n} of the {rows} train rows; "
                             "it needs 2 reference points at least")
        chosen = np.sort(np.random.default_rng(self.seed).choice(rows, n, replace=False))
        reference = self.reference(store, backbone, split, chosen)
        kappas, ranks = grid_ranks(n)
        knn = np.empty((n, len(ranks)))
        for lo in range(0, n, BLOCK):  # +1: the point itself is its own nearest neighbour
            knn[lo : lo + BLOCK] = np.sort(squared_distances(reference[lo : lo + BLOCK], reference), axis=1)[:, ranks + 1]
        self._reference = reference
        return {"rows": chosen, "knn": knn, "kappas": kappas}

    def reference(self, store, backbone, split, chosen: np.ndarray) -> np.ndarray:
        """The normalised train rows ``chosen`` (ascending), read in one streamed pass."""
        parts, start = [], 0
        for block in self.blocks(store, backbone, split, "reference set"):
            x = block["penultimate"]
            inside = chosen[(chosen >= start) & (chosen < start + len(x))] - start
            parts.append(normalize(x[inside].astype(np.float64)))
            start += len(x)
        return np.concatenate(parts)

    def ready(self, store, backbone, split):
        # the fitted state keeps the rows and their neighbour distances; the features are re-read
        ref = getattr(self, "_reference", None)
        self._reference = ref if ref is not None else self.reference(store, backbone, split, self.state["rows"])
        knn = self.state["knn"]
        # each row of knn ascends; offset row i by i * (2 * span) so that one sorted array
        # answers every row's search at once (squared distances of unit vectors are <= 4)
        self.offset = 2.0 * (float(knn.max()) + 4.0) * np.arange(len(knn))
        self.flat = (knn + self.offset[:, None]).ravel()
        self.row_start = np.arange(len(knn)) * knn.shape[1]
        n = len(knn)
        self.needed = next(m for m in range(max(1, int(self.rho * n) - 1), n + 1) if m / n >= self.rho)

    def score_batch(self, batch):
        x = normalize(batch["penultimate"].astype(np.float64))
        return np.concatenate([self._kappa(x[lo : lo + QUERY]) for lo in range(0, len(x), QUERY)]) * -1.0

    def _kappa(self, x: np.ndarray) -> np.ndarray:
        ref, kappas = self._reference, self.state["kappas"]
        n, steps = len(ref), len(kappas)
        # first grid step at which reference i's neighbourhood reaches x (steps: never) ...
        first = np.searchsorted(self.flat, squared_distances(x, ref) + self.offset, side="left") - self.row_start
        # ... and the first step at which at least m of them do, m the fewest with m / n >= rho
        step = np.partition(first, self.needed - 1, axis=1)[:, self.needed - 1]
        return np.where(step < steps, kappas[np.minimum(step, steps - 1)], 1.0)

    def release(self):
        self.flat = self._reference = None
