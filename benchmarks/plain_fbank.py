"""The plain tf.signal Kaldi fbank: the baseline ``kaldi_fbank`` is measured against (issue 18).

Fifteen lines, each step as written in Kaldi / torchaudio: frame (tf.signal.frame) → per-frame
DC removal → pre-emphasis (0.97, the first sample uses itself) → symmetric Hann window →
512-point real FFT → |·|² → dense [257, 128] mel matmul → floored log. Within ~1e-6 mean of
``psla_tf.features.kaldi_fbank`` (and of torchaudio). Each step has its own name scope, so a
profile attributes the time per stage (benchmarks/run.py, ``fbank`` section).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from psla_tf.features import kaldi_mel_banks

EPS = float(np.finfo(np.float32).eps)
STAGES = ("frame", "dc", "preemphasis", "window", "fft", "power", "mel", "log")


def plain_fbank(waveform: tf.Tensor) -> tf.Tensor:
    """``[..., samples]`` float32 at 16 kHz → Kaldi log-mel ``[..., frames, 128]``."""
    window = tf.constant(np.hanning(400).astype(np.float32))          # symmetric Hann
    banks = tf.constant(kaldi_mel_banks())                             # [257, 128]
    with tf.name_scope("frame"):
        frames = tf.signal.frame(waveform, 400, 160)                   # [..., F, 400]
    with tf.name_scope("dc"):
        frames = frames - tf.reduce_mean(frames, axis=-1, keepdims=True)
    with tf.name_scope("preemphasis"):
        frames = tf.concat([frames[..., :1] * (1 - 0.97),
                            frames[..., 1:] - 0.97 * frames[..., :-1]], axis=-1)
    with tf.name_scope("window"):
        frames = frames * window
    with tf.name_scope("fft"):
        spectrum = tf.signal.rfft(frames, fft_length=[512])           # [..., F, 257]
    with tf.name_scope("power"):
        power = tf.math.square(tf.abs(spectrum))
    with tf.name_scope("mel"):
        mel = tf.linalg.matmul(power, banks)                           # [..., F, 128]
    with tf.name_scope("log"):
        return tf.math.log(tf.maximum(mel, EPS))
