"""Waveform → normalised log-mel fbank inside the model (paper Sec. II-C, Alg. 1 lines 16-18).

``AudioFrontend`` follows PSLA's dataloader order for a batch of padded waveforms:

1. subtract each clip's mean over its ``num_samples`` valid samples; zero the padding (the
   matmul DFT, exports; the rfft path skips both passes: Kaldi's per-frame DC removal makes
   the features independent of a constant offset, and the frames that reach into the padding
   are zeroed in step 3, so the result is the same within float32 rounding);
2. Kaldi fbank (``psla_tf.features.kaldi_fbank``; ``high_freq``: the mel banks' upper edge,
   Kaldi's option, 0 = Nyquist as in PSLA — below it for band-limited recordings, e.g. 4000
   for 8-kHz telephone or FSDD audio, so no bin holds only the empty band);
3. zero the frames past the clip's end (frame f is valid iff 160 f + 400 ≤ n, so the kept
   frames equal the fbank of the unpadded clip);
   (``trim_onset_db`` > 0, not in PSLA: drop the clip's leading frames more than that many
   dB below its loudest frame, :func:`leading_silence`, so every clip starts at its sound)
4. zero-pad or cut to ``target_length`` frames;
   (``num_ceps`` > 0, not in PSLA: each frame smoothed to its first ``num_ceps`` cepstral
   coefficients, ``features.cepstral_lifter_matrix`` — the spectral envelope without the
   speaker's pitch harmonics; padding frames stay 0)
   (training only, ``vtlp`` > 0, not in PSLA: each clip's mel axis warped by a random
   vocal-tract length factor, ``augment.VocalTractPerturbation``, before any normalisation)
5. training only: TimeShift(time_shift) (a random delay, not in PSLA), then
   FrequencyMasking(freqm) and TimeMasking(timem) (each skipped when 0);
6. normalise: (x − dataset_mean) / dataset_std.

``clip_norm`` (default ``"none"``: the paper's steps above) normalises each clip by its own
statistics instead — per-utterance cepstral mean (and variance) normalisation in the log-mel
domain, not in PSLA. A recording's level and a fixed channel (microphone, room) add a
per-bin constant to the log-mel fbank, which the per-bin mean over the clip's frames
removes. Over the clip's ``n`` valid frames (those steps 3-4 keep, f < n), per mel bin m:
μ_m = mean_f x[f, m], σ²_m = mean_f (x[f, m] − μ_m)²; then

* ``"cmn"``:  y = (x − μ_m) / dataset_std;
* ``"cmvn"``: y = (x − μ_m) / sqrt(σ²_m + ``CMVN_VAR_FLOOR``) (``dataset_mean/std`` unused);
* ``"pcen"``: per-channel energy normalisation (Wang et al. 2017, for keyword spotting in
  noise) of the mel energies E = exp(x), then ``"cmvn"`` of the result: a smoother
  M[f] = (1 − s) M[f − 1] + s E[f] with M[−1] = E[0], then
  (E / (ε + M)^α + δ)^r − δ^r (:func:`pcen`; librosa's defaults: s for a 0.4-s time
  constant at the 10-ms hop, α 0.98, δ 2, r 0.5, ε 1e-6). Each bin's gain follows its
  recent level (a level and channel), and the offset δ suppresses a stationary background.

padding frames (f ≥ n) are 0 (the clip's mean) instead of step 6's −mean/std of a zero
frame, so no trace of the level is left, and in training the masks (step 5) are applied
after the normalisation, to 0 = the clip's mean. A clip shorter than one frame gives zeros.
It is part of the layer, so every exported form (SavedModel, TFLite, ONNX) carries it; for
windowed exports each window is normalised by its own statistics.

``dft`` (default ``"auto"``) is ``kaldi_fbank``'s DFT choice, resolved where the layer is
traced: the rfft path on CPU and GPU (the fastest exact one), the folded matmul on a TPU; the
exports (SavedModel, TFLite, ONNX) always trace the matmul form (``features.forced_dft``).
``power_scale`` (default 1) is passed to ``kaldi_fbank``: the TFLite export sets it so the
power spectrum of a full-scale clip stays inside float16's range (same function).

Output ``[B, target_length, num_mel_bins]`` float32 under any mixed-precision policy.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from psla_tf import params
from psla_tf.augment import FrequencyMasking, TimeMasking, TimeShift, VocalTractPerturbation
from psla_tf.features import (DFTS, cepstral_lifter_matrix, kaldi_fbank, mel_high_edge,
                               resolve_dft, runtime_constant)

__all__ = ["AudioFrontend", "CLIP_NORMS", "CMVN_VAR_FLOOR", "clip_normalise",
           "drop_leading_frames", "leading_silence", "pcen", "pcen_smoothing"]

CLIP_NORMS = ("none", "cmn", "cmvn", "pcen")
#: variance floor of "cmvn" (log-mel units²): a bin whose level hardly moves within the clip
#: (digital silence, a band-limited recording's empty bins) is not blown up to unit variance;
#: 1e-2 is a std of 0.1, ~1/20 of a speech clip's typical within-clip std per bin
CMVN_VAR_FLOOR = 1e-2


def clip_normalise(fb: tf.Tensor, n_frames: tf.Tensor, mode: str, dataset_std: float = 1.0,
                   var_floor: float = CMVN_VAR_FLOOR) -> tf.Tensor:
    """Per-clip, per-bin normalisation of ``fb`` ``[B, T, M]`` over each clip's first
    ``n_frames`` ``[B]`` frames (see the module doc); frames past them → 0."""
    valid = tf.cast(tf.range(tf.shape(fb)[1])[tf.newaxis, :] < n_frames[:, tf.newaxis],
                    fb.dtype)[:, :, tf.newaxis]                              # [B, T, 1]
    count = tf.cast(tf.maximum(n_frames, 1), fb.dtype)[:, tf.newaxis, tf.newaxis]
    mean = tf.reduce_sum(fb * valid, axis=1, keepdims=True) / count          # [B, 1, M]
    x = (fb - mean) * valid
    if mode == "cmn":
        return x / dataset_std
    if mode == "cmvn":
        var = tf.reduce_sum(tf.square(x), axis=1, keepdims=True) / count     # [B, 1, M]
        return x * tf.math.rsqrt(var + var_floor)
    if mode == "pcen":
        return clip_normalise(pcen(fb, n_frames), n_frames, "cmvn", var_floor=var_floor)
    raise ValueError(f"clip_norm must be one of {CLIP_NORMS}, got {mode!r}")


def pcen_smoothing(time_constant: float = 0.4, hop_seconds: float = params.FRAME_SHIFT
                   / params.SAMPLE_RATE) -> float:
    """PCEN's smoother coefficient s for a time constant in seconds (librosa's ``pcen``)."""
    t = time_constant / hop_seconds
    return float((1.0 + 4.0 * t * t) ** 0.5 - 1.0) / (2.0 * t * t)


def pcen(fb: tf.Tensor, n_frames: tf.Tensor, s: float | None = None, alpha: float = 0.98,
         delta: float = 2.0, r: float = 0.5, eps: float = 1e-6) -> tf.Tensor:
    """Per-channel energy normalisation of the log-mel ``fb`` ``[B, T, M]`` (natural log of
    mel power, Kaldi's) over each clip's first ``n_frames`` ``[B]`` frames → ``[B, T, M]``,
    frames past them 0 (Wang et al. 2017, "Trainable frontend for robust and far-field
    keyword spotting", eq. 1, fixed parameters).

    E = exp(fb); M[f] = (1 − s) M[f − 1] + s E[f] with M[−1] = E[0] (a clip starts at its own
    level); PCEN = (E / (ε + M)^α + δ)^r − δ^r. The recursion is one ``[T, T]`` matrix
    product (a static time axis, so every export carries it as a MatMul); ``s`` defaults to
    :func:`pcen_smoothing`'s 0.4-s time constant.
    """
    s = pcen_smoothing() if s is None else float(s)
    frames = fb.shape[1] if fb.shape[1] is not None else tf.shape(fb)[1]
    f = tf.range(frames, dtype=tf.float32)
    lag = f[tf.newaxis, :] - f[:, tf.newaxis]                              # [T', T]: T − T'
    decay = tf.where(lag >= 0, s * tf.pow(1.0 - s, tf.maximum(lag, 0.0)), 0.0)
    energy = tf.exp(tf.cast(fb, tf.float32))
    valid = (tf.range(frames)[tf.newaxis, :] < n_frames[:, tf.newaxis])[:, :, tf.newaxis]
    energy = tf.where(valid, energy, 0.0)
    smooth = (tf.einsum("btm,tu->bum", energy, decay)
              + tf.pow(1.0 - s, f + 1.0)[tf.newaxis, :, tf.newaxis] * energy[:, :1])
    gain = energy / tf.pow(eps + smooth, alpha)
    out = tf.pow(gain + delta, r) - delta ** r
    return tf.cast(tf.where(valid, out, 0.0), fb.dtype)


def leading_silence(fb: tf.Tensor, n_frames: tf.Tensor, threshold_db: float) -> tf.Tensor:
    """Leading frames ``[B]`` of each clip of the raw log-mel ``fb`` ``[B, T, M]`` (natural
    log of mel power, Kaldi's) whose energy is more than ``threshold_db`` below the clip's
    loudest of its first ``n_frames`` ``[B]`` frames: the index of the first frame f with
    10 log10 Σ_m exp(fb[f, m]) ≥ max_f (…) − threshold_db (0 for a clip without frames)."""
    frames = tf.shape(fb)[1]
    valid = tf.range(frames)[tf.newaxis, :] < n_frames[:, tf.newaxis]         # [B, T]
    energy = tf.where(valid, tf.reduce_logsumexp(fb, axis=2), -float("inf"))  # ln power
    loudest = tf.reduce_max(energy, axis=1, keepdims=True)
    loud = valid & (energy >= loudest - float(threshold_db) * 0.1 * 2.302585092994046)
    return tf.where(tf.reduce_any(loud, axis=1),
                    tf.argmax(tf.cast(loud, tf.int32), axis=1, output_type=tf.int32), 0)


def drop_leading_frames(fb: tf.Tensor, n_frames: tf.Tensor, drop: tf.Tensor
                        ) -> tuple[tf.Tensor, tf.Tensor]:
    """``fb`` ``[B, T, M]`` with each clip's first ``drop`` ``[B]`` frames removed (its later
    frames moved to the front, zeros after its ``n_frames − drop`` remaining ones) and the
    remaining counts ``[B]``."""
    frames = tf.shape(fb)[1]
    src = tf.range(frames)[tf.newaxis, :] + drop[:, tf.newaxis]               # [B, T]
    kept = n_frames - drop
    out = tf.gather(fb, tf.minimum(src, frames - 1), axis=1, batch_dims=1)
    keep = tf.range(frames)[tf.newaxis, :] < kept[:, tf.newaxis]
    return tf.where(keep[:, :, tf.newaxis], out, tf.zeros_like(out)), kept


def _valid_samples(waveform: tf.Tensor, num_samples: tf.Tensor) -> tf.Tensor:
    """Samples of each clip ``[B]`` int32, clamped to [0, the waveform's length]."""
    n = tf.minimum(tf.cast(tf.reshape(num_samples, [-1]), tf.int32), tf.shape(waveform)[1])
    return tf.maximum(n, 0)


def _frame_count(n: tf.Tensor) -> tf.Tensor:
    """Kaldi's snip_edges frame count of ``n`` samples ``[B]`` (``features.num_frames``)."""
    return tf.where(n >= params.FRAME_LENGTH,
                    1 + (n - params.FRAME_LENGTH) // params.FRAME_SHIFT, 0)


@keras.saving.register_keras_serializable(package="psla_tf")
class AudioFrontend(keras.layers.Layer):
    """``(waveform [B, S], num_samples [B]) → normalised fbank [B, target_length, mel]``."""

    def __init__(self, target_length: int = params.TARGET_LENGTH,
                 num_mel_bins: int = params.NUM_MEL_BINS, freqm: int = params.FREQM,
                 timem: int = params.TIMEM, dataset_mean: float = params.DATASET_MEAN,
                 dataset_std: float = params.DATASET_STD, seed: int | None = None,
                 dft: str = "auto", power_scale: float = 1.0, clip_norm: str = "none",
                 num_ceps: int = 0, high_freq: float = 0.0, time_shift: int = 0,
                 trim_onset_db: float = 0.0, vtlp: float = 0.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if int(target_length) < 1:
            raise ValueError(f"target_length must be >= 1 frame, got {target_length}")
        if float(dataset_std) <= 0:
            raise ValueError(f"dataset_std must be > 0, got {dataset_std}")
        if int(freqm) < 0 or int(timem) < 0 or int(time_shift) < 0:
            raise ValueError(f"freqm, timem and time_shift must be >= 0, got {freqm}, {timem}, "
                             f"{time_shift}")
        if dft not in DFTS:
            raise ValueError(f"dft must be one of {DFTS}, got {dft!r}")
        if clip_norm not in CLIP_NORMS:
            raise ValueError(f"clip_norm must be one of {CLIP_NORMS}, got {clip_norm!r}")
        if not 0 <= int(num_ceps) <= int(num_mel_bins):
            raise ValueError(f"num_ceps must be 0 (off) or 1..{num_mel_bins}, got {num_ceps}")
        mel_high_edge(float(high_freq))        # ValueError outside the recorded band
        if float(trim_onset_db) < 0:
            raise ValueError(f"trim_onset_db must be >= 0 (0 off), got {trim_onset_db}")
        self.target_length = int(target_length)
        self.num_mel_bins = int(num_mel_bins)
        self.freqm = int(freqm)
        self.timem = int(timem)
        self.dataset_mean = float(dataset_mean)
        self.dataset_std = float(dataset_std)
        self.seed = seed
        self.dft = dft
        self.power_scale = float(power_scale)   # kaldi_fbank's float16-safe scaling (export)
        self.clip_norm = clip_norm
        self.num_ceps = int(num_ceps)
        self.high_freq = float(high_freq)
        self.time_shift = int(time_shift)
        self.trim_onset_db = float(trim_onset_db)
        self.vtlp = float(vtlp)
        self.runtime_matrices = False           # set by the TFLite export (kaldi_fbank doc)
        self.frequency_masking = FrequencyMasking(
            self.freqm, seed=seed, name="frequency_masking") if self.freqm else None
        self.time_masking = TimeMasking(
            self.timem, seed=None if seed is None else seed + 1,
            name="time_masking") if self.timem else None
        self.time_shifting = TimeShift(
            self.time_shift, seed=None if seed is None else seed + 2,
            name="time_shift") if self.time_shift else None
        self.vocal_tract = VocalTractPerturbation(
            self.vtlp, high_freq=self.high_freq, seed=None if seed is None else seed + 3,
            name="vocal_tract") if self.vtlp else None

    def build(self, waveform_shape=None, num_samples_shape=None):
        shape = (None, self.target_length, self.num_mel_bins)
        for layer in (self.vocal_tract, self.time_shifting, self.frequency_masking,
                      self.time_masking):
            if layer is not None and not layer.built:
                layer.build(shape)
        self.built = True

    def fbank(self, waveform, num_samples):
        """Steps 1-4: padded, un-normalised fbank ``[B, target_length, mel]``."""
        return self._fbank_and_frames(waveform, num_samples)[0]

    def _fbank_and_frames(self, waveform, num_samples):
        """Steps 1-4 → (fbank ``[B, target_length, mel]``, its valid frames ``[B]``)."""
        w = tf.cast(waveform, tf.float32)
        total = tf.shape(w)[1]
        n = _valid_samples(waveform, num_samples)
        dft = resolve_dft(self.dft)
        if dft == "matmul":   # the folded DFT cancels a DC offset in (float16) arithmetic
            valid = tf.cast(tf.range(total)[tf.newaxis, :] < n[:, tf.newaxis], tf.float32)
            mean = tf.reduce_sum(w * valid, axis=1) / tf.cast(tf.maximum(n, 1), tf.float32)
            w = (w - mean[:, tf.newaxis]) * valid
        fb = kaldi_fbank(w, params.SAMPLE_RATE, self.num_mel_bins, dft=dft,
                         power_scale=self.power_scale, high_freq=self.high_freq,
                         runtime_matrices=getattr(self, "runtime_matrices", False))  # [B, F, M]
        frames = tf.shape(fb)[1]
        n_frames = _frame_count(n)
        if fb.shape[0] == 1:   # one clip (tf.data, clip by clip): a cut, no copy when whole
            fb = fb[:, :n_frames[0]]
        else:
            keep = tf.range(frames)[tf.newaxis, :] < n_frames[:, tf.newaxis]
            fb = tf.where(keep[:, :, tf.newaxis], fb, 0.0)
        if self.trim_onset_db > 0:
            fb, n_frames = drop_leading_frames(
                fb, n_frames, leading_silence(fb, n_frames, self.trim_onset_db))
        fb = fb[:, :self.target_length]
        pad = tf.maximum(self.target_length - tf.shape(fb)[1], 0)
        fb = tf.pad(fb, [[0, 0], [0, pad], [0, 0]])
        if self.num_ceps:
            lifter = cepstral_lifter_matrix(self.num_mel_bins, self.num_ceps)
            if getattr(self, "runtime_matrices", False):   # not quantised by TFLite (features)
                lifter = runtime_constant(lifter, fb)
            fb = tf.linalg.matmul(fb, lifter)
        fb = tf.ensure_shape(fb, [None, self.target_length, self.num_mel_bins])
        return fb, tf.minimum(n_frames, self.target_length)

    def valid_frames(self, waveform, num_samples):
        """Frames of each clip that ``fbank`` keeps ``[B]`` (at most ``target_length``;
        with ``trim_onset_db`` this computes the fbank)."""
        if self.trim_onset_db > 0:
            return self._fbank_and_frames(waveform, num_samples)[1]
        return tf.minimum(_frame_count(_valid_samples(waveform, num_samples)),
                          self.target_length)

    def _mask(self, fb):
        if self.time_shifting is not None:
            fb = self.time_shifting(fb, training=True)
        if self.frequency_masking is not None:
            fb = self.frequency_masking(fb, training=True)
        if self.time_masking is not None:
            fb = self.time_masking(fb, training=True)
        return fb

    def call(self, waveform, num_samples, training=None):
        fb, n_frames = self._fbank_and_frames(waveform, num_samples)
        if training and self.vocal_tract is not None:   # before the statistics are taken
            fb = self.vocal_tract(fb, training=True)
        if self.clip_norm != "none":   # the clip's own statistics; masks to its mean (0)
            fb = clip_normalise(fb, n_frames, self.clip_norm, self.dataset_std)
            return self._mask(fb) if training else fb
        if training:
            fb = self._mask(fb)
        return (fb - self.dataset_mean) / self.dataset_std

    def compute_output_shape(self, waveform_shape, num_samples_shape=None):
        return (waveform_shape[0], self.target_length, self.num_mel_bins)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(target_length=self.target_length, num_mel_bins=self.num_mel_bins,
                      freqm=self.freqm, timem=self.timem, dataset_mean=self.dataset_mean,
                      dataset_std=self.dataset_std, seed=self.seed, dft=self.dft,
                      power_scale=self.power_scale, clip_norm=self.clip_norm,
                      num_ceps=self.num_ceps, high_freq=self.high_freq,
                      time_shift=self.time_shift, trim_onset_db=self.trim_onset_db,
                      vtlp=self.vtlp)
        return config
