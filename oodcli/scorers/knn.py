"""Deep nearest neighbours (Sun et al., 2022): L2-normalised penultimate features,
score = minus the Euclidean distance to the k-th nearest train feature.

The faiss index is the normalised train features themselves (exact search,
``IndexFlatL2``), held in RAM while scoring; the scored split is streamed. Storing a
flat index would only copy the train split, so ``fitted/knn`` keeps the resolved k
and the train identity, and the index is rebuilt from the train split in one
streamed pass on each run.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.store import features_node

IMAGENET_SIZE = 1_000_000  # train rows from which the ImageNet setting (k = 1000) applies


def default_k(train_rows: int) -> int:
    """The paper's k: 50 on CIFAR-size train sets, 1000 on ImageNet-size ones (>= 1M rows);
    never more than the train split has."""
    return min(1000 if train_rows >= IMAGENET_SIZE else 50, train_rows)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


@register
class KNN(Scorer):
    """Minus the distance to the k-th nearest normalised train feature (Sun et al., 2022); k by train size."""

    name = "knn"
    layers = ("penultimate",)
    needs_fit = True

    def __init__(self, k: int | None = None):
        self.k = None if k is None else int(k)
        if self.k is not None and self.k < 1:
            raise ValueError("k must be >= 1")

    def fit(self, store, backbone, split):
        rows = store.shape(f"{features_node(split, backbone)}/{self.layers[0]}")[0]
        if self.k is not None and self.k > rows:
            raise UsageError(f"knn.k={self.k} but train split '{split}' has only {rows} rows; pick a smaller k")
        return {"k_used": self.k or default_k(rows)}

    def ready(self, store, backbone, split):
        import faiss

        dim = store.shape(f"{features_node(split, backbone)}/{self.layers[0]}")[1]
        self.index = faiss.IndexFlatL2(dim)
        for block in self.blocks(store, backbone, split, "build index"):
            self.index.add(np.ascontiguousarray(normalize(block["penultimate"]), dtype=np.float32))

    def score_batch(self, batch):
        query = np.ascontiguousarray(normalize(batch["penultimate"]), dtype=np.float32)
        sq_dist, _ = self.index.search(query, int(self.state["k_used"]))  # ascending squared L2
        return -np.sqrt(np.maximum(sq_dist[:, -1], 0.0))

    def release(self):
        self.index = None
