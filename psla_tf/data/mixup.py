"""Waveform mixup (paper Sec. IV-C, Algorithm 1 lines 9-15; DESIGN.md "Sampling").

With probability ``rate`` an example i is mixed with a partner j drawn uniformly from the
training set: lambda ~ Beta(alpha, alpha); both waveforms have their mean removed; the
partner is zero-padded or cut to the length of x_i;

    x = lambda * x_i + (1 - lambda) * x_j,  then its mean is removed again;
    y = lambda * y_i + (1 - lambda) * y_j    (multi-hot arithmetic: a label in both gets 1).

Knowledge distillation: an example with ``teacher`` targets [C] and ``has_teacher`` []
(:mod:`psla_tf.data.teacher`) gets ``lambda * t_i + (1 - lambda) * t_j`` (soft targets mix
linearly) and ``has_teacher = min(has_i, has_j)`` (a pair with a clip the teacher did not score
trains on its mixed labels only; its teacher targets are zeroed); likewise ``has_labels =
min(has_i, has_j)`` (a pair with a clip of the unlabelled transfer set has no label term; its
labels are zeroed).

Otherwise the example passes unchanged (lambda = 1; the model's front end removes the mean of
every clip). Beta is sampled as G1 / (G1 + G2) with G1, G2 ~ Gamma(alpha) drawn by the
stateless ``tf.random.stateless_gamma``, so the draw is a pure function of the seed.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["sample_beta", "mix_waveforms", "mixup_example", "mix_waveforms_numpy"]

_TARGET_KEYS = ("teacher", "has_teacher", "has_labels")   # psla_tf.data.teacher.ExampleTargets


def sample_beta(seed: tf.Tensor, alpha: float, shape=()) -> tf.Tensor:
    """lambda ~ Beta(alpha, alpha) from two stateless Gamma(alpha) draws (float32)."""
    g = tf.random.stateless_gamma(list(shape) + [2], seed=seed, alpha=alpha, dtype=tf.float64)
    lam = g[..., 0] / (g[..., 0] + g[..., 1])
    return tf.cast(lam, tf.float32)


def _remove_mean(x: tf.Tensor) -> tf.Tensor:
    n = tf.shape(x)[0]
    mean = tf.math.divide_no_nan(tf.reduce_sum(x), tf.cast(n, x.dtype))
    return x - mean


def mix_waveforms(x_i: tf.Tensor, x_j: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
    """lambda x_i + (1 - lambda) x_j after mean removal and pad/cut of x_j; mean removed again."""
    x_i = _remove_mean(x_i)
    x_j = _remove_mean(x_j)
    n = tf.shape(x_i)[0]
    x_j = x_j[:n]
    x_j = tf.pad(x_j, [[0, n - tf.shape(x_j)[0]]])
    lam = tf.cast(lam, x_i.dtype)
    return _remove_mean(lam * x_i + (1.0 - lam) * x_j)


def mix_waveforms_numpy(x_i: np.ndarray, x_j: np.ndarray, lam: float) -> np.ndarray:
    """NumPy reference of :func:`mix_waveforms` (for tests and tools)."""
    x_i = np.asarray(x_i, np.float64) - np.mean(x_i) if len(x_i) else np.asarray(x_i, np.float64)
    x_j = np.asarray(x_j, np.float64)
    x_j = x_j - x_j.mean() if len(x_j) else x_j
    x_j = np.pad(x_j[:len(x_i)], (0, max(0, len(x_i) - len(x_j))))
    x = lam * x_i + (1.0 - lam) * x_j
    return x - x.mean() if len(x) else x


def mixup_example(example: dict[str, tf.Tensor], partner: dict[str, tf.Tensor],
                  seed: tf.Tensor, rate: float, alpha: float) -> dict[str, tf.Tensor]:
    """Algorithm 1 lines 9-13 for one example and its candidate partner.

    ``example``/``partner``: dicts with ``waveform`` [samples] float32, ``labels`` [C]
    float32 multi-hot and ``key`` int64 (the example's position in the data); ``partner`` may
    also be a function returning that dict, called only when the example is mixed (the
    pipeline parses the partner record only then). Returns the
    example with mixed ``waveform``/``labels`` plus ``mix_lambda`` (1.0 when not mixed),
    ``partner_key`` (-1 when not mixed) and ``partner_id`` (the partner's ``id`` when it has
    one, "" when not mixed).
    """
    u_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    b_seed = tf.random.experimental.stateless_fold_in(seed, 2)
    do_mix = tf.random.stateless_uniform([], seed=u_seed, dtype=tf.float32) < rate

    def mixed():
        p = partner() if callable(partner) else partner
        lam = sample_beta(b_seed, alpha)
        x = mix_waveforms(example["waveform"], p["waveform"], lam)
        y_i, y_j = example["labels"], p["labels"]
        # lambda + (1 - lambda) is not always exactly 1 in float32: a label in both gets 1.
        y = tf.where((y_i > 0) & (y_j > 0), tf.ones_like(y_i), lam * y_i + (1.0 - lam) * y_j)
        pid = p["id"] if "id" in p else tf.constant(b"")
        soft = {}
        if "teacher" in example:
            has = tf.minimum(example["has_teacher"], p["has_teacher"])
            soft = {"teacher": (lam * example["teacher"] + (1.0 - lam) * p["teacher"]) * has,
                    "has_teacher": has}
        if "has_labels" in example:
            has_labels = tf.minimum(example["has_labels"], p["has_labels"])
            y = y * has_labels
            soft["has_labels"] = has_labels
        return x, y, lam, tf.cast(p["key"], tf.int64), pid, soft

    def plain():
        soft = {k: example[k] for k in _TARGET_KEYS if k in example}
        return (example["waveform"], example["labels"], tf.constant(1.0, tf.float32),
                tf.constant(-1, tf.int64), tf.constant(b""), soft)

    x, y, lam, pkey, pid, soft = tf.cond(do_mix, mixed, plain)
    out = dict(example)
    out.update(waveform=x, labels=y, mix_lambda=lam, partner_key=pkey, partner_id=pid, **soft)
    return out
