"""Waveform mixup (paper Sec. IV-C, Alg. 1 lines 9-15): λ distribution, rate, waveform and
label arithmetic, and the partner drawn uniformly from the whole training set.

Statistical tests use fixed seeds; each threshold is stated where it is checked.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.data import pipeline, records
from psla_tf.data.mixup import (mix_waveforms, mix_waveforms_numpy, mixup_example,
                                sample_beta)

C = 5


def test_lambda_is_beta_alpha_alpha():
    """λ ~ Beta(10, 10): KS test over 4,000 stateless draws (p > 0.001), and mean/var."""
    draws = np.array([float(sample_beta(tf.constant([7, i], tf.int64), 10.0))
                      for i in range(4000)])
    assert stats.kstest(draws, stats.beta(10, 10).cdf).pvalue > 1e-3
    # mean 0.5, variance αβ/((α+β)²(α+β+1)) = 1/84 ≈ 0.0119; 4-σ bounds on the sample stats
    assert abs(draws.mean() - 0.5) < 4 * np.sqrt(1 / 84 / 4000)
    assert draws.var() == pytest.approx(1 / 84, rel=0.1)
    other = np.array([float(sample_beta(tf.constant([7, i], tf.int64), 1.0))
                      for i in range(2000)])
    assert stats.kstest(other, stats.uniform().cdf).pvalue > 1e-3  # Beta(1, 1) = U(0, 1)


@pytest.mark.parametrize("n_i,n_j", [(1000, 600), (600, 1000), (800, 800)])
def test_mix_waveforms_matches_numpy(n_i, n_j):
    """Mean removal, partner zero-padded or cut to x_i's length, mean removed again."""
    rng = np.random.default_rng(n_i + n_j)
    x_i = rng.normal(0.3, 0.2, n_i).astype(np.float32)
    x_j = rng.normal(-0.1, 0.4, n_j).astype(np.float32)
    lam = 0.37
    got = mix_waveforms(tf.constant(x_i), tf.constant(x_j), tf.constant(lam)).numpy()
    np.testing.assert_allclose(got, mix_waveforms_numpy(x_i, x_j, lam), atol=1e-6)
    # the definition written out once more, independently
    a = x_i.astype(np.float64) - x_i.mean()
    b = x_j.astype(np.float64) - x_j.mean()
    b = np.pad(b[:n_i], (0, max(0, n_i - n_j)))
    want = lam * a + (1 - lam) * b
    np.testing.assert_allclose(got, want - want.mean(), atol=1e-6)
    assert got.shape == (n_i,) and abs(got.mean()) < 1e-6


def test_mixup_example_rate_and_label_arithmetic():
    """P(mix) = rate (binomial test, p > 0.001); y = λ y_i + (1-λ) y_j, shared labels 1."""
    ex = {"waveform": tf.constant(np.linspace(-1, 1, 400, dtype=np.float32)),
          "labels": tf.constant([1, 1, 0, 0, 0], tf.float32), "key": tf.constant(3, tf.int64)}
    partner = {"waveform": tf.constant(np.cos(np.arange(300, dtype=np.float32))),
               "labels": tf.constant([0, 1, 1, 0, 0], tf.float32),
               "key": tf.constant(9, tf.int64)}
    fn = tf.function(lambda s: mixup_example(ex, partner, s, 0.5, 10.0))
    mixed = 0
    n = 1500
    for i in range(n):
        out = fn(tf.constant([1, i], tf.int64))
        lam = float(out["mix_lambda"])
        y = out["labels"].numpy()
        if int(out["partner_key"]) == 9:
            mixed += 1
            assert 0 < lam < 1
            np.testing.assert_allclose(y, [lam, 1.0, 1 - lam, 0, 0], atol=1e-6)
            np.testing.assert_allclose(out["waveform"].numpy(), mix_waveforms_numpy(
                ex["waveform"].numpy(), partner["waveform"].numpy(), lam), atol=1e-5)
        else:
            assert int(out["partner_key"]) == -1 and lam == 1.0
            np.testing.assert_array_equal(y, ex["labels"].numpy())
            np.testing.assert_array_equal(out["waveform"].numpy(), ex["waveform"].numpy())
    assert stats.binomtest(mixed, n, 0.5).pvalue > 1e-3
    # rate 0: never mixed; rate 1: always
    for rate, expect in ((0.0, -1), (1.0, 9)):
        outs = [int(mixup_example(ex, partner, tf.constant([2, i], tf.int64), rate, 10.0)
                    ["partner_key"]) for i in range(50)]
        assert set(outs) == {expect}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(5)
    n = 60
    labels = random_labels(n, C, rng, skew=0.5)
    d = tmp_path_factory.mktemp("mixup")
    waves = random_waveforms(n, rng, 300, 500)
    glob = write_shards(str(d), waves, labels, C, num_shards=3)
    return glob, labels, waves


def _rows(keys, spec):
    fi, pos = pipeline.example_key_parts(np.asarray(keys))
    starts = np.concatenate([[0], np.cumsum(records.shard_counts(spec))])
    return starts[fi] + pos


def test_pipeline_mixup_partners_uniform_and_labels_exact(shards):
    """The training stream: mixed fraction ≈ 0.5 (binomial, p > 0.001), partners uniform
    over the whole set (chi-square, p > 0.001), each mixed label vector and waveform equal to
    the formula applied to the stored examples."""
    glob, labels, waves = shards
    spec = records.load_data_spec(glob)
    clip = 500
    ds = pipeline.make_train_dataset(glob, batch_size=10, clip_samples=clip, mixup=0.5,
                                     mixup_alpha=10.0, balanced_sampling=False, seed=3,
                                     num_epochs=30, with_ids=True, shuffle_buffer=64)
    hot = np.zeros((len(labels), C), np.float32)
    for i, row in enumerate(labels):
        hot[i, row] = 1
    partners, total, checked = [], 0, 0
    for f, y in ds.as_numpy_iterator():
        rows = _rows(f["key"], spec)
        total += len(rows)
        for b in range(len(rows)):
            if f["partner_key"][b] < 0:
                np.testing.assert_array_equal(y[b], hot[rows[b]])
                continue
            p = _rows([f["partner_key"][b]], spec)[0]
            partners.append(p)
            lam = f["mix_lambda"][b]
            want = np.where((hot[rows[b]] > 0) & (hot[p] > 0), 1.0,
                            lam * hot[rows[b]] + (1 - lam) * hot[p])
            np.testing.assert_allclose(y[b], want, atol=1e-6)
            if checked < 20:  # waveform arithmetic on the decoded int16 clips
                x_i = waves[rows[b]].astype(np.float32) / 32768.0
                x_j = waves[p].astype(np.float32) / 32768.0
                n_i = int(f["num_samples"][b])
                mixed = mix_waveforms_numpy(x_i, x_j, float(lam))
                np.testing.assert_allclose(f["waveform"][b][:n_i], mixed[:clip], atol=2e-6)
                checked += 1
    assert total == 30 * 60
    assert stats.binomtest(len(partners), total, 0.5).pvalue > 1e-3
    counts = np.bincount(partners, minlength=60)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert counts.min() > 0
