"""Kaldi fbank parity with torchaudio's reference vectors (DESIGN.md "Features")."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from psla_tf import features, params
from tests.conftest import shared_path

MEAN_TOL = 1e-3
P999_TOL = 2e-2


def _reference_files():
    d = shared_path("fbank_reference")
    files = sorted(d.glob("*.npz"))
    if not files:
        pytest.skip(f"no reference vectors in {d}")
    return [dict(np.load(f)) | {"file": f.name} for f in files]


def _check(out: np.ndarray, ref: np.ndarray, name: str) -> None:
    assert out.shape == ref.shape, f"{name}: frames {out.shape} vs reference {ref.shape}"
    if ref.size == 0:
        return
    diff = np.abs(out - ref)
    assert diff.mean() <= MEAN_TOL, f"{name}: mean |d| {diff.mean()}"
    assert np.percentile(diff, 99.9) <= P999_TOL, f"{name}: p99.9 {np.percentile(diff, 99.9)}"


@pytest.mark.parametrize("dft", ["matmul", "rfft"])
def test_matches_torchaudio_reference_per_clip(dft):
    for ref in _reference_files():
        out = features.kaldi_fbank(ref["waveform"], dft=dft).numpy()
        _check(out, ref["fbank"], f"{ref['file']} ({dft})")


@pytest.mark.parametrize("dft", ["matmul", "rfft"])
def test_matches_reference_batched_and_padded(dft):
    """Clips padded to one length and batched: each clip's valid frames equal its reference."""
    refs = _reference_files()
    longest = max(r["waveform"].shape[0] for r in refs)
    batch = np.zeros((len(refs), longest), np.float32)
    for i, r in enumerate(refs):
        batch[i, : r["waveform"].shape[0]] = r["waveform"]
    out = features.kaldi_fbank(batch, dft=dft).numpy()
    assert out.shape == (len(refs), features.num_frames(longest), params.NUM_MEL_BINS)
    for i, r in enumerate(refs):
        n = r["fbank"].shape[0]
        _check(out[i, :n], r["fbank"], f"batched {r['file']} ({dft})")


def test_frame_count_rule():
    for n, expected in [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (160000, 998)]:
        assert features.num_frames(n) == expected
        out = features.kaldi_fbank(np.zeros(n, np.float32))
        assert out.shape == (expected, 128)


def test_empty_filter_is_log_eps():
    """At 128 bins filter 3 covers no FFT bin: log(float32 eps) = -15.9424 in every frame."""
    banks = features.kaldi_mel_banks()
    assert banks.shape == (257, 128)
    assert np.all(banks[:, 3] == 0)
    rng = np.random.default_rng(0)
    out = features.kaldi_fbank(rng.uniform(-0.5, 0.5, 16000).astype(np.float32)).numpy()
    np.testing.assert_allclose(out[:, 3], np.log(np.float32(params.LOG_FLOOR)), rtol=0, atol=1e-5)
    assert np.log(params.LOG_FLOOR) == pytest.approx(-15.9424, abs=1e-4)


def test_numpy_reimplementation_independent():
    """An independent float64 NumPy Kaldi pipeline (step by step, numpy FFT) agrees."""
    rng = np.random.default_rng(1)
    w = (0.3 * rng.standard_normal(5000)).astype(np.float32)
    n_frames = 1 + (len(w) - 400) // 160
    frames = np.stack([w[i * 160: i * 160 + 400] for i in range(n_frames)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * prev
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    bins = mel(np.arange(256) * 16000 / 512)
    fb = np.zeros((128, 257))
    for m in range(128):
        l, c, r = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        fb[m, :256] = np.maximum(0, np.minimum((bins - l) / (c - l), (r - bins) / (r - c)))
    expected = np.log(np.maximum(power @ fb.T, np.finfo(np.float32).eps))
    for dft in ("matmul", "rfft"):
        out = features.kaldi_fbank(w, dft=dft).numpy()
        assert np.abs(out - expected).mean() < 1e-4
        assert np.abs(out - expected).max() < 5e-2


def test_power_scale_is_the_same_function():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, 4000).astype(np.float32)
    a = features.kaldi_fbank(w).numpy()
    b = features.kaldi_fbank(w, power_scale=64.0).numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_layer_tf_function_xla_and_serialisation(tmp_path):
    import keras
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 4000)).astype(np.float32)
    eager = features.kaldi_fbank(x).numpy()
    jitted = tf.function(features.kaldi_fbank, jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(eager, jitted, atol=2e-3)
    inp = keras.Input((4000,))
    model = keras.Model(inp, features.KaldiFbank()(inp))
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, atol=1e-5)
    path = tmp_path / "fbank.keras"
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), eager, atol=1e-5)
    assert again.layers[-1].get_config()["num_mel_bins"] == 128


def test_inside_tf_data():
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((3, 1000), np.float32))
    ds = ds.map(features.kaldi_fbank).batch(3)
    out = next(iter(ds)).numpy()
    assert out.shape == (3, features.num_frames(1000), 128)
