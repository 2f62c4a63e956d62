"""Frequency and time masking (paper Alg. 1, lines 16-18; DESIGN.md "Features"), and the
waveform / fbank augmentations psla_tf adds for unseen recordings (gain, speed, additive
noise, time shift, vocal-tract length perturbation; not in PSLA).

SpecAugment-style masking with torchaudio's exact semantics, as PSLA applies it per clip in its
dataloader (``torchaudio.transforms.FrequencyMasking(48)`` then ``TimeMasking(192)`` on the
padded fbank, before normalisation)::

    v ~ U[0, W)                 # W = max_width
    s ~ U[0, dim - v)
    start = long(s); end = long(s) + long(v)      # long() truncates toward zero
    x[start:end] = 0            # so the width long(v) is uniform on {0, ..., W - 1}

(torchaudio's ``mask_along_axis`` computes ``end`` as ``s.long() + v.long()``, not
``(s + v).long()``; the masked width is therefore always < W.) One mask per example, drawn
independently per example; identity unless ``training=True``. Pure TensorFlow ops on a
``[batch, time, freq]`` tensor: runs in ``tf.data``, in a Keras model and under XLA.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from psla_tf import params
from psla_tf.features import hz_to_mel, mel_bin_edges, mel_high_edge, mel_to_hz

__all__ = ["FrequencyMasking", "TimeMasking", "TimeShift", "VocalTractPerturbation",
           "mask_along_axis", "mel_warp_matrix", "random_gain", "random_noise", "random_speed",
           "shift_along_time", "vtln_high_cutoff", "vtln_warp_freq"]


def random_speed(waveform: tf.Tensor, num_samples: tf.Tensor, max_change: float,
                 seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Speed perturbation: play each clip of ``waveform`` ``[B, S]`` at rate r ~ U[1 − x,
    1 + x] (x = ``max_change``), one draw per clip from the stateless ``seed`` ``[2]``.

    Returns ``(waveform [B, S], num_samples [B])``: out[t] = x(r t) by linear interpolation
    over the clip's ``num_samples`` valid samples; the new clip has ⌊(n − 1) / r⌋ + 1 valid
    samples (cut at S), zeros after. Tempo and pitch change together (Ko et al. 2015, "Audio
    augmentation for speech recognition": Kaldi's 0.9/1.0/1.1 speed perturbation), which makes
    voices vary as different speakers' do. No anti-aliasing filter: with r ≤ 1 + x only
    content above SR / (2 r) (the top x of the band) can alias. Not in PSLA
    (``--random_speed``); identity when ``max_change`` is 0.
    """
    if not 0.0 <= float(max_change) < 1.0:
        raise ValueError(f"max_change must be in [0, 1), got {max_change}")
    if float(max_change) == 0:
        return waveform, num_samples
    x = tf.convert_to_tensor(waveform)
    n_in = tf.cast(num_samples, tf.int32)
    batch, total = tf.shape(x)[0], tf.shape(x)[1]
    rate = tf.random.stateless_uniform([batch], seed=tf.cast(seed, tf.int64),
                                       minval=1.0 - float(max_change),
                                       maxval=1.0 + float(max_change), dtype=tf.float32)
    n = tf.minimum(tf.maximum(n_in, 1), total)
    last = tf.cast(n - 1, tf.float32)
    n_out = tf.minimum(tf.cast(tf.floor(last / rate), tf.int32) + 1, total)
    pos = tf.cast(tf.range(total), tf.float32)[tf.newaxis, :] * rate[:, tf.newaxis]
    pos = tf.minimum(pos, last[:, tf.newaxis])
    lo = tf.cast(tf.floor(pos), tf.int32)
    hi = tf.minimum(lo + 1, (n - 1)[:, tf.newaxis])
    frac = tf.cast(pos - tf.cast(lo, tf.float32), x.dtype)
    y = (tf.gather(x, lo, batch_dims=1) * (1.0 - frac)
         + tf.gather(x, hi, batch_dims=1) * frac)
    valid = tf.range(total)[tf.newaxis, :] < n_out[:, tf.newaxis]
    y = tf.where(valid, y, tf.zeros_like(y))
    n_out = tf.where(n_in > 0, n_out, 0)
    return y, tf.cast(n_out, tf.convert_to_tensor(num_samples).dtype)


def random_gain(waveform: tf.Tensor, max_db: float, seed: tf.Tensor) -> tf.Tensor:
    """Random gain: scale each clip of ``waveform`` ``[B, S]`` (or one clip ``[S]``) by
    10^(g / 20), g ~ U[-max_db, max_db] dB, one draw per clip, a pure function of the
    stateless ``seed`` ``[2]``. Identity when ``max_db`` is 0.

    A level augmentation for training (not in PSLA; ``--random_gain_db``): the log-mel fbank
    of a scaled clip is the clip's fbank + 2 ln(10^(g/20)) in every frame above the log floor,
    so a model trained with it sees each clip at many recording levels — e.g. a speaker or
    microphone quieter than those of the training set. Applied by the training pipeline
    (``psla_tf.data.pipeline.make_train_dataset``) to the batched waveforms, after mixup.
    """
    if float(max_db) < 0:
        raise ValueError(f"max_db must be >= 0, got {max_db}")
    if float(max_db) == 0:
        return waveform
    x = tf.convert_to_tensor(waveform)
    batch_shape = tf.shape(x)[:1] if x.shape.rank == 2 else tf.constant([], tf.int32)
    g = tf.random.stateless_uniform(batch_shape, seed=tf.cast(seed, tf.int64),
                                    minval=-float(max_db), maxval=float(max_db),
                                    dtype=tf.float32)
    scale = tf.cast(tf.pow(10.0, g / 20.0), x.dtype)
    return x * (scale[:, tf.newaxis] if x.shape.rank == 2 else scale)


def random_noise(waveform: tf.Tensor, num_samples: tf.Tensor, snr_db: tuple[float, float],
                 prob: float, seed: tf.Tensor, decay_db: tuple[float, float] = (0.0, 0.0),
                 sample_rate: int = params.SAMPLE_RATE) -> tf.Tensor:
    """Additive Gaussian noise: with probability ``prob`` a clip of ``waveform`` ``[B, S]``
    gets noise at a signal-to-noise ratio ρ ~ U[``snr_db``] dB, one draw per clip from the
    stateless ``seed`` ``[2]``.

    Returns ``[B, S]``: x + σ ε on the clip's ``num_samples`` ``[B]`` valid samples (zeros
    after stay zero), σ² = P / 10^(ρ / 10) with P the mean power of those samples (a silent
    clip stays silent). ε is white, N(0, 1), when ``decay_db`` is (0, 0) (audiomentations'
    ``AddGaussianSNR``); otherwise coloured: its spectrum falls by δ ~ U[``decay_db``] dB per
    octave above ``params.NOISE_CORNER_HZ`` (flat below; 3 is pink, 6 brown, as audiomentations'
    ``AddColorNoise``), scaled to unit mean power over the valid samples. Room and
    microphone noise falls with frequency (FSDD's recordings: 15-20 dB from 0.25 to 3.5 kHz,
    docs/fsdd_recipe.md). Not in PSLA: ``--noise_prob``, ``--noise_snr_min_db``,
    ``--noise_snr_max_db``, ``--noise_decay_min_db``, ``--noise_decay_max_db``; identity
    when ``prob`` is 0.
    """
    low, high = (float(v) for v in snr_db)
    d_low, d_high = (float(v) for v in decay_db)
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if high < low:
        raise ValueError(f"snr_db must be (low, high) with low <= high, got {snr_db}")
    if not 0.0 <= d_low <= d_high:
        raise ValueError(f"decay_db must be (low, high) with 0 <= low <= high, got {decay_db}")
    if float(prob) == 0:
        return waveform
    x = tf.convert_to_tensor(waveform)
    batch, total = tf.shape(x)[0], tf.shape(x)[1]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    snr = tf.random.stateless_uniform([batch], seed=seeds[0], minval=low, maxval=high)
    apply = tf.random.stateless_uniform([batch], seed=seeds[1]) < float(prob)
    valid = tf.range(total)[tf.newaxis, :] < tf.cast(num_samples, tf.int32)[:, tf.newaxis]
    xf = tf.cast(x, tf.float32)
    n = tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32), axis=1), 1.0)
    power = tf.reduce_sum(tf.where(valid, tf.square(xf), 0.0), axis=1) / n
    sigma = tf.sqrt(power / tf.pow(10.0, snr / 10.0)) * tf.cast(apply, tf.float32)
    eps = tf.random.stateless_normal(tf.shape(x), seed=seeds[2], dtype=tf.float32)
    if d_high > 0:
        delta = tf.random.stateless_uniform(
            [batch], seed=tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 3),
            minval=d_low, maxval=d_high)
        eps = _coloured(eps, delta, valid, n, sample_rate)
    noise = tf.where(valid, sigma[:, tf.newaxis] * eps, 0.0)
    return x + tf.cast(noise, x.dtype)


def _coloured(eps: tf.Tensor, decay_db: tf.Tensor, valid: tf.Tensor, n: tf.Tensor,
              sample_rate: int) -> tf.Tensor:
    """White noise ``eps`` ``[B, S]`` shaped in the frequency domain: amplitude × (f / f_c) ^
    (−δ / 20 log10 2) above the corner f_c = ``params.NOISE_CORNER_HZ`` (δ = ``decay_db``
    ``[B]`` dB per octave), then scaled to unit mean power over the ``valid`` ``[B, S]``
    samples (``n`` ``[B]`` of them)."""
    total = tf.shape(eps)[1]
    bins = total // 2 + 1
    freq = tf.cast(tf.range(bins), tf.float32) * (float(sample_rate) / tf.cast(total, tf.float32))
    corner = params.NOISE_CORNER_HZ
    octaves = tf.math.log(tf.maximum(freq, corner) / corner) / np.log(2.0)
    gain = tf.pow(10.0, -decay_db[:, tf.newaxis] * octaves[tf.newaxis, :] / 20.0)   # [B, K]
    shaped = tf.signal.irfft(tf.signal.rfft(eps) * tf.cast(gain, tf.complex64),
                             fft_length=[total])
    power = tf.reduce_sum(tf.where(valid, tf.square(shaped), 0.0), axis=1) / n
    return shaped * tf.math.rsqrt(tf.maximum(power, 1e-20))[:, tf.newaxis]


def mask_along_axis(x: tf.Tensor, max_width: int, axis: int, uniform: tf.Tensor,
                    mask_value: float = 0.0) -> tf.Tensor:
    """Mask one run per example of ``x`` ``[B, T, F]`` along ``axis`` (1 time, 2 frequency).

    ``uniform`` ``[B, 2]`` holds U[0, 1) draws: column 0 gives v = u0 * max_width, column 1
    gives s = u1 * (dim - v); positions long(s) .. long(s) + long(v) - 1 are set to
    ``mask_value`` (torchaudio's ``mask_along_axis_iid``).
    """
    if axis not in (1, 2):
        raise ValueError(f"axis must be 1 (time) or 2 (frequency) of [B, T, F], got {axis}")
    dim = tf.shape(x)[axis]
    uniform = tf.cast(uniform, tf.float32)
    value = uniform[:, 0] * float(max_width)
    min_value = uniform[:, 1] * (tf.cast(dim, tf.float32) - value)
    start = tf.cast(min_value, tf.int32)                  # .long(): truncation toward zero
    end = start + tf.cast(value, tf.int32)
    pos = tf.range(dim, dtype=tf.int32)[tf.newaxis, :]
    mask = (pos >= start[:, tf.newaxis]) & (pos < end[:, tf.newaxis])  # [B, dim]
    mask = mask[:, :, tf.newaxis] if axis == 1 else mask[:, tf.newaxis, :]
    return tf.where(mask, tf.cast(mask_value, x.dtype), x)


def shift_along_time(x: tf.Tensor, shift: tf.Tensor, fill_value: float = 0.0) -> tf.Tensor:
    """Delay each example of ``x`` ``[B, T, F]`` by ``shift`` ``[B]`` frames (≥ 0):
    out[b, t] = x[b, t − shift_b] for t ≥ shift_b, ``fill_value`` before; frames pushed past
    T are dropped. Shape ``[B, T, F]`` kept."""
    frames = tf.shape(x)[1]
    shift = tf.clip_by_value(tf.cast(tf.reshape(shift, [-1]), tf.int32), 0, frames)
    src = tf.range(frames)[tf.newaxis, :] - shift[:, tf.newaxis]              # [B, T]
    out = tf.gather(x, tf.maximum(src, 0), axis=1, batch_dims=1)
    return tf.where((src >= 0)[:, :, tf.newaxis], out, tf.cast(fill_value, x.dtype))


def vtln_high_cutoff(low_freq: float, high_freq: float, low_cutoff: float = params.VTLN_LOW,
                     high_cutoff: float = params.VTLN_HIGH) -> float:
    """The VTLN warp's upper cutoff in Hz (``high_cutoff <= 0``: below ``high_freq``);
    ``ValueError`` unless low_freq < low_cutoff < it < high_freq (Kaldi's checks)."""
    hc = high_freq + high_cutoff if high_cutoff <= 0 else high_cutoff
    if not low_freq < low_cutoff < hc < high_freq:
        raise ValueError(f"VTLN cutoffs must satisfy low_freq < low < high < high_freq, got "
                         f"{low_freq:g} < {low_cutoff:g} < {hc:g} < {high_freq:g}")
    return hc


def vtln_warp_freq(freq: tf.Tensor, warp: tf.Tensor, low_freq: float, high_freq: float,
                   low_cutoff: float = params.VTLN_LOW,
                   high_cutoff: float = params.VTLN_HIGH) -> tf.Tensor:
    """Kaldi's vocal-tract length warp of frequencies (``VtlnWarpFreq``, mel-computations.cc).

    ``freq`` (Hz) and the warp factor α ``warp`` broadcast together (e.g. ``[1, M]`` and
    ``[B, 1]`` → ``[B, M]``). Piecewise linear: f / α between l = ``low_cutoff`` · max(1, α)
    and h = ``high_cutoff`` · min(1, α), joined by straight lines to the fixed edges
    ``low_freq`` and ``high_freq`` (the mel banks' edges, Hz); unchanged outside them.
    ``high_cutoff <= 0`` is taken below ``high_freq`` (Kaldi takes it below Nyquist, the same
    for the default banks).
    """
    hc = vtln_high_cutoff(low_freq, high_freq, low_cutoff, high_cutoff)
    f = tf.convert_to_tensor(freq, tf.float32)
    a = tf.convert_to_tensor(warp, tf.float32)
    lo = low_cutoff * tf.maximum(1.0, a)
    hi = hc * tf.minimum(1.0, a)
    scale = 1.0 / a
    scale_left = (scale * lo - low_freq) / (lo - low_freq)
    scale_right = (high_freq - scale * hi) / (high_freq - hi)
    out = tf.where(f < lo, low_freq + scale_left * (f - low_freq),
                   tf.where(f < hi, scale * f, high_freq + scale_right * (f - high_freq)))
    return tf.where((f < low_freq) | (f > high_freq), f, out)


def mel_warp_matrix(warp: tf.Tensor, num_mel_bins: int, low_freq: float = params.LOW_FREQ,
                    high_freq: float = 0.0,
                    sample_rate: int = params.SAMPLE_RATE) -> tf.Tensor:
    """``[B, M, M]`` matrices that warp log-mel frames by the factors ``warp`` ``[B]``.

    ``fbank [B, T, M] @ W`` gives each output bin i the input interpolated linearly (along the
    mel axis) at the bin centre f_i moved by :func:`vtln_warp_freq` — where Kaldi's VTLN puts
    bin i's triangle (the triangles' widths are not rescaled). α = 1 is the identity (to
    float32 rounding of the positions); positions past the first / last bin use that bin.
    ``high_freq``: the banks' upper edge as for ``kaldi_mel_banks`` (0 = Nyquist).
    """
    edge = mel_high_edge(float(high_freq), float(low_freq), sample_rate)
    edges = mel_bin_edges(num_mel_bins, float(low_freq), edge, sample_rate)
    centres, delta = edges[1:-1], edges[1] - edges[0]                           # mel, [M]
    a = tf.reshape(tf.cast(warp, tf.float32), [-1, 1])
    source = vtln_warp_freq(tf.constant(mel_to_hz(centres)[None, :], tf.float32), a,
                            float(low_freq), edge)                              # Hz, [B, M]
    pos = (np.arange(num_mel_bins, dtype=np.float32)[None, :]
           + (hz_to_mel(source) - tf.constant(centres[None, :], tf.float32)) / float(delta))
    pos = tf.clip_by_value(pos, 0.0, float(num_mel_bins - 1))
    j = tf.range(num_mel_bins, dtype=tf.float32)[tf.newaxis, :, tf.newaxis]    # input bin
    return tf.nn.relu(1.0 - tf.abs(pos[:, tf.newaxis, :] - j))                  # [B, M, M]


class _FbankAugment(keras.layers.Layer):
    """Shared body of the training-only ``[B, T, F]`` augmentations: one size argument
    (``_size``: its name, ``_type``: int or float), a seed, identity at inference or at
    size 0."""

    _size: str = "max_width"
    _type: type = int

    def __init__(self, size: int | float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if self._type(size) < 0:
            raise ValueError(f"{self._size} must be >= 0, got {size}")
        setattr(self, self._size, self._type(size))
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs, training=None):
        if not training or not getattr(self, self._size):
            return inputs
        return self._augment(inputs)

    def _augment(self, inputs):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({self._size: getattr(self, self._size), "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="psla_tf")
class TimeShift(_FbankAugment):
    """Delay each ``[B, T, F]`` example by d ~ U{0, …, ``max_shift``} frames, training only.

    Not in PSLA (``--time_shift``): with a short input (e.g. FSDD's 64 frames) the backbone's
    last feature map has 2 time steps, so a model trained on clips whose sound starts at the
    first frame learns where it starts; recordings with a lead-in of silence (another speaker,
    another recorder) then look new. The delay fills with 0, the value of padding frames
    (``AudioFrontend``: raw fbank 0, or the clip's mean under ``clip_norm``).
    """

    _size = "max_shift"

    def __init__(self, max_shift: int = 0, seed: int | None = None, **kwargs):
        super().__init__(max_shift, seed, **kwargs)

    def _augment(self, inputs):
        u = keras.random.uniform(tf.shape(inputs)[:1], seed=self.seed_generator,
                                 dtype="float32")
        shift = tf.minimum(tf.cast(u * float(self.max_shift + 1), tf.int32), self.max_shift)
        return shift_along_time(inputs, shift)


class _AxisMasking(_FbankAugment):
    """Shared body of FrequencyMasking / TimeMasking (one mask per example)."""

    _axis: int = 1
    _size = "max_width"

    def _augment(self, inputs):
        batch = tf.shape(inputs)[0]
        uniform = keras.random.uniform(tf.stack([batch, 2]), seed=self.seed_generator,
                                       dtype="float32")
        return mask_along_axis(inputs, self.max_width, self._axis, uniform)


@keras.saving.register_keras_serializable(package="psla_tf")
class FrequencyMasking(_AxisMasking):
    """Zero one run of < ``max_width`` mel bins of each ``[B, T, F]`` example (training only)."""

    _axis = 2

    def __init__(self, max_width: int = params.FREQM, seed: int | None = None, **kwargs):
        super().__init__(max_width, seed, **kwargs)


@keras.saving.register_keras_serializable(package="psla_tf")
class TimeMasking(_AxisMasking):
    """Zero one run of < ``max_width`` frames of each ``[B, T, F]`` example (training only)."""

    _axis = 1

    def __init__(self, max_width: int = params.TIMEM, seed: int | None = None, **kwargs):
        super().__init__(max_width, seed, **kwargs)


@keras.saving.register_keras_serializable(package="psla_tf")
class VocalTractPerturbation(_FbankAugment):
    """Vocal-tract length perturbation of ``[B, T, M]`` log-mel fbank, training only.

    Each example's mel axis is warped by α ~ U[1 − x, 1 + x] (x = ``max_warp``;
    :func:`mel_warp_matrix`): formants move as for a shorter or longer vocal tract while
    pitch and tempo stay (Jaitly & Hinton 2013, "Vocal tract length perturbation (VTLP)
    improves speech recognition"; the warp is Kaldi's VTLN). Not in PSLA (``--vtlp``); for
    voices unseen in training. ``low_freq`` / ``high_freq``: the fbank's mel edges (Hz; high
    0 = Nyquist). Frames of zeros (padding) stay zero. Identity at inference or x = 0.
    """

    _size = "max_warp"
    _type = float

    def __init__(self, max_warp: float = 0.0, low_freq: float = params.LOW_FREQ,
                 high_freq: float = 0.0, seed: int | None = None, **kwargs):
        if float(max_warp) >= 0.5:
            raise ValueError(f"max_warp must be in [0, 0.5), got {max_warp}")
        super().__init__(max_warp, seed, **kwargs)
        self.low_freq = float(low_freq)
        self.high_freq = float(high_freq)
        if self.max_warp:       # ValueError now, not at the first training step
            vtln_high_cutoff(self.low_freq, mel_high_edge(self.high_freq, self.low_freq))

    def _augment(self, inputs):
        warp = keras.random.uniform(tf.shape(inputs)[:1], minval=1.0 - self.max_warp,
                                    maxval=1.0 + self.max_warp, seed=self.seed_generator,
                                    dtype="float32")
        matrix = mel_warp_matrix(warp, int(inputs.shape[-1]), self.low_freq, self.high_freq)
        return tf.linalg.matmul(inputs, tf.cast(matrix, inputs.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(low_freq=self.low_freq, high_freq=self.high_freq)
        return config
