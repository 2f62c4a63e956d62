"""Constants of the PSLA recipe (paper Sec. II; numbers from the reference code).

One flat module, as YAMNet's ``params.py``: every default that the features, the data
pipeline and the recipes share lives here, so flags and layers agree.
"""

SAMPLE_RATE: int = 16000          # Hz, the rate every clip is resampled to
FRAME_LENGTH: int = 400           # samples (25 ms)
FRAME_SHIFT: int = 160            # samples (10 ms)
FFT_LENGTH: int = 512             # FFT size (400 padded to the next power of two)
NUM_MEL_BINS: int = 128
LOW_FREQ: float = 20.0            # Hz, Kaldi's default lower mel edge
PREEMPHASIS: float = 0.97
LOG_FLOOR: float = 1.1920928955078125e-07  # float32 machine epsilon (torch.finfo(float).eps)

TARGET_LENGTH: int = 1056         # frames, AudioSet 10-s clips padded (FSD50K: 3000)
DATASET_MEAN: float = -4.6476     # AudioSet fbank mean (reference's normalisation)
DATASET_STD: float = 4.5699       # AudioSet fbank std

VTLN_LOW: float = 100.0           # Hz, Kaldi's --vtln-low (vocal-tract warp's lower cutoff)
VTLN_HIGH: float = -500.0         # Hz, Kaldi's --vtln-high: upper cutoff, below the mel edge

FREQM: int = 48                   # max frequency-mask width (bins)
TIMEM: int = 192                  # max time-mask width (frames)
MIXUP: float = 0.5                # mixup rate
MIXUP_ALPHA: float = 10.0         # Beta(alpha, alpha)
WEIGHT_DECAY: float = 5e-7        # Adam's coupled L2 (Sec. II-B, torch's weight_decay)
# reading (not in the paper): the i.i.d. order holds a training set of at most this many MB in
# memory and looks records up instead of reading them at their offsets (psla_tf.data.pipeline)
RECORDS_IN_MEMORY_MB: int = 1024
# additive white noise for noisier recordings (not in the paper; off unless --noise_prob > 0):
# the signal-to-noise ratio range in dB (psla_tf.augment.random_noise)
NOISE_SNR_MIN_DB: float = 10.0
NOISE_SNR_MAX_DB: float = 30.0
NOISE_CORNER_HZ: float = 100.0    # coloured noise (--noise_decay_*_db) is flat below this

CLAMP_EPS: float = 1e-7           # outputs clamped to [eps, 1 - eps] for BCE / attention


def mel_high_edge(high_freq: float, low_freq: float = LOW_FREQ,
                  sample_rate: int = SAMPLE_RATE) -> float:
    """Kaldi's ``high_freq`` in Hz (``<= 0``: Nyquist + ``high_freq``); ``ValueError`` unless
    ``0 <= low_freq < edge <= Nyquist``. Here (no NumPy, no TensorFlow) so that the flags
    validate ``--high_freq`` with the features' own rule."""
    nyquist = 0.5 * sample_rate
    edge = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not (0.0 <= low_freq < nyquist and low_freq < edge <= nyquist):
        raise ValueError(f"high_freq must be in ({low_freq:g}, {nyquist:g}] Hz, or <= 0 for "
                         f"Nyquist minus its magnitude (above {low_freq:g} Hz); got "
                         f"high_freq={high_freq:g} with low_freq={low_freq:g}")
    return float(edge)


# deployment (not in the paper): TFLite dynamic-range export keeps kernels with fewer weights
# than this in float32 (the early, small layers; psla_tf.export_tflite, docs/deployment.md)
DYNAMIC_FLOAT_MAX_ELEMENTS: int = 50000

# adapting to a new domain (not in the paper): β of SHOT's pseudo-label term (Liang et al.,
# 2020; their digit value), chosen on FSDD's validation speakers (psla_tf.models.adaptation)
PSEUDO_LABEL_WEIGHT: float = 0.3
# Adam's learning rate of that adaptation (BatchNorm scale and offset)
IM_LEARNING_RATE: float = 1e-3
# self-training on the adapted model's pseudo-labels (--self_train_epochs; not in the paper):
# the constant learning rate of its fine-tuning (psla_tf.training.self_training)
SELF_TRAIN_LR: float = 1e-4
# its pseudo-labels propagated over the evaluated clips' DTW neighbours
# (--self_train_neighbours; psla_tf.label_propagation): Zhou et al.'s alpha, chosen with k = 5
# on FSDD's validation speakers
SELF_TRAIN_ALPHA: float = 0.9
# what it adapts: BatchNorm scale and offset (the default), or every backbone weight (SHOT)
ADAPT_SCOPES: tuple[str, ...] = ("batchnorm", "encoder")
# how SHOT's pseudo-labels are assigned: the nearest class centroid (SHOT), or the same
# similarities spread evenly over the classes (Sinkhorn-Knopp; psla_tf.models.adaptation)
PSEUDO_LABELS: tuple[str, ...] = ("centroid", "balanced")
# the entropic regularisation of that balanced assignment (on cosine similarities; SwAV's)
SINKHORN_EPSILON: float = 0.05
