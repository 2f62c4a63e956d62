"""Frequency / time masking (Alg. 1 lines 16-18) against torchaudio's exact distribution."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from psla_tf.augment import FrequencyMasking, TimeMasking, TimeShift, shift_along_time


def _runs(masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, width) of the zero run of each row of a 0/1 matrix; start -1 when width 0.
    Asserts the zeros form one contiguous run."""
    zero = masked == 0
    width = zero.sum(axis=1)
    start = np.where(width > 0, zero.argmax(axis=1), -1)
    for row, s, w in zip(zero, start, width):
        if w:
            assert row[s:s + w].all(), "masked positions are not contiguous"
    return start, width


def _exact_joint(dim: int, max_width: int, points: int = 4000) -> np.ndarray:
    """P(width = k, start = j) of torchaudio's mask_along_axis, by quadrature over v.

    v ~ U[0, W); s | v ~ U[0, dim - v); width = floor(v), start = floor(s).
    """
    joint = np.zeros((max_width, dim))
    j = np.arange(dim)[None, :]
    for k in range(max_width):
        v = k + (np.arange(points) + 0.5) / points          # midpoints of [k, k + 1)
        span = (dim - v)[:, None]
        p = np.clip(np.minimum(j + 1, span) - j, 0.0, 1.0) / span   # P(floor(s) = j | v)
        joint[k] = p.mean(axis=0) / max_width
    return joint


def _chi_square_p(start: np.ndarray, width: np.ndarray, joint: np.ndarray) -> float:
    """Chi-square p-value of observed (width, start) against ``joint``; width 0 is one cell
    (its start is invisible), cells with expected count < 5 are pooled."""
    n = len(width)
    expected = [joint[0].sum() * n]
    observed = [np.sum(width == 0)]
    small_e, small_o = 0.0, 0
    for k in range(1, joint.shape[0]):
        for j in range(joint.shape[1]):
            e = joint[k, j] * n
            o = np.sum((width == k) & (start == j))
            if e < 5:
                small_e += e
                small_o += o
            else:
                expected.append(e)
                observed.append(o)
    if small_e > 0:
        expected.append(small_e)
        observed.append(small_o)
    expected = np.asarray(expected)
    expected *= n / expected.sum()   # quadrature rounding
    return stats.chisquare(np.asarray(observed), expected).pvalue


def test_exact_joint_is_a_distribution():
    joint = _exact_joint(24, 10)
    assert joint.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(joint.sum(axis=1), 0.1, atol=1e-6)  # width uniform on 0..9


@pytest.mark.parametrize("layer_cls,axis", [(FrequencyMasking, 2), (TimeMasking, 1)])
def test_distribution_matches_torchaudio(layer_cls, axis):
    dim, max_width, n = 24, 10, 20000
    shape = (n, dim, 2) if axis == 1 else (n, 2, dim)
    layer = layer_cls(max_width, seed=1234)
    out = layer(tf.ones(shape), training=True).numpy()
    rows = out[:, :, 0] if axis == 1 else out[:, 0, :]
    other = out[:, :, 1] if axis == 1 else out[:, 1, :]
    np.testing.assert_array_equal(rows, other)             # whole columns/rows masked
    start, width = _runs(rows)
    assert width.max() < max_width
    # widths uniform on {0..W-1}: KS-free exact check by chi-square, p > 1e-3 (fixed seed)
    assert stats.chisquare(np.bincount(width, minlength=max_width)).pvalue > 1e-3
    joint = _exact_joint(dim, max_width)
    assert _chi_square_p(start, width, joint) > 1e-3
    # power: the same samples reject the "end = floor(s + v)" variant (widths up to W)
    alt = np.zeros((max_width + 1, dim))
    rng = np.random.default_rng(0)
    v = rng.uniform(0, max_width, 400000)
    s = rng.uniform(0, 1, v.size) * (dim - v)
    w_alt = np.floor(s + v).astype(int) - np.floor(s).astype(int)
    np.add.at(alt, (w_alt, np.floor(s).astype(int)), 1.0)
    alt /= alt.sum()
    assert _chi_square_p(start, width, alt) < 1e-6


def test_independent_per_example_and_seeded():
    x = tf.ones((64, 50, 40))
    a = TimeMasking(30, seed=7)(x, training=True).numpy()
    b = TimeMasking(30, seed=7)(x, training=True).numpy()
    np.testing.assert_array_equal(a, b)                     # same seed, same masks
    starts, widths = _runs(a[:, :, 0])
    assert len(set(zip(starts.tolist(), widths.tolist()))) > 20   # not one mask for the batch
    layer = TimeMasking(30, seed=7)
    first = layer(x, training=True).numpy()
    second = layer(x, training=True).numpy()
    assert not np.array_equal(first, second)                # generator state advances


def test_identity_at_inference_and_zero_width():
    x = tf.random.normal((3, 20, 16))
    for layer in (FrequencyMasking(8), TimeMasking(8)):
        np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
        np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(TimeMasking(0)(x, training=True).numpy(), x.numpy())


def test_values_outside_mask_untouched_and_xla():
    keras.utils.set_random_seed(0)
    x = tf.random.normal((8, 40, 32)) + 10.0                # no natural zeros
    layer = FrequencyMasking(12, seed=3)

    @tf.function(jit_compile=True)
    def run(v):
        return layer(v, training=True)

    y = run(x).numpy()
    keep = y != 0
    np.testing.assert_array_equal(y[keep], x.numpy()[keep])
    for b in range(8):
        _, width = _runs(y[b].T)                            # rows = frequency bins
        assert set(width.tolist()) <= {0, 40}               # whole bins masked over time
        assert (width == 40).sum() < 12


def test_config_round_trip():
    layer = TimeMasking(192, seed=5, name="tm")
    clone = TimeMasking.from_config(layer.get_config())
    assert (clone.max_width, clone.seed, clone.name) == (192, 5, "tm")
    with pytest.raises(ValueError, match="max_width"):
        FrequencyMasking(-1)


def test_random_gain():
    """--random_gain_db: one gain per clip, uniform in ±max_db dB, a pure function of the
    seed; identity at 0; the pipeline applies it to the training waveforms only."""
    from psla_tf.augment import random_gain
    x = tf.random.normal((4000, 100), seed=1) + 3.0
    seed = tf.constant([5, 6], tf.int64)
    y = random_gain(x, 6.0, seed).numpy()
    ratio = y / x.numpy()
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)
    db = 20 * np.log10(ratio[:, 0])
    assert db.min() >= -6.0 - 1e-4 and db.max() <= 6.0 + 1e-4
    assert stats.kstest(db, stats.uniform(-6.0, 12.0).cdf).pvalue > 1e-3
    np.testing.assert_array_equal(random_gain(x, 6.0, seed).numpy(), y)      # stateless
    assert not np.array_equal(random_gain(x, 6.0, seed + 1).numpy(), y)
    np.testing.assert_array_equal(random_gain(x, 0.0, seed).numpy(), x.numpy())
    one = random_gain(x[0], 6.0, seed).numpy()                                # one clip [S]
    assert one.shape == (100,) and np.ptp(one / x[0].numpy()) < 1e-5
    with pytest.raises(ValueError, match="max_db"):
        random_gain(x, -1.0, seed)


def test_random_noise():
    """--noise_prob: white Gaussian noise on a ``prob`` share of the clips (binomial), at an
    SNR uniform in [low, high] dB (KS test on the measured SNR of 4,000-sample clips), on the
    valid samples only; stateless; a silent clip stays silent; identity at prob 0."""
    from psla_tf.augment import random_noise
    rng = np.random.default_rng(0)
    b, s = 2000, 4000
    x = tf.constant(rng.normal(size=(b, s)) * rng.uniform(0.01, 1.0, size=(b, 1)), tf.float32)
    n = tf.constant(rng.integers(3000, s + 1, size=b), tf.int32)
    valid = np.arange(s)[None, :] < n.numpy()[:, None]
    x = x * tf.constant(valid, tf.float32)
    seed = tf.constant([7, 8], tf.int64)
    y = random_noise(x, n, (10.0, 30.0), 0.5, seed).numpy()
    noise = y - x.numpy()
    assert np.all(noise[~valid] == 0)                                       # padding stays 0
    noisy = np.abs(noise).max(axis=1) > 0
    assert stats.binomtest(int(noisy.sum()), b, 0.5).pvalue > 1e-3           # share = prob
    xs, ns = x.numpy()[noisy], noise[noisy]
    m = valid[noisy].sum(axis=1)
    snr = 10 * np.log10((xs ** 2).sum(axis=1) / (ns ** 2).sum(axis=1))
    # measured SNR = drawn SNR + estimation error of ~0.1 dB (std of a 3,000-sample power)
    assert stats.kstest(snr, stats.uniform(10.0, 20.0).cdf).pvalue > 1e-3
    assert snr.min() > 9.5 and snr.max() < 30.5
    z = ns / np.sqrt((ns ** 2).sum(axis=1, keepdims=True) / m[:, None])    # unit-power noise
    z = z[valid[noisy]]
    assert abs(stats.kurtosis(z)) < 0.05 and abs(z.mean()) < 0.01           # Gaussian, white
    np.testing.assert_array_equal(random_noise(x, n, (10.0, 30.0), 0.5, seed).numpy(), y)
    assert not np.array_equal(random_noise(x, n, (10.0, 30.0), 0.5, seed + 1).numpy(), y)
    np.testing.assert_array_equal(random_noise(x, n, (10.0, 30.0), 0.0, seed).numpy(),
                                  x.numpy())
    silent = random_noise(tf.zeros((3, 100)), tf.constant([100, 50, 0]), (0.0, 5.0), 1.0, seed)
    np.testing.assert_array_equal(silent.numpy(), 0)
    with pytest.raises(ValueError, match="prob"):
        random_noise(x, n, (10.0, 30.0), 1.5, seed)
    with pytest.raises(ValueError, match="low <= high"):
        random_noise(x, n, (30.0, 10.0), 1.0, seed)


def test_random_noise_coloured():
    """--noise_decay_min_db / --noise_decay_max_db: the noise's power spectrum (scipy's
    Welch estimate) falls by the drawn dB per octave above 100 Hz and is flat below; its SNR
    is the drawn one; (0, 0) is the white noise of test_random_noise, unchanged."""
    from scipy import signal
    from psla_tf.augment import random_noise
    rng = np.random.default_rng(1)
    b, s, sr = 64, 16000, 16000
    x = tf.constant(rng.normal(size=(b, s)), tf.float32)
    xn = x.numpy()
    n = tf.fill([b], s)
    seed = tf.constant([3, 4], tf.int64)
    for decay in (3.0, 6.0):
        noise = random_noise(x, n, (20.0, 20.0), 1.0, seed, (decay, decay), sr).numpy() - xn
        snr = 10 * np.log10((xn ** 2).sum(1) / (noise ** 2).sum(1))
        np.testing.assert_allclose(snr, 20.0, atol=1e-3)                  # unit-power shape
        f, pxx = signal.welch(noise, fs=sr, nperseg=2048, axis=1)
        db = 10 * np.log10(pxx.mean(0))
        band = (f >= 200) & (f <= 6000)
        slope = np.polyfit(np.log2(f[band]), db[band], 1)[0]              # dB per octave
        assert abs(slope + decay) < 0.3, (decay, slope)
        low = (f >= 20) & (f <= 80)
        assert np.ptp(db[low]) < 2.0                                       # flat below 100 Hz
    # a range: per-clip slopes spread over it (each clip's own Welch fit)
    noise = random_noise(x, n, (20.0, 20.0), 1.0, seed, (0.0, 6.0), sr).numpy() - xn
    f, pxx = signal.welch(noise, fs=sr, nperseg=1024, axis=1)
    band = (f >= 200) & (f <= 6000)
    slopes = [np.polyfit(np.log2(f[band]), 10 * np.log10(p[band]), 1)[0] for p in pxx]
    assert -6.5 < min(slopes) and max(slopes) < 0.5 and np.ptp(slopes) > 3.0
    white = random_noise(x, n, (10.0, 30.0), 0.5, seed).numpy()
    np.testing.assert_array_equal(
        random_noise(x, n, (10.0, 30.0), 0.5, seed, (0.0, 0.0)).numpy(), white)
    with pytest.raises(ValueError, match="decay_db"):
        random_noise(x, n, (10.0, 30.0), 1.0, seed, (6.0, 3.0))
    with pytest.raises(ValueError, match="decay_db"):
        random_noise(x, n, (10.0, 30.0), 1.0, seed, (-1.0, 3.0))


def test_random_gain_in_training_pipeline(tmp_path):
    from helpers_data import write_shards
    from psla_tf.data import pipeline
    rng = np.random.default_rng(0)
    waves = [(rng.normal(size=2000) * 3000).astype(np.int16) for _ in range(8)]
    glob = write_shards(str(tmp_path), waves, [[i % 2] for i in range(8)], 2, num_shards=1)
    kw = dict(batch_size=4, clip_samples=2000, balanced_sampling=False, mixup=0.0,
              shuffle_buffer=8, seed=3, num_epochs=2)
    plain = list(pipeline.make_train_dataset(glob, **kw))
    gained = list(pipeline.make_train_dataset(glob, random_gain_db=10.0, **kw))
    again = list(pipeline.make_train_dataset(glob, random_gain_db=10.0, **kw))
    assert len(plain) == len(gained) == 4
    gains = []
    for (a, la), (b, lb), (c, _) in zip(plain, gained, again):
        np.testing.assert_array_equal(la.numpy(), lb.numpy())               # same order
        np.testing.assert_array_equal(b["waveform"].numpy(), c["waveform"].numpy())
        a, b = a["waveform"].numpy(), b["waveform"].numpy()
        k = np.abs(a).argmax(axis=1)
        g = b[np.arange(4), k] / a[np.arange(4), k]                          # per-clip gain
        gains += list(20 * np.log10(g))
        np.testing.assert_allclose(b, a * g[:, None], rtol=1e-5, atol=1e-6)
    assert max(abs(g) for g in gains) <= 10.0 + 1e-3 and np.std(gains) > 1.0
    sped = list(pipeline.make_train_dataset(glob, random_speed=0.1, **kw))
    for (a, la), (b, lb) in zip(plain, sped):
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
        ratio = a["num_samples"].numpy() / b["num_samples"].numpy()       # = rate r
        assert np.all((ratio > 0.9 - 1e-3) & (ratio < 1.1 + 1e-3)) and np.ptp(ratio) > 0
    noisy = list(pipeline.make_train_dataset(glob, noise_prob=1.0, noise_snr_db=(20.0, 20.0),
                                             **kw))
    for (a, la), (b, lb) in zip(plain, noisy):                # noise only: same clips, 20 dB
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
        a, b = a["waveform"].numpy(), b["waveform"].numpy()
        snr = 10 * np.log10((a ** 2).sum(axis=1) / ((b - a) ** 2).sum(axis=1))
        np.testing.assert_allclose(snr, 20.0, atol=0.5)
    brown = list(pipeline.make_train_dataset(glob, noise_prob=1.0, noise_snr_db=(20.0, 20.0),
                                             noise_decay_db=(6.0, 6.0), **kw))
    for (a, _), (b, _), (c, _) in zip(plain, noisy, brown):   # coloured: same SNR, not white
        a, b, c = (v["waveform"].numpy() for v in (a, b, c))
        snr = 10 * np.log10((a ** 2).sum(axis=1) / ((c - a) ** 2).sum(axis=1))
        np.testing.assert_allclose(snr, 20.0, atol=0.5)
        assert not np.allclose(b, c)
    with pytest.raises(ValueError, match="noise_decay_db"):
        pipeline.make_train_dataset(glob, noise_prob=1.0, noise_decay_db=(3.0, 1.0), **kw)
    with pytest.raises(ValueError, match="random_gain_db"):
        pipeline.make_train_dataset(glob, random_gain_db=-1.0, **kw)
    with pytest.raises(ValueError, match="noise_prob"):
        pipeline.make_train_dataset(glob, noise_prob=2.0, **kw)
    with pytest.raises(ValueError, match="not with features_in_pipeline"):
        pipeline.make_train_dataset(glob, noise_prob=0.5, features_in_pipeline=True,
                                    frontend=lambda w, n: w, **kw)


def test_random_speed():
    """--random_speed: each clip resampled at one rate r in [1 - x, 1 + x]: a tone's
    frequency scales by r, the valid length by 1 / r (cut at S), zeros after; stateless."""
    from psla_tf.augment import random_speed
    sr, total = 16000, 16000
    t = np.arange(total) / sr
    freqs = [300.0, 440.0, 1000.0, 2000.0] * 8
    lengths = np.array([8000, 12000, 16000, 400] * 8, np.int32)
    x = np.stack([np.sin(2 * np.pi * f * t) * (np.arange(total) < n)
                  for f, n in zip(freqs, lengths)]).astype(np.float32)
    seed = tf.constant([3, 4], tf.int64)
    y, n = random_speed(x, lengths, 0.1, seed)
    y, n = y.numpy(), n.numpy()
    rates = []
    for i, (f, n0) in enumerate(zip(freqs, lengths)):
        assert not y[i, n[i]:].any()                                     # zeros after
        if n0 < 8000:
            continue
        seg = y[i, :n[i]] * np.hanning(n[i])
        spec = np.abs(np.fft.rfft(seg, 8 * n[i]))
        r = np.argmax(spec) * sr / (8 * n[i]) / f                        # measured rate
        rates.append(r)
        assert 0.9 - 2e-3 <= r <= 1.1 + 2e-3
        assert n[i] == min(total, int(np.floor((n0 - 1) / r + 1e-6)) + 1) or \
            abs(n[i] - min(total, (n0 - 1) / r + 1)) <= 2               # length ~ n / r
    assert np.std(rates) > 0.02                                          # rates differ
    y2, _ = random_speed(x, lengths, 0.1, seed)
    np.testing.assert_array_equal(y2.numpy(), y)                         # stateless
    y0, n0 = random_speed(x, lengths, 0.0, seed)
    np.testing.assert_array_equal(np.asarray(y0), x)
    with pytest.raises(ValueError, match="max_change"):
        random_speed(x, lengths, 1.0, seed)


def test_shift_along_time_matches_numpy():
    """--time_shift: each example delayed by its own number of frames, zeros before, the
    end cut (NumPy reference)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 12, 3)).astype("float32") + 10.0
    shift = np.array([0, 1, 4, 12, 20], np.int32)
    want = np.zeros_like(x)
    for b, d in enumerate(shift):
        d = min(d, 12)
        want[b, d:] = x[b, :12 - d]
    np.testing.assert_array_equal(shift_along_time(tf.constant(x), tf.constant(shift)).numpy(),
                                  want)


def test_time_shift_layer_uniform_delay_and_inference_identity():
    """TimeShift draws d ~ U{0..max_shift} per example (chi-square, p > 0.001 at seed 0),
    is seeded, identity at inference and at 0, and round-trips its config."""
    x = tf.constant(np.arange(1, 41, dtype="float32")[None, :, None] * np.ones((4000, 1, 2),
                                                                                "float32"))
    layer = TimeShift(7, seed=0)
    y = layer(x, training=True).numpy()
    delay = (y[:, :, 0] == 0).sum(axis=1)                  # leading zeros = the delay
    for b in range(0, 4000, 97):
        np.testing.assert_array_equal(y[b, delay[b]:, 0], x.numpy()[b, :40 - delay[b], 0])
    counts = np.bincount(delay, minlength=8)
    assert counts.size == 8
    assert stats.chisquare(counts).pvalue > 1e-3
    np.testing.assert_array_equal(TimeShift(7, seed=0)(x, training=True).numpy(), y)
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    np.testing.assert_array_equal(TimeShift(0)(x, training=True).numpy(), x.numpy())
    clone = TimeShift.from_config(TimeShift(5, seed=3, name="ts").get_config())
    assert (clone.max_shift, clone.seed, clone.name) == (5, 3, "ts")
    with pytest.raises(ValueError, match="max_shift"):
        TimeShift(-1)


def test_frontend_time_shift_delays_normalised_frames_in_training_only():
    """AudioFrontend(time_shift=…): in training each clip's normalised fbank is delayed
    (zeros = the clip's mean under cmvn in front); at inference it is unchanged; the .keras
    config carries it."""
    from psla_tf.models.frontend import AudioFrontend
    rng = np.random.default_rng(1)
    wave = tf.constant(rng.normal(size=(64, 16000)).astype("float32"))
    n = tf.fill([64], 16000)
    fe = AudioFrontend(target_length=120, freqm=0, timem=0, clip_norm="cmvn", time_shift=10,
                       seed=0)
    plain = fe(wave, n).numpy()                            # 98 valid frames, then padding
    shifted = fe(wave, n, training=True).numpy()
    delays = set()
    for b in range(64):
        d = int(np.argmax(np.abs(shifted[b]).sum(axis=1) > 0))
        assert 0 <= d <= 10
        np.testing.assert_array_equal(shifted[b, :d], 0.0)
        np.testing.assert_allclose(shifted[b, d:], plain[b, :120 - d], atol=1e-6)
        delays.add(d)
    assert len(delays) > 5
    assert AudioFrontend.from_config(fe.get_config()).time_shift == 10
