"""Kaldi-exact log-mel filterbank features (paper Sec. II-C; DESIGN.md "Features").

``kaldi_fbank`` reproduces ``torchaudio.compliance.kaldi.fbank(w, htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128,
dither=0.0, frame_shift=10)`` -- the features PSLA trains on -- with TensorFlow ops only, so
it runs inside ``tf.data``, inside a Keras model, under ``tf.function`` and XLA, on CPU, GPU
and TPU, and converts to TFLite.

Everything between a frame of samples and its complex spectrum is linear (per-frame DC
removal, pre-emphasis, the symmetric Hann window, the zero-padded DFT), so it can be folded
into one constant ``[400, 2 * 257]`` matrix: ``dft="matmul"`` computes the spectrum as a
single matmul (TPU/TFLite friendly, fast on CPU); ``dft="rfft"`` applies the steps one by one
and uses ``tf.signal.rfft``. Both equal the reference within float32 rounding.

Half precision: the power spectrum of a full-scale clip exceeds float16's range, so the
front end always computes in float32 (the layer's dtype policy is pinned to float32) and
``power_scale`` lets the squared magnitudes be scaled down before the mel sum, with the log
shifted back afterwards, for runtimes that force float16 arithmetic.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf
import keras

from psla_tf import params

__all__ = ["kaldi_fbank", "KaldiFbank", "kaldi_mel_banks", "num_frames"]


def num_frames(num_samples: int, frame_length: int = params.FRAME_LENGTH,
               frame_shift: int = params.FRAME_SHIFT) -> int:
    """Kaldi's snip_edges frame count: 1 + (n - 400) // 160, or 0 when n < 400."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def _mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def kaldi_mel_banks(num_mel_bins: int = params.NUM_MEL_BINS,
                    sample_rate: int = params.SAMPLE_RATE,
                    fft_length: int = params.FFT_LENGTH,
                    low_freq: float = params.LOW_FREQ,
                    high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters as a ``[fft_length // 2 + 1, num_mel_bins]`` matrix.

    Triangles are linear in the mel domain (mel = 1127 ln(1 + f/700)); bin i of the FFT sits at
    mel(i * sr / fft_length). The Nyquist bin gets no weight, as in Kaldi/torchaudio.
    ``high_freq <= 0`` means Nyquist + high_freq.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and low_freq < high_freq <= nyquist):
        raise ValueError(f"bad mel range: low_freq={low_freq}, high_freq={high_freq}, "
                         f"sample_rate={sample_rate}")
    num_fft_bins = fft_length // 2
    # torchaudio computes the bank in float32 from float64 python scalars; float64 here is
    # at least as exact and identical within rounding.
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    b = np.arange(num_mel_bins, dtype=np.float64)[:, None]
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel(sample_rate / fft_length * np.arange(num_fft_bins, dtype=np.float64))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))            # [bins, fft_bins]
    banks = np.concatenate([banks, np.zeros((num_mel_bins, 1))], axis=1)  # Nyquist column
    return banks.T.astype(np.float32)                         # [fft_bins + 1, bins]


@functools.lru_cache(maxsize=8)
def _folded_dft_matrix(frame_length: int, fft_length: int, preemphasis: float) -> np.ndarray:
    """``[frame_length, 2 * (fft_length // 2 + 1)]``: DC removal, pre-emphasis, symmetric Hann
    window and the zero-padded real DFT folded into one linear map (real | imaginary)."""
    n = frame_length
    eye = np.eye(n)
    dc = eye - np.full((n, n), 1.0 / n)                     # x - mean(x)
    pre = eye.copy()                                         # y[i] = x[i] - a x[i-1]; y[0] = x[0](1-a)
    pre[np.arange(1, n), np.arange(0, n - 1)] = -preemphasis
    pre[0, 0] = 1.0 - preemphasis
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / (n - 1))
    k = np.arange(fft_length // 2 + 1)
    angle = 2.0 * np.pi * np.outer(np.arange(n), k) / fft_length
    dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # [n, 2K]
    # row-vector convention: spectrum = frame @ (dc^T pre^T diag(w) dft)
    folded = dc.T @ pre.T @ (window[:, None] * dft)
    return folded.astype(np.float32)


def _runtime_constant(value: np.ndarray, x: tf.Tensor) -> tf.Tensor:
    """``value`` (float32) stored as its int32 bit pattern and turned back into float32 by a
    bitcast that depends on ``x``: TFLite's weight quantisers (float16, dynamic) only touch
    float constants, so the matrix keeps its exact float32 values."""
    bits = tf.constant(np.ascontiguousarray(value, np.float32).view(np.int32))
    first = tf.reshape(x, [-1])[:1]
    zero = tf.cast(tf.reduce_sum(tf.minimum(tf.abs(first), 0.0)), tf.int32)   # min(|x|, 0) = 0
    return tf.bitcast(bits + zero, tf.float32)


def kaldi_fbank(waveform: tf.Tensor | np.ndarray,
                sample_rate: int = params.SAMPLE_RATE,
                num_mel_bins: int = params.NUM_MEL_BINS,
                *,
                frame_length: int = params.FRAME_LENGTH,
                frame_shift: int = params.FRAME_SHIFT,
                fft_length: int = params.FFT_LENGTH,
                low_freq: float = params.LOW_FREQ,
                high_freq: float = 0.0,
                preemphasis: float = params.PREEMPHASIS,
                dft: str = "matmul",
                power_scale: float = 1.0,
                runtime_matrices: bool = False) -> tf.Tensor:
    """Log-mel fbank of ``waveform`` ``[..., samples]`` → ``[..., frames, num_mel_bins]``.

    Frames follow Kaldi's snip_edges rule (1 + (n - 400) // 160; none when n < 400); each
    frame is DC-removed, pre-emphasised (0.97, the first sample uses itself), windowed by a
    symmetric Hann window, zero-padded to 512 and turned into a power spectrum; Kaldi's mel
    banks (20 Hz..Nyquist) sum it and the log is floored at float32 eps. ``sample_rate``,
    frame and FFT sizes default to PSLA's 16 kHz / 25 ms / 10 ms / 512.

    ``power_scale`` (s) divides the spectrum's magnitude by s before squaring and adds
    2 ln s back after the log (the floor is applied in the log domain, at ln eps − 2 ln s), so
    intermediate values and constants stay inside float16's range; the result is the same
    function (within float32 rounding).

    ``runtime_matrices`` stores the DFT and mel matrices as int32 bit patterns bitcast to
    float32 at run time, so TFLite weight quantisation (float16, dynamic) cannot round them:
    the front end keeps float32 precision (same values).
    """
    if dft not in ("matmul", "rfft"):
        raise ValueError(f"dft must be 'matmul' or 'rfft', got {dft!r}")
    x = tf.convert_to_tensor(waveform)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    if x.shape.rank is not None and x.shape.rank < 1:
        raise ValueError("waveform must have at least one (samples) dimension")
    frames = tf.signal.frame(x, frame_length, frame_shift, pad_end=False)  # [..., F, N]
    if dft == "matmul":
        matrix = _folded_dft_matrix(frame_length, fft_length, preemphasis)
        if power_scale != 1.0:
            matrix = (matrix / np.float32(power_scale)).astype(np.float32)
        matrix = _runtime_constant(matrix, x) if runtime_matrices else tf.constant(matrix)
        spec = tf.linalg.matmul(frames, matrix)  # rank-agnostic: [..., F, 2K]
        re, im = tf.split(spec, 2, axis=-1)
        power = re * re + im * im
    else:
        frames = frames - tf.reduce_mean(frames, axis=-1, keepdims=True)
        previous = tf.concat([frames[..., :1], frames[..., :-1]], axis=-1)
        frames = frames - preemphasis * previous
        window = tf.constant((0.5 - 0.5 * np.cos(
            2.0 * np.pi * np.arange(frame_length) / (frame_length - 1))).astype(np.float32))
        frames = frames * window
        if power_scale != 1.0:
            frames = frames / power_scale
        # zero-pad explicitly: RFFT rejects an empty frame axis when asked to pad itself
        pad = [[0, 0]] * (len(frames.shape) - 1) + [[0, fft_length - frame_length]]
        frames = tf.pad(frames, pad)
        power = tf.math.square(tf.abs(tf.signal.rfft(frames, fft_length=[fft_length])))
    banks = kaldi_mel_banks(num_mel_bins, sample_rate, fft_length, low_freq, high_freq)
    banks = _runtime_constant(banks, x) if runtime_matrices else tf.constant(banks)
    mel = tf.linalg.matmul(power, banks)  # [..., F, bins]
    if power_scale == 1.0:
        return tf.math.log(tf.maximum(mel, params.LOG_FLOOR))
    # log(max(m, eps / s²)) = max(log m, log eps − 2 ln s): the floor is applied in the log
    # domain, where it is an ordinary number (eps / s² itself underflows float16; log 0 = −inf
    # is lifted to the floor), then the scaling is undone
    log_floor = np.float32(math.log(params.LOG_FLOOR) - 2.0 * math.log(power_scale))
    shift = np.float32(2.0 * math.log(power_scale))
    if runtime_matrices:   # float16 would round 2 ln s by ~2e-3
        log_floor, shift = _runtime_constant(log_floor, x), _runtime_constant(shift, x)
    out = tf.maximum(tf.math.log(mel), log_floor)
    return out + shift


@keras.saving.register_keras_serializable(package="psla_tf")
class KaldiFbank(keras.layers.Layer):
    """Keras layer: waveform ``[batch, samples]`` → Kaldi log-mel ``[batch, frames, bins]``.

    Always computes in float32 (even under a mixed-precision policy), see module docstring.
    """

    def __init__(self, sample_rate: int = params.SAMPLE_RATE,
                 num_mel_bins: int = params.NUM_MEL_BINS, dft: str = "matmul",
                 power_scale: float = 1.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.num_mel_bins = int(num_mel_bins)
        self.dft = dft
        self.power_scale = float(power_scale)

    def call(self, waveform):
        return kaldi_fbank(waveform, self.sample_rate, self.num_mel_bins, dft=self.dft,
                           power_scale=self.power_scale)

    def compute_output_shape(self, input_shape):
        n = input_shape[-1]
        frames = None if n is None else num_frames(n)
        return tuple(input_shape[:-1]) + (frames, self.num_mel_bins)

    def get_config(self):
        config = super().get_config()
        config.update(sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins,
                      dft=self.dft, power_scale=self.power_scale)
        return config
