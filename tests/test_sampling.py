"""Balanced sampling (Algorithm 1, lines 1-8) as the training pipeline draws it."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.data import pipeline, records, report, sampling

C = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(1)
    n = 120
    labels = random_labels(n, C, rng)
    labels[7] = []          # an example without labels: weight 0, never drawn
    d = tmp_path_factory.mktemp("sampling")
    glob = write_shards(str(d), random_waveforms(n, rng, 300, 500), labels, C, num_shards=4)
    return glob, labels


def _keys(ds):
    return [f["key"] for f, _ in ds.as_numpy_iterator()]




def test_weights_and_total_weight_identity():
    rng = np.random.default_rng(0)
    labels = random_labels(300, 10, rng)
    labels[3] = []
    counts = np.zeros(12, np.int64)  # classes 10, 11 never occur
    for row in labels:
        counts[row] += 1
    w = sampling.balanced_sampling_weights(labels, counts)
    direct = np.array([sum(1.0 / counts[k] for k in row) for row in labels])
    np.testing.assert_allclose(w, direct, rtol=1e-12)
    assert w[3] == 0.0
    # W = sum_i w_i = number of classes with c_k > 0, computable from the counts alone
    assert sampling.total_weight(counts) == np.count_nonzero(counts)
    np.testing.assert_allclose(w.sum(), sampling.total_weight(counts), rtol=1e-12)
    hot = np.zeros((300, 12))
    for i, row in enumerate(labels):
        hot[i, row] = 1
    np.testing.assert_allclose(sampling.balanced_sampling_weights(hot, counts), direct)
    exp = sampling.expected_class_frequency(hot, counts)
    np.testing.assert_allclose(exp, 300 * (direct / direct.sum()) @ hot)


def _example_rows(keys, shard_sizes):
    fi, pos = pipeline.example_key_parts(np.asarray(keys))
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    return starts[fi] + pos


@pytest.mark.parametrize("order", ["iid", "stream"])
def test_draw_counts_match_exact_expectation(data, order):
    glob, labels = data
    spec = pipeline.resolve_data(glob)
    sizes = records.shard_counts(spec)
    n, epochs, batch = 120, 25, 10
    ds = pipeline.make_train_dataset(glob, batch_size=batch, clip_samples=64, mixup=0.0,
                                     seed=3, num_epochs=epochs, with_ids=True,
                                     shuffle_buffer=400, sampling_order=order)
    keys = np.concatenate(_keys(ds))
    assert keys.shape[0] == epochs * n
    rows = _example_rows(keys, sizes)
    observed = np.bincount(rows, minlength=n)
    w = sampling.balanced_sampling_weights(labels, spec.class_counts)
    expected = epochs * n * w / w.sum()
    assert observed[7] == 0  # no labels
    # chi-square goodness of fit over the examples that can be drawn (multinomial counts)
    m = expected > 0
    chi2 = ((observed[m] - expected[m]) ** 2 / expected[m]).sum()
    p = stats.chi2.sf(chi2, m.sum() - 1)
    assert p > 1e-3, (chi2, p)
    # per class: binomial z-scores against N * sum_{i in k} p_i per epoch
    hot = np.zeros((n, C))
    for i, row in enumerate(labels):
        hot[i, row] = 1
    q = (w / w.sum()) @ hot
    obs_k = observed @ hot
    z = (obs_k - epochs * n * q) / np.sqrt(epochs * n * q * (1 - q))
    assert np.all(np.abs(z) < 4.0), z
    # balanced sampling flattens the class distribution relative to traversal
    assert (obs_k / epochs).std() < spec.class_counts.std()


def test_non_balanced_each_example_once_per_epoch(data):
    glob, _ = data
    ds = pipeline.make_train_dataset(glob, batch_size=10, clip_samples=64, mixup=0.0,
                                     balanced_sampling=False, seed=0, num_epochs=2,
                                     with_ids=True, shuffle_buffer=50)
    keys = np.concatenate(_keys(ds))
    e0, e1 = keys[:120], keys[120:]
    assert len(e1) == 120
    assert len(set(e0.tolist())) == 120 and set(e0.tolist()) == set(e1.tolist())
    assert not np.array_equal(e0, e1)  # a different shuffle every epoch


def test_steps_exact_with_remainder_and_reproducible_resume(data):
    glob, _ = data
    kw = dict(batch_size=7, clip_samples=64, mixup=0.5, seed=5, with_ids=True,
              shuffle_buffer=100)
    steps = sampling.steps_per_epoch(120, 7)
    assert steps == 17
    full = list(pipeline.make_train_dataset(glob, num_epochs=3, **kw).as_numpy_iterator())
    assert len(full) == 3 * steps
    resumed = list(pipeline.make_train_dataset(glob, initial_epoch=2, num_epochs=1, **kw)
                   .as_numpy_iterator())
    assert len(resumed) == steps
    for (fa, ya), (fb, yb) in zip(full[2 * steps:], resumed):
        np.testing.assert_array_equal(fa["key"], fb["key"])
        np.testing.assert_array_equal(fa["waveform"], fb["waveform"])
        np.testing.assert_array_equal(ya, yb)
    epoch = [np.concatenate([f["key"] for f, _ in full[e * steps:(e + 1) * steps]])
             for e in range(3)]
    assert not np.array_equal(epoch[0], epoch[1])
    other = np.concatenate(_keys(pipeline.make_train_dataset(
        glob, num_epochs=1, **dict(kw, seed=6))))
    assert not np.array_equal(other, epoch[0])


def test_short_stream_continues_with_a_further_draw(tmp_path):
    # sampling_order="stream": 10 examples, 3 batches of 3 = 9 draws per epoch from a Poisson(10) stream: in some
    # epochs the stream has fewer than 9 and a second draw must fill the epoch.
    rng = np.random.default_rng(0)
    glob = write_shards(str(tmp_path), random_waveforms(10, rng, 100, 200),
                        random_labels(10, 3, rng), 3, num_shards=2)
    ds = pipeline.make_train_dataset(glob, batch_size=3, clip_samples=16, mixup=0.0,
                                     num_epochs=40, seed=1, sampling_order="stream")
    assert sum(1 for _ in ds) == 40 * 3


@pytest.mark.parametrize("num_shards", [4, 1])
def test_two_input_pipelines_split_the_data(tmp_path, num_shards):
    rng = np.random.default_rng(2)
    n = 40
    glob = write_shards(str(tmp_path), random_waveforms(n, rng, 100, 200),
                        random_labels(n, 4, rng), 4, num_shards=num_shards)
    streams = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        ds = pipeline.make_train_dataset(glob, batch_size=10, clip_samples=16, mixup=0.0,
                                         balanced_sampling=False, input_context=ctx,
                                         with_ids=True, seed=0, shuffle_buffer=64)
        b = list(ds.as_numpy_iterator())
        assert len(b) == 4 and b[0][0]["waveform"].shape == (5, 16)  # per-replica batch
        streams.append(np.concatenate([f["key"] for f, _ in b]))
    a, b = set(streams[0].tolist()), set(streams[1].tolist())
    assert not a & b and len(a | b) == n
    # balanced: different draws per pipeline
    bal = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(2, pid, 2)
        bal.append(np.concatenate(_keys(pipeline.make_train_dataset(
            glob, batch_size=10, clip_samples=16, mixup=0.0, input_context=ctx,
            with_ids=True, seed=0))))
    assert not np.array_equal(bal[0], bal[1])


def test_unseen_fraction_matches_numpy(data):
    glob, labels = data
    r = report.sampling_report(glob, 4, mixup=0.5, balanced_sampling=True, batch_size=10,
                               seed=9, clip_samples=16, progress=False, shuffle_buffer=64)
    # the same draws again (same seed), counted directly with numpy
    ds = pipeline.make_train_dataset(glob, batch_size=10, clip_samples=16, mixup=0.5,
                                     seed=9, num_epochs=4, with_ids=True, shuffle_buffer=64)
    b = list(ds.as_numpy_iterator())
    steps = 12
    used: set[int] = set()
    unseen = []
    for e in range(4):
        for f, _ in b[e * steps:(e + 1) * steps]:
            used.update(f["key"].tolist())
            used.update(k for k in f["partner_key"].tolist() if k >= 0)
        unseen.append(1 - len(used) / 120)
    np.testing.assert_allclose(r["tally"].unseen, unseen)
    assert r["tally"].unseen[-1] < r["tally"].unseen[0]
    # expected class frequency from the label pass equals the formula on the known labels
    hot = np.zeros((120, C))
    for i, row in enumerate(labels):
        hot[i, row] = 1
    w = sampling.balanced_sampling_weights(labels, r["spec"].class_counts)
    np.testing.assert_allclose(r["expected"], 120 * (w / w.sum()) @ hot)
    drawn = np.concatenate([f["key"] for f, _ in b])
    obs = np.bincount(_example_rows(drawn, records.shard_counts(r["spec"])), minlength=120)
    np.testing.assert_allclose(r["tally"].observed_class_frequency(), (obs @ hot) / 4)


def test_features_in_pipeline_equal_the_frontend_on_the_waveform_batches(data):
    """features_in_pipeline computes the fbank per clip before batching, on the clip itself
    (not padded to clip_samples); the batches equal the front end applied to the padded
    waveform batches the same pipeline yields (train and eval)."""
    from psla_tf.models.frontend import AudioFrontend
    glob, _ = data
    frames = 3   # 300-500-sample clips (0 or 1 frame) padded to (3 - 1) * 160 + 400 = 720
    layer = AudioFrontend(frames, freqm=0, timem=0, dataset_mean=0.0, dataset_std=1.0)
    calls = []

    def frontend(w, n):
        calls.append(w.shape[1])
        return layer(w, n, training=True)
    kw = dict(batch_size=10, clip_samples=720, mixup=0.5, seed=3)
    waves = list(pipeline.make_train_dataset(glob, **kw).as_numpy_iterator())
    feats = list(pipeline.make_train_dataset(glob, features_in_pipeline=True, frontend=frontend,
                                             **kw).as_numpy_iterator())
    assert len(waves) == len(feats) > 0
    assert calls == [None]   # traced once, for clips of any length
    for (w, y), (f, y2) in zip(waves, feats):
        np.testing.assert_array_equal(y, y2)
        assert (w["num_samples"] <= 500).all() and f["fbank"].shape == (10, frames, 128)
        np.testing.assert_allclose(f["fbank"], layer(w["waveform"], w["num_samples"]),
                                   rtol=1e-6, atol=1e-5)
        one_frame = w["num_samples"] >= 400
        assert (f["fbank"][:, 1:] == 0).all() and (f["fbank"][~one_frame] == 0).all()
        assert (f["fbank"][one_frame, 0] != 0).all()
    ev_w = list(pipeline.make_eval_dataset(glob, 16, 720).as_numpy_iterator())
    ev_f = list(pipeline.make_eval_dataset(glob, 16, 720, features_in_pipeline=True,
                                           frontend=frontend).as_numpy_iterator())
    assert [len(y) for _, y in ev_w] == [len(y) for _, y in ev_f]
    for (w, _), (f, _) in zip(ev_w, ev_f):
        np.testing.assert_allclose(f["fbank"], layer(w["waveform"], w["num_samples"]),
                                   rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("balanced", [True, False])
def test_class_prior_is_the_mean_target_of_the_draws(balanced):
    """class_prior (CSR) = the dense expected class frequency / N, and the empirical label
    frequency of 200,000 draws with Algorithm 1's weights within 4 standard errors."""
    rng = np.random.default_rng(3)
    n, c = 400, 7
    rows = [sorted(set(rng.choice(c, size=rng.integers(1, 4), p=np.arange(1, c + 1) / 28)))
            for _ in range(n)]
    hot = np.zeros((n, c))
    for i, r in enumerate(rows):
        hot[i, r] = 1.0
    counts = hot.sum(0)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows)
    weights = sampling.balanced_sampling_weights(rows, counts) if balanced else None
    prior = sampling.class_prior(indptr, indices, c, weights)
    np.testing.assert_allclose(
        prior, sampling.expected_class_frequency(hot, counts, balanced=balanced) / n, rtol=1e-12)
    w = sampling.balanced_sampling_weights(hot, counts) if balanced else np.ones(n)
    draws = rng.choice(n, size=200_000, p=w / w.sum())
    freq = hot[draws].mean(0)
    se = np.sqrt(prior * (1 - prior) / draws.size)
    assert np.all(np.abs(freq - prior) < 4 * se + 1e-12)
