"""Leading-silence removal in the front end (``AudioFrontend(trim_onset_db=...)``,
``--trim_onset_db``).

Truth: NumPy in float64 — frame energies as log Σ exp of the raw log-mel, the first frame
within x dB of the loudest, the shift, then per-clip CMVN. The exports carrying it:
``tests/test_clip_norm.py::test_exports_carry_clip_norm``.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

T = 48                                      # frames of the small front ends
CLIP = (T - 1) * 160 + 400                  # 7920 samples


def _np_onset(fb: np.ndarray, n: int, db: float) -> int:
    if n == 0:
        return 0
    e = np.log(np.exp(fb[:n].astype(np.float64)).sum(axis=1))
    return int(np.argmax(e >= e.max() - db * np.log(10) / 10))


def _clip(lead: int, seed: int, total: int = CLIP) -> np.ndarray:
    """``lead`` samples of faint noise (-60 dB), then a tone burst with harmonics."""
    rng = np.random.default_rng(seed)
    x = 1e-3 * 0.02 * rng.standard_normal(total)
    t = np.arange(total - lead) / 16000.0
    x[lead:] += 0.3 * sum(np.sin(2 * np.pi * k * (150 + 20 * seed) * t) / k for k in range(1, 8))
    return x.astype(np.float32)


def test_leading_silence_and_drop_match_numpy():
    from psla_tf.models.frontend import drop_leading_frames, leading_silence
    rng = np.random.default_rng(0)
    fb = rng.normal(-8.0, 1.0, size=(6, 20, 5)).astype(np.float32)
    fb[:, 9:] += 6.0                                    # loud from frame 9
    fb[2, 4] += 9.0                                     # one early loud frame
    n = np.array([20, 20, 20, 7, 0, 15], np.int32)     # clip 3 ends before the loud part
    for b in range(6):
        fb[b, n[b]:] = 0.0
    for db in (3.0, 20.0, 60.0):
        got = leading_silence(tf.constant(fb), tf.constant(n), db).numpy()
        want = [_np_onset(fb[b], n[b], db) for b in range(6)]
        np.testing.assert_array_equal(got, want)
    onset = np.array([9, 4, 0, 3, 0, 14], np.int32)
    out, kept = drop_leading_frames(tf.constant(fb), tf.constant(n), tf.constant(onset))
    np.testing.assert_array_equal(kept.numpy(), n - onset)
    for b in range(6):
        want = np.zeros_like(fb[b])
        want[:n[b] - onset[b]] = fb[b, onset[b]:n[b]]
        np.testing.assert_array_equal(out.numpy()[b], want)


def test_frontend_trims_each_clip_to_its_onset():
    """cmvn features of the trimmed front end = NumPy: onset on the untrimmed raw fbank,
    shift, cut to T frames, per-clip CMVN; a later copy of the same sound (more silence in
    front) gives nearly the same features; training and inference alike."""
    from psla_tf.models.frontend import CMVN_VAR_FLOOR, AudioFrontend
    leads = [0, 1600, 3200, 4000]
    total = CLIP + 4000
    waves = np.stack([_clip(k, 0, total) for k in leads])
    n = np.full([4], total, np.int32)
    long = AudioFrontend(200, freqm=0, timem=0)
    raw = long.fbank(waves, n).numpy()
    frames = long.valid_frames(waves, n).numpy()
    fe = AudioFrontend(T, freqm=0, timem=0, clip_norm="cmvn", trim_onset_db=30.0)
    got = fe(waves, n).numpy()
    np.testing.assert_array_equal(fe(waves, n, training=True).numpy(), got)
    for b in range(4):
        o = _np_onset(raw[b], frames[b], 30.0)
        assert abs(o - leads[b] // 160) <= 2
        k = min(frames[b] - o, T)
        x = raw[b, o:o + k].astype(np.float64)
        x = x - x.mean(0)
        want = np.zeros((T, raw.shape[2]))
        want[:k] = x / np.sqrt((x ** 2).mean(0) + CMVN_VAR_FLOOR)
        np.testing.assert_allclose(got[b], want, atol=2e-4)
    # the same burst 25 frames later: apart without trimming, aligned with it (past the
    # frames that straddle its onset)
    plain = AudioFrontend(T, freqm=0, timem=0)(waves, n).numpy()
    trimmed = AudioFrontend(T, freqm=0, timem=0, trim_onset_db=30.0)(waves, n).numpy()
    assert np.abs(plain[0, 3:40] - plain[3, 3:40]).mean() > 0.5
    assert np.abs(trimmed[0, 3:40] - trimmed[3, 3:40]).mean() < 0.15
    assert AudioFrontend.from_config(fe.get_config()).trim_onset_db == 30.0
    with pytest.raises(ValueError, match="trim_onset_db"):
        AudioFrontend(T, trim_onset_db=-1.0)
