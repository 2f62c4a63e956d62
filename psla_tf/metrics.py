"""Evaluation metrics of the paper (Sec. II-B): per-class AP and ROC AUC, mAP, mean AUC, d′.

mAP is the mean over classes of sklearn's ``average_precision_score``; AUC the mean of
``roc_auc_score``; d′ = √2 · Φ⁻¹(mean AUC) (Φ⁻¹ = ``scipy.stats.norm.ppf``), as the reference
computes them. A class with no positive example in the evaluation set has no defined AP or
AUC (and a class with no negative no AUC): it is left out of the means and listed in
``excluded_ap`` / ``excluded_auc`` instead of being silently counted as 0 or NaN.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def _binarise(targets: np.ndarray) -> np.ndarray:
    """Soft targets (e.g. mixup-style) → {0, 1} by thresholding at 0.5."""
    return (np.asarray(targets, dtype=np.float64) >= 0.5).astype(np.int64)


def _check(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(targets)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or s.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"targets and scores must both be [examples, classes]; got "
                         f"{t.shape} and {s.shape}")
    if t.shape[0] == 0:
        raise ValueError("cannot evaluate an empty set (0 examples)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return _binarise(t), s


def d_prime(auc: float) -> float:
    """d′ = √2 · Φ⁻¹(AUC) (Sec. II-B)."""
    return float(np.sqrt(2.0) * stats.norm.ppf(auc))


def per_class_ap(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of every class; NaN where the class has no positive example."""
    t, s = _check(targets, scores)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        if t[:, k].any():
            out[k] = skm.average_precision_score(t[:, k], s[:, k])
    return out


def per_class_auc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every class; NaN where the class lacks positives or negatives."""
    t, s = _check(targets, scores)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        if t[:, k].any() and not t[:, k].all():
            out[k] = skm.roc_auc_score(t[:, k], s[:, k])
    return out


def evaluate(targets: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """All multi-label metrics of one score matrix (Sec. II-B).

    Returns ``mAP``, ``AUC``, ``d_prime`` (floats), ``AP``/``AUC_per_class`` (arrays with NaN
    for excluded classes), ``excluded_ap``/``excluded_auc`` (class indices left out of the
    means) and ``num_examples``.
    """
    ap = per_class_ap(targets, scores)
    auc = per_class_auc(targets, scores)
    excluded_ap = np.flatnonzero(np.isnan(ap))
    excluded_auc = np.flatnonzero(np.isnan(auc))
    m_ap = float(np.nanmean(ap)) if len(excluded_ap) < len(ap) else float("nan")
    m_auc = float(np.nanmean(auc)) if len(excluded_auc) < len(auc) else float("nan")
    return {
        "mAP": m_ap,
        "AUC": m_auc,
        "d_prime": d_prime(m_auc) if np.isfinite(m_auc) else float("nan"),
        "AP": ap,
        "AUC_per_class": auc,
        "excluded_ap": excluded_ap.tolist(),
        "excluded_auc": excluded_auc.tolist(),
        "num_examples": int(np.asarray(targets).shape[0]),
    }


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    """Single-label accuracy: argmax of the scores equals argmax of the targets."""
    t = np.asarray(targets)
    s = np.asarray(scores)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"targets and scores must both be [examples, classes]; got "
                         f"{t.shape} and {s.shape}")
    return float(np.mean(np.argmax(t, axis=1) == np.argmax(s, axis=1)))


def bce(targets: np.ndarray, scores: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of clamped scores (the training loss, in NumPy)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), eps, 1.0 - eps)
    t = np.asarray(targets, dtype=np.float64)
    return float(-np.mean(t * np.log(p) + (1.0 - t) * np.log(1.0 - p)))


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The JSON-friendly scalars of an :func:`evaluate` result."""
    return {k: float(result[k]) for k in ("mAP", "AUC", "d_prime")}
