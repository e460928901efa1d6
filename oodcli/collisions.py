"""Prototype separation (APEX eq. 8) and the inter-class collision analysis of its Table 1.

A prototype's separation score is Q_S = 1 - max cosine to any prototype of another
class. Two prototypes of different classes *collide* when their cosine distance is
below a threshold (the paper uses Q_S < 1e-2). Table 1 counts "colliding prototypes":
its PALM row, 55 and 9.17 %, is 55 of 600 (100 classes x K = 6) prototypes, i.e. it
counts prototypes with Q_S < threshold; the text calls them pairs. We report both:
the prototypes with Q_S below the threshold (and their share of all prototypes), and
every inter-class pair closer than the threshold.
"""

from __future__ import annotations

import numpy as np

from oodcli.errors import OodError

THRESHOLD = 1e-2  # APEX sec. 4.2


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v @ v.T


def separation(vectors: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Q_S of every prototype (eq. 8): 1 - the largest cosine to another class's prototypes."""
    classes = np.asarray(classes)
    if len(np.unique(classes)) < 2:
        raise OodError("separation needs prototypes of at least two classes")
    cos = np.where(classes[:, None] != classes[None, :], cosine_matrix(vectors), -np.inf)
    return 1.0 - cos.max(axis=1)


def find_collisions(
    vectors: np.ndarray, classes: np.ndarray, threshold: float = THRESHOLD, class_names: list[str] | None = None
) -> dict:
    """Table 1's numbers for one set of prototypes, plus the colliding pairs (closest first)."""
    classes = np.asarray(classes, np.int64)
    q_s = separation(vectors, classes)
    cos = cosine_matrix(vectors)
    i, j = np.nonzero(np.triu(classes[:, None] != classes[None, :], 1) & (1.0 - cos < threshold))
    order = np.argsort(1.0 - cos[i, j], kind="stable")

    def name(c: int):
        return class_names[c] if class_names and c < len(class_names) else str(c)

    pairs = [
        {"a": int(a), "class_a": name(classes[a]), "b": int(b), "class_b": name(classes[b]),
         "distance": float(1.0 - cos[a, b])}
        for a, b in zip(i[order], j[order])
    ]
    k = np.bincount(classes)
    k = k[k > 0]
    colliding = int((q_s < threshold).sum())
    return {
        "prototypes": int(len(classes)),
        "classes": int(len(k)),
        "k_min": int(k.min()),
        "k_mean": float(k.mean()),
        "k_max": int(k.max()),
        "threshold": threshold,
        "colliding_prototypes": colliding,
        "share": colliding / len(classes),
        "colliding_pairs": len(pairs),
        "min_q_s": float(q_s.min()),
        "pairs": pairs,
    }


def store_prototypes(store) -> dict[str, dict[str, np.ndarray]]:
    """Every backbone of a store that carries prototypes (``backbones/<name>/prototypes``)."""
    found = {}
    for backbone in store.children("backbones"):
        node = f"backbones/{backbone}/prototypes"
        if store.is_array(f"{node}/vectors") and store.is_array(f"{node}/classes"):
            found[backbone] = {"vectors": store.read(f"{node}/vectors"), "classes": store.read(f"{node}/classes")}
    return found
