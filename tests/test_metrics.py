"""Metrics (Sec. II-B) against hand-worked cases and independent NumPy/sklearn computations."""
import numpy as np
import pytest
from sklearn import metrics as skm

from psla_tf import metrics


def _np_ap(t, s):
    """AP without ties: mean over positives of the precision at their rank."""
    order = np.argsort(-s)
    hits = t[order]
    prec = np.cumsum(hits) / np.arange(1, len(t) + 1)
    return prec[hits == 1].mean()


def _np_auc(t, s):
    """AUC as the fraction of (positive, negative) pairs ranked correctly (ties count 1/2)."""
    pos, neg = s[t == 1], s[t == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_hand_case():
    t = np.array([[1, 0], [0, 1], [1, 0]])
    s = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.3]])
    r = metrics.evaluate(t, s)
    # class 0: ranks 0.9(+) 0.8(-) 0.1(+) → AP = (1 + 2/3) / 2, AUC = 1/2
    # class 1: 0.7(+) first → AP 1, AUC 1
    assert r["AP"] == pytest.approx([(1 + 2 / 3) / 2, 1.0])
    assert r["AUC_per_class"] == pytest.approx([0.5, 1.0])
    assert r["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert r["AUC"] == pytest.approx(0.75)
    assert r["num_examples"] == 3 and r["excluded_ap"] == [] and r["excluded_auc"] == []


def test_d_prime_known_values():
    assert metrics.d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    # Φ(1/√2) = 0.760249938... so d′ = √2 · (1/√2) = 1
    assert metrics.d_prime(0.7602499389065233) == pytest.approx(1.0, abs=1e-9)


def test_random_against_numpy_and_sklearn():
    rng = np.random.default_rng(0)
    t = (rng.random((200, 12)) < 0.2).astype(np.float32)
    s = np.clip(0.3 * t + rng.random((200, 12)), 0, 1)
    r = metrics.evaluate(t, s)
    ap = [_np_ap(t[:, k], s[:, k]) for k in range(12)]
    auc = [_np_auc(t[:, k], s[:, k]) for k in range(12)]
    np.testing.assert_allclose(r["AP"], ap, rtol=1e-10)
    np.testing.assert_allclose(r["AUC_per_class"], auc, rtol=1e-10)
    assert r["mAP"] == pytest.approx(skm.average_precision_score(t, s, average="macro"))
    assert r["AUC"] == pytest.approx(skm.roc_auc_score(t, s, average="macro"))
    assert r["d_prime"] == pytest.approx(np.sqrt(2) * __import__("scipy").stats.norm.ppf(np.mean(auc)))
    assert r["mAP"] > 0.4  # the signal is real: far above the ~0.2 of chance


def test_classes_without_positives_or_negatives_are_excluded():
    rng = np.random.default_rng(1)
    t = (rng.random((50, 4)) < 0.3).astype(float)
    t[:, 1] = 0  # no positives: no AP, no AUC
    t[:, 3] = 1  # no negatives: AP = 1 trivially, AUC undefined
    s = rng.random((50, 4))
    r = metrics.evaluate(t, s)
    assert r["excluded_ap"] == [1]
    assert r["excluded_auc"] == [1, 3]
    assert r["AP"][3] == pytest.approx(1.0)
    assert r["mAP"] == pytest.approx(np.mean([_np_ap(t[:, k], s[:, k]) for k in (0, 2, 3)]))
    assert r["AUC"] == pytest.approx(np.mean([_np_auc(t[:, k], s[:, k]) for k in (0, 2)]))


def test_soft_targets_threshold_at_half():
    s = np.array([[0.9], [0.2], [0.6], [0.1]])
    soft = np.array([[0.8], [0.3], [0.55], [0.0]])
    hard = np.array([[1], [0], [1], [0]])
    assert metrics.evaluate(soft, s)["mAP"] == metrics.evaluate(hard, s)["mAP"] == 1.0


def test_accuracy_bce_and_errors():
    t = np.eye(3)[[0, 1, 2, 1]]
    s = np.array([[0.8, 0.1, 0.1], [0.1, 0.5, 0.4], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    assert metrics.accuracy(t, s) == 0.75
    p = np.clip(s, 1e-7, 1 - 1e-7)
    assert metrics.bce(t, s) == pytest.approx(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
    with pytest.raises(ValueError, match="examples, classes"):
        metrics.evaluate(t[:, :2], s)
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate(t, s * np.nan)
