"""Balanced sampling (paper Sec. IV-B, Algorithm 1 lines 1-8): weights and their draws.

Procedure 1 gives every training example the weight

    w_i = sum_{k in labels(i)} 1 / c_k

where c_k is the number of training examples labelled k. Procedure 2 then draws N (the
dataset size) examples per epoch with replacement, P(i) = p_i = w_i / W, W = sum_i w_i.

The default training order (``sampling_order="iid"``, :mod:`psla_tf.data.pipeline`) makes
exactly these draws, i.i.d., and reads the drawn records at their offsets
(:mod:`psla_tf.data.record_index`). The sequential ``"stream"`` order draws on the stream
instead: every record is emitted k_i ~ Poisson(N * p_i) times (:func:`poisson_counts`; k_i = 0
rejects it) and the emitted stream is shuffled. A multinomial draw of N items is, conditioned
on its total, exactly what independent Poisson(N p_i) counts give, so the per-example counts
have the paper's distribution, but a record's copies arrive together (bursts the shuffle
buffer only partly spreads); the pipeline fixes the total by cutting the stream at
N // batch_size batches and, in the rare case it runs short, appending a further independent
draw of the same epoch.

The normaliser needs no pass over the data:

    W = sum_i sum_{k in labels(i)} 1/c_k = sum_k (#{i : k in labels(i)}) / c_k
      = sum_{k : c_k > 0} c_k / c_k = #{k : c_k > 0},

the number of classes that occur in the training set (examples without labels get w_i = 0
and are never drawn). All random numbers are stateless and derived from seeds, so a given
(seed, epoch) reproduces the same draw (see :mod:`psla_tf.data.pipeline`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "inverse_class_counts", "balanced_sampling_weights", "total_weight",
    "poisson_rates", "expected_class_frequency", "class_prior", "steps_per_epoch",
    "derive_seed", "seed_to_int", "poisson_counts",
]


def inverse_class_counts(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """1 / c_k for classes that occur (c_k > 0), 0 for the others (float64, ``[C]``)."""
    c = np.asarray(class_counts, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"class_counts must be 1-D, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError("class_counts must be non-negative")
    inv = np.zeros_like(c)
    np.divide(1.0, c, out=inv, where=c > 0)
    return inv


def balanced_sampling_weights(labels: np.ndarray | Sequence[Sequence[int]],
                              class_counts: Sequence[int] | np.ndarray | None = None
                              ) -> np.ndarray:
    """Algorithm 1, Procedure 1: w_i = sum_{k in labels(i)} 1/c_k.

    ``labels`` is either a multi-hot matrix ``[N, C]`` (non-zero = labelled) or a list of
    per-example class-index lists (duplicates within an example count once).
    ``class_counts`` defaults to the counts of ``labels`` themselves (line 1 of Alg. 1);
    pass the training manifest's counts (DataSpec.class_counts) to weight a subset the same
    way as the whole set.
    """
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        hot = labels != 0
        if class_counts is None:
            class_counts = hot.sum(axis=0)
        inv = inverse_class_counts(class_counts)
        if hot.shape[1] != inv.shape[0]:
            raise ValueError(f"labels have {hot.shape[1]} classes, class_counts {inv.shape[0]}")
        return hot.astype(np.float64) @ inv
    sets = [sorted(set(int(k) for k in row)) for row in labels]
    if class_counts is None:
        num_classes = 1 + max((max(s) for s in sets if s), default=-1)
        counts = np.zeros(num_classes, np.int64)
        for s in sets:
            counts[s] += 1
        class_counts = counts
    inv = inverse_class_counts(class_counts)
    return np.array([inv[s].sum() if s else 0.0 for s in sets], dtype=np.float64)


def total_weight(class_counts: Sequence[int] | np.ndarray) -> float:
    """W = sum_i w_i = number of classes with c_k > 0 (see the module docstring)."""
    return float(np.count_nonzero(np.asarray(class_counts) > 0))


def poisson_rates(weights: np.ndarray, num_examples: int, total: float | None = None
                  ) -> np.ndarray:
    """N * p_i = N * w_i / W: the expected number of draws of each example per epoch."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum()) if total is None else float(total)
    if total <= 0:
        raise ValueError("all sampling weights are zero (no example has a label)")
    return num_examples * w / total


def expected_class_frequency(labels: np.ndarray | Sequence[Sequence[int]],
                             class_counts: Sequence[int] | np.ndarray,
                             num_examples: int | None = None,
                             balanced: bool = True) -> np.ndarray:
    """Exact expected number of drawn examples labelled k per epoch (Fig. 5).

    Balanced: N * sum_{i : k in labels(i)} w_i / W; otherwise every example is drawn once,
    so the expectation is c_k (the class's count among ``labels``).
    """
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        hot = (labels != 0).astype(np.float64)
    else:
        num_classes = len(class_counts)
        hot = np.zeros((len(labels), num_classes), np.float64)
        for i, row in enumerate(labels):
            hot[i, list(set(int(k) for k in row))] = 1.0
    n = hot.shape[0] if num_examples is None else num_examples
    if not balanced:
        return hot.sum(axis=0) * (n / hot.shape[0])
    w = balanced_sampling_weights(hot, class_counts)
    return poisson_rates(w, n, total=float(w.sum())) @ hot


def class_prior(label_indptr: np.ndarray, label_indices: np.ndarray, num_classes: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Mean training target of each class ``[C]``: the fraction of drawn examples labelled k
    (mixup keeps it: a mixed target is a convex combination of two draws' targets).

    Labels as CSR (``label_indptr`` ``[N + 1]``, ``label_indices`` ``[nnz]``); ``weights``
    ``[N]``: each example's sampling weight (Algorithm 1's w_i for balanced sampling,
    ``RecordIndex.sampling_weights``), None for every example once: sum_{i : k in labels(i)}
    w_i / W, or c_k / N.
    """
    indptr = np.asarray(label_indptr, np.int64)
    n = indptr.shape[0] - 1
    if n < 1:
        raise ValueError("class_prior needs at least one example")
    w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
    total = w.sum()
    if total <= 0:
        raise ValueError("all sampling weights are zero (no example has a label)")
    mass = np.zeros(int(num_classes), np.float64)
    np.add.at(mass, np.asarray(label_indices, np.int64), np.repeat(w, np.diff(indptr)))
    return mass / total


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch: N // batch_size (the last partial batch is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(num_examples) // int(batch_size)


# ----------------------------------------------------------------------------- TF side
def derive_seed(seed: tf.Tensor | Sequence[int], *data: int | tf.Tensor) -> tf.Tensor:
    """Fold integers into a stateless seed ``[2]`` int64 (one independent stream per tuple)."""
    s = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if s.shape.rank == 0:
        s = tf.stack([s, tf.constant(0x5053_4C41, tf.int64)])  # "PSLA"
    for d in data:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(d, tf.int64))
        s = tf.cast(s, tf.int64)
    return s


def seed_to_int(seed: tf.Tensor) -> tf.Tensor:
    """A scalar int64 op seed (for tf.data's shuffle) from a stateless seed ``[2]``."""
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=2**62, dtype=tf.int64)


def poisson_counts(labels: tf.Tensor, seed: tf.Tensor, inv_counts: tf.Tensor,
                   rate_scale: float) -> tf.Tensor:
    """k_i ~ Poisson(N p_i) for one example (labels: multi-hot ``[C]``; seed ``[2]``).

    ``rate_scale`` = N / W, ``inv_counts`` = 1/c_k (0 for absent classes), so the rate is
    N * w_i / W.
    """
    w = tf.reduce_sum(tf.cast(labels > 0, tf.float64) * tf.cast(inv_counts, tf.float64))
    rate = w * rate_scale
    return tf.random.stateless_poisson([], seed=seed, lam=rate, dtype=tf.int64)
