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
