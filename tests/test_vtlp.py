"""Vocal-tract length perturbation (``augment.vtln_warp_freq``, ``mel_warp_matrix``,
``VocalTractPerturbation``, ``AudioFrontend(vtlp=...)``, ``--vtlp``) against a NumPy
transcription of Kaldi's ``VtlnWarpFreq`` and the mel scale."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from psla_tf.augment import VocalTractPerturbation, mel_warp_matrix, vtln_warp_freq
from psla_tf.features import kaldi_fbank
from psla_tf.models.frontend import AudioFrontend


def _kaldi_warp(freq: float, alpha: float, low_freq: float, high_freq: float,
                vtln_low: float, vtln_high: float) -> float:
    """Kaldi's mel-computations.cc ``VtlnWarpFreq``, line by line (float64)."""
    if freq < low_freq or freq > high_freq:
        return freq
    l = vtln_low * max(1.0, alpha)
    h = vtln_high * min(1.0, alpha)
    scale = 1.0 / alpha
    fl, fh = scale * l, scale * h
    scale_left = (fl - low_freq) / (l - low_freq)
    scale_right = (high_freq - fh) / (high_freq - h)
    if freq < l:
        return low_freq + scale_left * (freq - low_freq)
    if freq < h:
        return scale * freq
    return high_freq + scale_right * (freq - high_freq)


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


def _centres_hz(m: int, low: float, high: float) -> np.ndarray:
    delta = (_mel(high) - _mel(low)) / (m + 1)
    return 700.0 * (np.exp((_mel(low) + (np.arange(m) + 1) * delta) / 1127.0) - 1.0)


@pytest.mark.parametrize("high_freq", [8000.0, 4000.0])
def test_warp_matches_kaldi(high_freq):
    rng = np.random.default_rng(0)
    freq = np.concatenate([rng.uniform(0.0, 8000.0, 300), [20.0, 100.0, high_freq - 500.0,
                                                           high_freq, 10.0, 7999.0]])
    for alpha in (0.82, 0.9, 0.97, 1.0, 1.05, 1.1, 1.18):
        got = vtln_warp_freq(freq[None, :], np.array([[alpha]]), 20.0, high_freq).numpy()[0]
        want = [_kaldi_warp(f, alpha, 20.0, high_freq, 100.0, high_freq - 500.0) for f in freq]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="VTLN cutoffs"):
        vtln_warp_freq([1000.0], [1.0], 20.0, 550.0)


def test_warp_matrix_interpolates_at_the_warped_centres():
    m, low, high = 128, 20.0, 4000.0
    alphas = np.array([1.0, 0.9, 1.1, 0.95], np.float32)
    w = mel_warp_matrix(tf.constant(alphas), m, low, high).numpy()
    assert w.shape == (4, m, m)
    np.testing.assert_allclose(w[0], np.eye(m), atol=1e-4)            # α = 1: identity
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)         # convex weights
    assert ((w > 1e-6).sum(axis=1) <= 2).all()                        # two neighbours
    ramp = np.arange(m, dtype=np.float32)[None, None, :]              # log-mel = bin index
    centres = _centres_hz(m, low, high)
    delta = (_mel(high) - _mel(low)) / (m + 1)
    for b, alpha in enumerate(alphas):
        src = np.array([_kaldi_warp(f, float(alpha), low, high, 100.0, high - 500.0)
                        for f in centres])
        pos = np.clip((_mel(src) - _mel(low)) / delta - 1.0, 0, m - 1)
        np.testing.assert_allclose((ramp @ w[b])[0, 0], pos, atol=2e-3)


def test_a_tone_moves_to_the_warped_bin():
    """A 1-kHz tone's peak bin after warping by α sits at the centre nearest 1 kHz · α (the
    warp's middle piece reads bin i at f_i / α)."""
    t = np.arange(16000) / 16000.0
    fb = kaldi_fbank(np.sin(2 * np.pi * 1000.0 * t)[None].astype(np.float32), 16000, 128,
                     high_freq=4000.0)
    centres = _centres_hz(128, 20.0, 4000.0)
    for alpha in (0.9, 1.0, 1.12):
        out = tf.linalg.matmul(fb, mel_warp_matrix(tf.constant([alpha]), 128, 20.0, 4000.0))
        assert out.numpy()[0].mean(0).argmax() == np.abs(centres - 1000.0 * alpha).argmin()


def _factors(out: np.ndarray, m: int, low: float, high: float) -> np.ndarray:
    """Each example's α, read back from a warped ramp (the bin at ~1 kHz, middle piece)."""
    centres = _centres_hz(m, low, high)
    i = int(np.abs(centres - 1000.0).argmin())
    delta = (_mel(high) - _mel(low)) / (m + 1)
    src = 700.0 * (np.exp((_mel(low) + (out[:, 0, i] + 1.0) * delta) / 1127.0) - 1.0)
    return centres[i] / src


def test_layer_draws_uniform_factors_in_training_only():
    m = 128
    layer = VocalTractPerturbation(0.1, high_freq=4000.0, seed=3)
    ramp = np.tile(np.arange(m, dtype=np.float32), (400, 2, 1))
    np.testing.assert_array_equal(layer(ramp).numpy(), ramp)                 # inference
    np.testing.assert_array_equal(VocalTractPerturbation(0.0)(ramp, training=True), ramp)
    alpha = _factors(layer(ramp, training=True).numpy(), m, 20.0, 4000.0)
    assert alpha.min() >= 0.9 - 1e-3 and alpha.max() <= 1.1 + 1e-3
    assert stats.kstest((alpha - 0.9) / 0.2, "uniform").pvalue > 0.01       # U[0.9, 1.1]
    again = VocalTractPerturbation(0.1, high_freq=4000.0, seed=3)(ramp, training=True)
    np.testing.assert_allclose(_factors(again.numpy(), m, 20.0, 4000.0), alpha, atol=1e-6)
    zeros = np.zeros((2, 5, m), np.float32)                                  # padding frames
    np.testing.assert_array_equal(layer(zeros, training=True).numpy(), zeros)
    restored = VocalTractPerturbation.from_config(layer.get_config())
    assert (restored.max_warp, restored.high_freq, restored.seed) == (0.1, 4000.0, 3)
    with pytest.raises(ValueError, match="max_warp"):
        VocalTractPerturbation(0.5)
    with pytest.raises(ValueError, match="VTLN cutoffs"):
        VocalTractPerturbation(0.1, high_freq=580.0)


def test_frontend_warps_in_training_only_and_saves(tmp_path):
    rng = np.random.default_rng(1)
    wave = rng.standard_normal((3, 16000)).astype(np.float32)
    n = np.array([16000, 12000, 8000], np.int32)
    kw = dict(target_length=100, freqm=0, timem=0, high_freq=4000.0, clip_norm="cmvn")
    fe = AudioFrontend(vtlp=0.1, seed=0, **kw)
    plain = AudioFrontend(**kw)
    np.testing.assert_allclose(fe(wave, n).numpy(), plain(wave, n).numpy(), atol=1e-6)
    warped = fe(wave, n, training=True).numpy()
    assert np.abs(warped - plain(wave, n).numpy()).max() > 0.1
    np.testing.assert_array_equal(warped[2, 48:], 0.0)     # cmvn padding frames stay 0
    assert AudioFrontend.from_config(fe.get_config()).vtlp == 0.1
    wave_in = keras.Input((None,), name="waveform")
    n_in = keras.Input((), name="num_samples", dtype="int32")
    model = keras.Model({"waveform": wave_in, "num_samples": n_in}, fe(wave_in, n_in))
    model.save(tmp_path / "fe.keras")
    loaded = keras.saving.load_model(tmp_path / "fe.keras")
    assert loaded.layers[-1].vtlp == 0.1
    np.testing.assert_allclose(loaded({"waveform": wave, "num_samples": n}).numpy(),
                               plain(wave, n).numpy(), atol=1e-6)
