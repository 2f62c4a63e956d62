"""Upper edge of the front end's mel banks (``AudioFrontend(high_freq=...)``, ``--high_freq``).

Truth: Kaldi's mel-bank definition written out here with NumPy (bin m's triangle spans
mel(low) + m·Δ .. mel(low) + (m + 2)·Δ, Δ = (mel(high) − mel(low)) / (bins + 1), mel(f) =
1127 ln(1 + f / 700)), pure tones, and the same front end with the default edge. The
exports carry it: tests/test_clip_norm.py::test_exports_carry_clip_norm builds its tagger
with ``high_freq``.
"""
from __future__ import annotations

import numpy as np
import pytest

from psla_tf.features import kaldi_mel_banks


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@pytest.mark.parametrize("high", [4000.0, -400.0, 0.0])
def test_mel_banks_follow_kaldis_definition(high):
    top = high if high > 0 else 8000.0 + high
    lo, hi = _mel(20.0), _mel(top)
    delta = (hi - lo) / 129
    fft_mel = _mel(np.arange(257) * 16000.0 / 512)
    left = lo + np.arange(128)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    want = np.where((fft_mel > left) & (fft_mel < right),
                    np.where(fft_mel <= centre, (fft_mel - left) / delta,
                             (right - fft_mel) / delta), 0.0)
    want[:, -1] = 0.0                                  # Kaldi leaves the Nyquist bin out
    got = kaldi_mel_banks(128, 16000, 512, 20.0, high)
    np.testing.assert_allclose(got, want.T, atol=1e-6)
    assert not got[np.arange(257) * 16000.0 / 512 >= top].any()


def test_frontend_bands_end_at_high_freq():
    """A 6-kHz tone is outside every band of high_freq=4000 (log floor everywhere) but fills
    the default's bands near 6 kHz; a 1-kHz tone peaks in the bin whose centre is nearest
    1 kHz on each scale; config round trip; bad edges are refused."""
    from psla_tf.models.frontend import AudioFrontend
    t = np.arange(16000) / 16000.0
    tones = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 6000 * t)])
    tones = (0.3 * tones).astype(np.float32)
    n = np.array([16000, 16000], np.int32)
    narrow = AudioFrontend(98, freqm=0, timem=0, high_freq=4000.0).fbank(tones, n).numpy()
    wide = AudioFrontend(98, freqm=0, timem=0).fbank(tones, n).numpy()
    floor = np.log(np.finfo(np.float32).eps)
    assert narrow[1].max() < floor + 1e-3 < wide[1].max() - 10
    for fb, top in ((narrow, 4000.0), (wide, 8000.0)):
        centres = _mel(20.0) + (np.arange(128) + 1) * (_mel(top) - _mel(20.0)) / 129
        assert fb[0].mean(0).argmax() == np.abs(centres - _mel(1000.0)).argmin()
    fe = AudioFrontend(64, high_freq=-400.0, clip_norm="cmvn")
    assert AudioFrontend.from_config(fe.get_config()).high_freq == -400.0
    for bad in (8001.0, 20.0, -7980.0):
        with pytest.raises(ValueError, match="high_freq"):
            AudioFrontend(64, high_freq=bad)


def test_flag_accepts_exactly_what_the_front_end_accepts():
    """--high_freq's validator is the front end's rule (params.mel_high_edge), at its edges."""
    from absl import flags as absl_flags
    from psla_tf import params
    from psla_tf.training.flags import define_flags
    fv = absl_flags.FlagValues()
    define_flags(fv)
    for v in (-8000.0, -7980.0, -7979.5, -400.0, 0.0, 20.0, 20.5, 4000.0, 8000.0, 8000.5):
        try:
            params.mel_high_edge(v)
            ok = True
        except ValueError:
            ok = False
        if ok:
            fv(["prog", f"--high_freq={v}"])
            assert fv.high_freq == v
        else:
            with pytest.raises(absl_flags.IllegalFlagValueError):
                fv(["prog", f"--high_freq={v}"])
    assert params.mel_high_edge(-400.0) == 7600.0 and params.mel_high_edge(0.0) == 8000.0
