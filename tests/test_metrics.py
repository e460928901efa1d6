import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodcli.errors import OodError
from oodcli.metrics import accuracy, auroc, average_precision, fpr_at_tpr, ood_metrics


def _sklearn_fpr95(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    return fpr[np.searchsorted(tpr, 0.95, side="left")]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_equal_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.0, 300 + 37 * seed)
    ood_s = rng.normal(0.0, 1.5, 200 + 11 * seed)
    if ties:  # heavy ties, as from float16 or max-softmax saturation
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    assert auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(id_s, ood_s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert average_precision(-ood_s, -id_s) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(_sklearn_fpr95(id_s, ood_s), abs=1e-12)
    m = ood_metrics(id_s, ood_s)
    assert m.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.aupr_out == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)


def test_fpr95_definition_on_a_hand_case():
    id_s = np.arange(1, 21, dtype=float)  # 20 ID scores 1..20: 95% kept at threshold 2
    ood_s = np.array([0.0, 1.5, 2.0, 3.0])
    assert fpr_at_tpr(id_s, ood_s) == 0.5  # 2.0 and 3.0 are >= 2


def test_perfect_and_inverted_separation():
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert fpr_at_tpr([2, 3], [0, 1]) == 0.0


def test_bad_scores_are_refused():
    with pytest.raises(OodError, match="empty"):
        ood_metrics([], [1.0])
    with pytest.raises(OodError, match="NaN"):
        ood_metrics([np.nan, 1.0], [1.0])


def test_accuracy():
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_average_ranks_equal_scipy_rankdata_with_ties():
    from scipy.stats import rankdata

    from oodcli.metrics import average_ranks

    rng = np.random.default_rng(3)
    for _ in range(50):
        x = rng.integers(0, 15, rng.integers(1, 200)).astype(np.float32)
        np.testing.assert_allclose(average_ranks(x), rankdata(x))


def _openood_metrics(id_s, ood_s):
    """OpenOOD v1.5's own formulas (openood/evaluators/metrics.py): OOD positive, conf negated."""
    from sklearn import metrics

    conf = np.r_[id_s, ood_s]
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr_list, tpr_list, _ = metrics.roc_curve(is_ood, -conf)
    fpr = fpr_list[np.argmax(tpr_list >= 0.95)]
    p_in, r_in, _ = metrics.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = metrics.precision_recall_curve(is_ood, -conf)
    return fpr, metrics.auc(fpr_list, tpr_list), metrics.auc(r_in, p_in), metrics.auc(r_out, p_out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_openood_convention_equals_openood_formula(seed, ties):
    from oodcli.metrics import fpr_at_ood_recall, trapezoid_aupr

    rng = np.random.default_rng(100 + seed)
    id_s = rng.normal(1.0, 1.0, 280 + 41 * seed)
    ood_s = rng.normal(0.0, 1.5, 180 + 13 * seed)
    if ties:
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    fpr, au, aupr_in, aupr_out = _openood_metrics(id_s, ood_s)
    assert fpr_at_ood_recall(id_s, ood_s) == pytest.approx(fpr, abs=1e-12)
    assert trapezoid_aupr(id_s, ood_s) == pytest.approx(aupr_in, abs=1e-12)
    assert trapezoid_aupr(-ood_s, -id_s) == pytest.approx(aupr_out, abs=1e-12)
    m = ood_metrics(id_s, ood_s)
    assert m.auroc == pytest.approx(au, abs=1e-12)  # AUROC is the same in both conventions
    assert (m.fpr95_openood, m.aupr_in_openood, m.aupr_out_openood) == pytest.approx((fpr, aupr_in, aupr_out), abs=1e-12)


def test_the_two_fpr95_conventions_on_a_hand_case():
    from oodcli.metrics import fpr_at_ood_recall

    # 20 OOD scores 0..19: 95% of OOD is caught at "score <= 18"; ID 10..29 -> 9 of 20 ID (10..18) flagged
    ood_s = np.arange(20, dtype=float)
    id_s = np.arange(10, 30, dtype=float)
    assert fpr_at_ood_recall(id_s, ood_s) == pytest.approx(9 / 20)
    # ID positive: 95% of ID kept at "score >= 11"; OOD 11..19 kept -> 9 of 20
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(9 / 20)
    # 10% of OOD sits inside the ID range: few OOD pass ID's 5% quantile (ID positive), but OOD's
    # 95% quantile lies deep in ID, so half of ID is flagged (OpenOOD)
    id_s = np.arange(100, dtype=float)
    ood_s = np.r_[-np.arange(1, 91, dtype=float), np.arange(50, 60, dtype=float)]
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(10 / 100)  # threshold 5: OOD 50..59 kept
    assert fpr_at_ood_recall(id_s, ood_s) == pytest.approx(55 / 100)  # threshold 54: ID 0..54 flagged


@pytest.mark.parametrize("case", ["all_tied", "perfect", "inverted", "single"])
def test_openood_convention_edge_cases(case):
    from oodcli.metrics import fpr_at_ood_recall, trapezoid_aupr

    id_s, ood_s = {
        "all_tied": (np.zeros(10), np.zeros(7)),
        "perfect": (np.arange(10.0) + 100, np.arange(7.0)),
        "inverted": (np.arange(10.0), np.arange(7.0) + 100),
        "single": (np.array([1.0]), np.array([0.0])),
    }[case]
    fpr, _, aupr_in, aupr_out = _openood_metrics(id_s, ood_s)
    assert fpr_at_ood_recall(id_s, ood_s) == pytest.approx(fpr, abs=1e-12)
    assert trapezoid_aupr(id_s, ood_s) == pytest.approx(aupr_in, abs=1e-12)
    assert trapezoid_aupr(-ood_s, -id_s) == pytest.approx(aupr_out, abs=1e-12)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(_sklearn_fpr95(id_s, ood_s), abs=1e-12)
