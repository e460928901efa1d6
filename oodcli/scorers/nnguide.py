"""Nearest-neighbour guidance, NNGuide (Park et al., ICCV 2023).

The guide bank is a subset of the train split: each L2-normalised penultimate feature
scaled by its own confidence, the energy logsumexp(logits). A feature z is scored by
its energy times the guidance: the mean inner product of z / ||z|| with its k nearest
guide vectors (faiss ``IndexFlatIP``, exact). The guidance tells an overconfident OOD
sample, far from every confident train feature, from an ID one.

Defaults are OpenOOD's: k = 100 and a bank of 1% of the train split
(``bank_fraction = 0.01``). The bank is every s-th train row, s = round(1 / bank_fraction)
(OpenOOD takes the first loader batches; an even stride covers the split and is
reproducible). k is capped at the bank size (``k_used`` in the fitted state), as a
small train split gives a bank of fewer than k rows. The bank is small enough to keep
under ``fitted/nnguide`` (float32, what faiss searches), so a cached run reads no
train rows.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, register
from oodcli.scorers.knn import normalize
from oodcli.scorers.logits import energy


@register
class NNGuide(Scorer):
    """Energy times the mean similarity to the k nearest confidence-scaled train features (Park et al., 2023)."""

    name = "nnguide"
    layers = ("penultimate", "logits")
    needs_fit = True

    def __init__(self, k: int = 100, bank_fraction: float = 0.01):
        self.k = int(k)
        self.bank_fraction = float(bank_fraction)
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if not 0.0 < self.bank_fraction <= 1.0:
            raise ValueError("bank_fraction must be in (0, 1]")

    def fit(self, store, backbone, split):
        stride = max(1, round(1.0 / self.bank_fraction))
        guides, start = [], 0
        for block in self.blocks(store, backbone, split, "fit pass 1/1"):
            first = -start % stride  # first row of this block whose global index is a multiple of stride
            z, logits = block["penultimate"][first::stride], block["logits"][first::stride]
            guides.append(normalize(z.astype(np.float64)) * energy(logits)[:, None])
            start += len(block["penultimate"])
        bank = np.concatenate(guides).astype(np.float32)
        return {"bank": bank, "row_stride": stride, "k_used": min(self.k, len(bank))}

    def ready(self, store, backbone, split):
        import faiss

        bank = np.ascontiguousarray(self.state["bank"], dtype=np.float32)
        self.index = faiss.IndexFlatIP(bank.shape[1])
        self.index.add(bank)

    def score_batch(self, batch):
        query = np.ascontiguousarray(normalize(batch["penultimate"].astype(np.float64)), dtype=np.float32)
        similarity, _ = self.index.search(query, int(self.state["k_used"]))
        return energy(batch["logits"]) * similarity.astype(np.float64).mean(axis=1)

    def release(self):
        self.index = None
