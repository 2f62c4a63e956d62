"""Cepstral smoothing of the front end (``AudioFrontend(num_ceps=...)``, ``--num_ceps``).

Truth: SciPy's orthonormal DCT-II / its inverse with the coefficients from ``num_ceps`` on
zeroed; the fbank of the same front end without smoothing. The exports carry it:
tests/test_clip_norm.py::test_exports_carry_clip_norm builds its tagger with ``num_ceps``.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from psla_tf.features import cepstral_lifter_matrix


@pytest.mark.parametrize("bins,ceps", [(128, 13), (128, 128), (64, 1), (40, 20)])
def test_lifter_matrix_is_scipy_dct_truncation(bins, ceps):
    x = np.random.default_rng(bins + ceps).normal(-5, 3, (7, 11, bins))
    c = scipy.fft.dct(x, type=2, axis=-1, norm="ortho")
    c[..., ceps:] = 0.0
    want = scipy.fft.idct(c, type=2, axis=-1, norm="ortho")
    lift = cepstral_lifter_matrix(bins, ceps)
    assert lift.shape == (bins, bins) and lift.dtype == np.float32
    np.testing.assert_allclose(x @ lift, want, atol=2e-5 * np.abs(x).max())
    np.testing.assert_allclose(lift, lift.T, atol=1e-7)                  # symmetric
    np.testing.assert_allclose(lift @ lift, lift, atol=1e-5)              # a projection
    np.testing.assert_allclose(np.full(bins, 2.5) @ lift, 2.5, atol=1e-5)  # keeps a level
    if ceps == bins:
        np.testing.assert_allclose(lift, np.eye(bins), atol=1e-5)


@pytest.mark.parametrize("ceps", [0, 129, -1])
def test_lifter_matrix_bad_counts(ceps):
    with pytest.raises(ValueError, match="num_ceps"):
        cepstral_lifter_matrix(128, ceps)


def test_frontend_smooths_each_frame_before_normalising():
    """fbank(num_ceps=13) = fbank() @ L frame by frame (padding frames stay 0); with cmvn the
    output is the per-clip normalisation of the smoothed fbank; config round trip."""
    from psla_tf.models.frontend import AudioFrontend, clip_normalise
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (3, 9000)).astype(np.float32)
    n = np.array([9000, 5000, 300], np.int32)
    plain = AudioFrontend(64, freqm=0, timem=0)
    smooth = AudioFrontend(64, freqm=0, timem=0, num_ceps=13, clip_norm="cmvn")
    want = plain.fbank(w, n).numpy() @ cepstral_lifter_matrix(128, 13)
    got = smooth.fbank(w, n).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    frames = smooth.valid_frames(w, n).numpy()
    assert list(frames) == [54, 29, 0]
    assert np.all(got[0, 54:] == 0) and np.all(got[2] == 0)
    out = smooth(w, n, training=False).numpy()
    np.testing.assert_allclose(out, clip_normalise(got, frames, "cmvn").numpy(), atol=1e-5)
    clone = AudioFrontend.from_config(smooth.get_config())
    assert (clone.num_ceps, clone.clip_norm) == (13, "cmvn")
    with pytest.raises(ValueError, match="num_ceps"):
        AudioFrontend(64, num_ceps=129)
