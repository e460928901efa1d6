"""OOD metrics for scores where higher = more in-distribution, in both conventions in use.

``fpr95``, ``aupr_in``, ``aupr_out`` treat ID as the positive class (MCM, NegLabel and most
CLIP-OOD papers): FPR@95 is the share of OOD scored at or above the threshold that keeps 95%
of ID; AUPR is the step sum (average precision). ``fpr95_openood``, ``aupr_in_openood``,
``aupr_out_openood`` follow OpenOOD v1.5 (``openood/evaluators/metrics.py``), which treats OOD
as positive: FPR@95 is the share of ID flagged OOD at the first threshold that catches 95% of
OOD, and AUPR is the trapezoid under scikit-learn's precision-recall curve. The two FPR@95 can
differ by tens of points on the same scores, so a number is only comparable with a table of
its own convention. AUROC is the same in both.

Written with one sort each (no scikit-learn at run time) and checked against
scikit-learn in the tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from oodcli.errors import OodError


@dataclass(frozen=True)
class OodMetrics:
    fpr95: float  # share of OOD scored >= the threshold that keeps 95% of ID
    auroc: float
    aupr_in: float  # ID positive, step sum
    aupr_out: float  # OOD positive (scores negated), step sum
    fpr95_openood: float  # OpenOOD v1.5: share of ID scored <= the threshold that catches 95% of OOD
    aupr_in_openood: float  # OpenOOD v1.5: trapezoid under the precision-recall curve
    aupr_out_openood: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise OodError("cannot compute OOD metrics: the ID or the OOD score set is empty")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise OodError("cannot compute OOD metrics: scores contain NaN or inf; re-score the split")
    return id_scores, ood_scores


def id_threshold(id_scores, tpr: float = 0.95) -> float:
    """The largest threshold t whose ID recall share(id_scores >= t) is at least ``tpr``: the
    ceil(tpr * n)-th highest ID score. Scores tied at t are all kept, so the recall exceeds
    ``tpr`` only when scores tie there."""
    desc = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())[::-1]
    if desc.size == 0:
        raise OodError("cannot set a threshold on an empty score set")
    if not np.isfinite(desc).all():
        raise OodError("cannot set a threshold: the scores contain NaN or inf; re-score the split")
    k = max(1, math.ceil(tpr * desc.size - 1e-9))
    return float(desc[k - 1])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """FPR at the largest threshold whose ID recall (TPR) is at least ``tpr``."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    return float(np.mean(ood_scores >= id_threshold(id_scores, tpr)))


def fpr_at_ood_recall(id_scores, ood_scores, recall: float = 0.95) -> float:
    """OpenOOD v1.5's FPR@95 (OOD positive): the share of ID scored at or below the smallest
    threshold that flags ``recall`` of the OOD set (``roc_curve(is_ood, -score)``, first point
    with TPR >= recall)."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    asc = np.sort(ood_scores)
    k = max(1, math.ceil(recall * asc.size - 1e-9))
    threshold = asc[k - 1]
    return float(np.mean(id_scores <= threshold))


def _pr_curve(pos_scores: np.ndarray, neg_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at each distinct threshold, highest score first."""
    scores = np.concatenate([pos_scores, neg_scores])
    is_pos = np.concatenate([np.ones(pos_scores.size), np.zeros(neg_scores.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    # last index of each run of equal scores: thresholds sit between distinct values
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(is_pos)[last]
    return tp / (last + 1), tp / pos_scores.size


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what scipy.stats.rankdata gives by default;
    written here because importing scipy.stats costs a second at every report)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return ((last - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def auroc(id_scores, ood_scores) -> float:
    """P(score_ID > score_OOD) + 0.5 P(tie), by the Mann-Whitney rank sum."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    ranks = average_ranks(np.concatenate([id_scores, ood_scores]))
    n_pos, n_neg = id_scores.size, ood_scores.size
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(pos_scores, neg_scores) -> float:
    """Area under the precision-recall curve as the step sum over distinct thresholds."""
    precision, recall = _pr_curve(*_check(pos_scores, neg_scores))
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def trapezoid_aupr(pos_scores, neg_scores) -> float:
    """OpenOOD's AUPR: ``auc(recall, precision)`` of scikit-learn's ``precision_recall_curve``,
    i.e. the trapezoid rule from the point (recall 0, precision 1) through every distinct
    threshold."""
    precision, recall = _pr_curve(*_check(pos_scores, neg_scores))
    return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def ood_metrics(id_scores, ood_scores) -> OodMetrics:
    id_scores, ood_scores = _check(id_scores, ood_scores)
    return OodMetrics(
        fpr95=fpr_at_tpr(id_scores, ood_scores, 0.95),
        auroc=auroc(id_scores, ood_scores),
        aupr_in=average_precision(id_scores, ood_scores),
        aupr_out=average_precision(-ood_scores, -id_scores),
        fpr95_openood=fpr_at_ood_recall(id_scores, ood_scores, 0.95),
        aupr_in_openood=trapezoid_aupr(id_scores, ood_scores),
        aupr_out_openood=trapezoid_aupr(-ood_scores, -id_scores),
    )


def accuracy(logits_or_pred: np.ndarray, labels: np.ndarray) -> float:
    pred = logits_or_pred.argmax(1) if logits_or_pred.ndim == 2 else logits_or_pred
    labels = np.asarray(labels)
    if labels.size == 0:
        raise OodError("cannot compute accuracy on an empty split")
    return float(np.mean(pred == labels))
