"""Label propagation over DTW neighbours (psla_tf/label_propagation.py).

Truth: a plain-Python dynamic-programming DTW, scipy's DCT on the hand-cut span, Zhou et al.'s
iteration F <- alpha S F + Y run to convergence, and FSDD recordings of one speaker (the
clips of a digit are each other's DTW neighbours).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from psla_tf import label_propagation as lp


def _dtw(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt of the least summed squared frame distance over monotone warping paths."""
    cost = np.full((len(a) + 1, len(b) + 1), np.inf)
    cost[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d = float(np.sum((a[i - 1] - b[j - 1]) ** 2))
            cost[i, j] = d + min(cost[i - 1, j], cost[i, j - 1], cost[i - 1, j - 1])
    return float(np.sqrt(cost[-1, -1]))


def test_dtw_distances_are_the_dynamic_programme_normalised_by_length():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(n, 3)) for n in (5, 9, 7, 12, 6)]
    got = lp.dtw_distances(seqs)
    for i, a in enumerate(seqs):
        for j, b in enumerate(seqs):
            want = 0.0 if i == j else _dtw(a, b) / np.sqrt(len(a) + len(b))
            assert got[i, j] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # a sequence and its time-stretched copy (each frame twice) are at distance 0
    stretched = np.repeat(seqs[0], 2, axis=0)
    assert lp.dtw_distances([seqs[0], stretched])[0, 1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="width"):
        lp.dtw_distances([np.zeros((4, 2)), np.zeros((4, 3))])


def test_utterance_cepstra_are_the_dct_of_the_loud_span_with_its_mean_removed():
    rng = np.random.default_rng(1)
    log_mel = np.full((30, 16), -15.0)              # silence (the log floor)
    log_mel[8:21] = rng.normal(2.0, 1.0, size=(13, 16))
    log_mel[14] = -3.0                               # a quiet frame inside the span is kept
    got = lp.utterance_cepstra(log_mel, num_ceps=5, trim=6.0)
    c = scipy.fft.dct(log_mel[8:21], type=2, axis=1, norm="ortho")[:, 1:6]
    np.testing.assert_allclose(got, c - c.mean(axis=0), atol=1e-12)
    assert lp.utterance_cepstra(np.zeros((4, 8)), num_ceps=3).shape == (4, 3)   # all equal
    with pytest.raises(ValueError):
        lp.utterance_cepstra(np.zeros((0, 8)))


def test_knn_graph_joins_each_clip_to_its_nearest_and_is_normalised():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 2))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    s = lp.knn_graph(d, k=3)
    np.testing.assert_allclose(s, s.T)
    assert np.all(np.diag(s) == 0)
    for i in range(12):   # the 3 nearest others are joined
        nearest = np.argsort(np.where(np.arange(12) == i, np.inf, d[i]))[:3]
        assert np.all(s[i, nearest] > 0)
    # D^-1/2 W D^-1/2: the largest eigenvalue is 1 (eigenvector sqrt(degree))
    assert np.max(np.linalg.eigvalsh(s)) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        lp.knn_graph(np.zeros((1, 1)), k=1)


def test_propagate_is_the_limit_of_zhous_iteration():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 2))
    s = lp.knn_graph(np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)), k=4)
    y = rng.random((20, 3))
    f = y.copy()
    for _ in range(2000):
        f = 0.8 * s @ f + y
    np.testing.assert_allclose(lp.propagate(s, y, 0.8), f, rtol=1e-8)
    np.testing.assert_allclose(lp.propagate(s, y, 0.0), y)
    with pytest.raises(ValueError):
        lp.propagate(s, y, 1.0)


def _chirp_clip(rng, f0: float, f1: float, seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    f = f0 + (f1 - f0) * t / seconds
    tone = np.sin(2 * np.pi * np.cumsum(f) / 16000) * np.hanning(len(t))
    clip = np.zeros(16000, np.float32)
    start = rng.integers(0, 16000 - len(t))
    clip[start:start + len(t)] = 0.5 * tone + 0.003 * rng.normal(size=len(t))
    return clip


def test_propagated_scores_recover_flipped_labels_of_two_sound_shapes():
    """Rising and falling chirps of varied length and onset: a third of the scores point to
    the wrong shape; their neighbours put them right."""
    rng = np.random.default_rng(4)
    truth = np.repeat([0, 1], 15)
    clips = np.stack([_chirp_clip(rng, *((300, 1500) if k == 0 else (1500, 300)),
                                  rng.uniform(0.3, 0.6)) for k in truth])
    noisy = truth.copy()
    flip = rng.choice(30, 10, replace=False)
    noisy[flip] = 1 - noisy[flip]
    scores = np.eye(2)[noisy] * 0.6 + 0.2
    got = lp.propagate_scores(clips, scores, k=5, alpha=0.9, sample_rate=16000,
                              num_mel_bins=40)
    assert got.shape == (30, 2)
    assert np.mean(got.argmax(1) == truth) >= 0.95 > np.mean(noisy == truth)


def test_propagation_over_one_speakers_digits_corrects_wrong_labels(shared):
    """Real audio: 20 clips each of three digits by one speaker, a quarter of their labels
    wrong (fixed seed); propagated over 5 DTW neighbours (the recipe's alpha) at least 90 %
    are right."""
    import soundfile as sf
    import soxr
    fsdd = shared("data", "fsdd", "recordings")
    rng = np.random.default_rng(5)
    clips, truth = [], []
    for k, digit in enumerate((2, 3, 6)):
        for n in range(20):
            x, sr = sf.read(str(fsdd / f"{digit}_jackson_{n}.wav"), dtype="float32")
            x = soxr.resample(x, sr, 16000)[:10480]
            clips.append(np.pad(x, (0, 10480 - len(x))))
            truth.append(k)
    truth = np.array(truth)
    noisy = truth.copy()
    wrong = rng.choice(60, 15, replace=False)
    noisy[wrong] = (noisy[wrong] + rng.integers(1, 3, 15)) % 3
    scores = np.eye(3)[noisy] * 0.7 + 0.1
    got = lp.propagate_scores(np.stack(clips), scores, k=5, alpha=0.9, sample_rate=16000,
                              num_mel_bins=64, high_freq=4000)
    assert np.mean(noisy == truth) == 0.75
    assert np.mean(got.argmax(1) == truth) >= 0.9
