"""Kaldi-exact log-mel filterbank features (paper Sec. II-C; DESIGN.md "Features").

``kaldi_fbank`` reproduces ``torchaudio.compliance.kaldi.fbank(w, htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128,
dither=0.0, frame_shift=10)`` -- the features PSLA trains on -- with TensorFlow ops only, so
it runs inside ``tf.data``, inside a Keras model, under ``tf.function`` and XLA, on CPU, GPU
and TPU, and converts to TFLite.

Two exact ways to the power spectrum (``dft=``):

* ``"rfft"`` -- the fast path on CPU and GPU: pre-emphasis once over the whole signal, frames
  cut by reshapes and one concatenation (no gather) with DC removal and the window fused into
  one multiply-add, a 512-point real FFT, |X|² as the square of the spectrum's floats, and
  Kaldi's mel matrix (98 % zeros) applied as a few dense blocks. On a CPU a batch is computed
  in cache-sized loop steps of whole clips (``CHUNK_SAMPLES``).
* ``"matmul"`` -- everything between a frame and its complex spectrum is linear (DC removal,
  pre-emphasis, the symmetric Hann window, the zero-padded DFT), folded into one constant
  ``[400, 2 * 257]`` matrix: one matmul, for TPUs and the TFLite export.

``"auto"`` (the default) picks ``"matmul"`` on a TPU and ``"rfft"`` elsewhere
(:func:`resolve_dft`). Both equal the reference within float32 rounding.

Half precision: the power spectrum of a full-scale clip exceeds float16's range, so the
front end always computes in float32 (the layer's dtype policy is pinned to float32) and
``power_scale`` lets the squared magnitudes be scaled down before the mel sum, with the log
shifted back afterwards, for runtimes that force float16 arithmetic.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import numpy as np
import tensorflow as tf
import keras

from psla_tf import compat, params

__all__ = ["kaldi_fbank", "KaldiFbank", "kaldi_mel_banks", "num_frames", "resolve_dft",
           "forced_dft", "cepstral_lifter_matrix", "mel_high_edge", "runtime_constant",
           "hz_to_mel", "mel_to_hz", "mel_bin_edges"]


def num_frames(num_samples: int, frame_length: int = params.FRAME_LENGTH,
               frame_shift: int = params.FRAME_SHIFT) -> int:
    """Kaldi's snip_edges frame count: 1 + (n - 400) // 160, or 0 when n < 400."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def hz_to_mel(f: "np.ndarray | float | tf.Tensor") -> "np.ndarray | tf.Tensor":
    """Kaldi's mel scale, 1127 ln(1 + f / 700), of Hz as NumPy (float64) or a ``tf.Tensor``."""
    if isinstance(f, tf.Tensor):
        return 1127.0 * tf.math.log(1.0 + f / 700.0)
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: "np.ndarray | float | tf.Tensor") -> "np.ndarray | tf.Tensor":
    """Inverse of :func:`hz_to_mel`: 700 (exp(m / 1127) − 1), NumPy or ``tf.Tensor``."""
    if isinstance(m, tf.Tensor):
        return 700.0 * (tf.exp(m / 1127.0) - 1.0)
    return 700.0 * (np.exp(np.asarray(m, dtype=np.float64) / 1127.0) - 1.0)


mel_high_edge = params.mel_high_edge


def mel_bin_edges(num_mel_bins: int, low_freq: float = params.LOW_FREQ, high_freq: float = 0.0,
                  sample_rate: int = params.SAMPLE_RATE) -> np.ndarray:
    """Kaldi's mel-bin edges (mel units, float64) ``[num_mel_bins + 2]``: bin b spans
    edges[b] .. edges[b + 2] and peaks at edges[b + 1], its centre; equal steps in mel from
    ``low_freq`` to ``high_freq`` (Hz; ``<= 0``: Nyquist + high_freq)."""
    high_freq = mel_high_edge(high_freq, low_freq, sample_rate)
    mel_low, mel_high = hz_to_mel(low_freq), hz_to_mel(high_freq)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    return mel_low + np.arange(num_mel_bins + 2, dtype=np.float64) * delta


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
    num_fft_bins = fft_length // 2
    # torchaudio computes the bank in float32 from float64 python scalars; float64 here is
    # at least as exact and identical within rounding.
    edges = mel_bin_edges(num_mel_bins, low_freq, high_freq, sample_rate)[:, None]
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    fft_hz = sample_rate / fft_length * np.arange(num_fft_bins, dtype=np.float64)
    mel = hz_to_mel(fft_hz)[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))            # [bins, fft_bins]
    banks = np.concatenate([banks, np.zeros((num_mel_bins, 1))], axis=1)  # Nyquist column
    return banks.T.astype(np.float32)                         # [fft_bins + 1, bins]


@functools.lru_cache(maxsize=8)
def cepstral_lifter_matrix(num_mel_bins: int, num_ceps: int) -> np.ndarray:
    """``[num_mel_bins, num_mel_bins]`` smoothing of the log-mel axis: keep a frame's first
    ``num_ceps`` cepstral coefficients (orthonormal DCT-II of the log-mel frame, as MFCCs),
    zero the rest, transform back (not in PSLA).

    ``fbank [..., M] @ L`` is each frame's spectral envelope — vocal-tract shape without the
    pitch harmonics that 128 narrow low-frequency bins resolve. ``L = Dᵀ diag(1[k <
    num_ceps]) D`` is a symmetric projection; it keeps c0 (the frame's mean level)."""
    if not 1 <= num_ceps <= num_mel_bins:
        raise ValueError(f"num_ceps must be in 1..{num_mel_bins}, got {num_ceps}")
    m = np.arange(num_mel_bins, dtype=np.float64)
    k = np.arange(num_ceps, dtype=np.float64)[:, None]
    dct = np.sqrt(2.0 / num_mel_bins) * np.cos(np.pi * k * (m + 0.5) / num_mel_bins)
    dct[0] /= np.sqrt(2.0)                                   # orthonormal rows [K, M]
    return (dct.T @ dct).astype(np.float32)


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


def runtime_constant(value: np.ndarray, x: tf.Tensor) -> tf.Tensor:
    """``value`` (float32) stored as its int32 bit pattern and turned back into float32 by a
    bitcast that depends on ``x``: TFLite's weight quantisers (float16, dynamic) only touch
    float constants, so the matrix keeps its exact float32 values."""
    bits = tf.constant(np.ascontiguousarray(value, np.float32).view(np.int32))
    first = tf.reshape(x, [-1])[:1]
    zero = tf.cast(tf.reduce_sum(tf.minimum(tf.abs(first), 0.0)), tf.int32)   # min(|x|, 0) = 0
    return tf.bitcast(bits + zero, tf.float32)


DFTS = ("auto", "rfft", "matmul")
# CPU: the rfft path computes a batch in loop steps of whole clips holding about this many
# samples (two 10-s clips), so a step's intermediates (~4 MB of frames and spectra) stay in the
# shared cache instead of streaming [B, frames, 512] arrays through memory; two clips, not
# one per step: on 2 cores one-clip steps fell to 1.3x the plain fbank in some processes
# (docs/performance.md, "On a 2-core Zen 5 EPYC")
CHUNK_SAMPLES = 320_000
MEL_GROUPS = 6            # banded mel sum: bands in this many groups, each a small matmul
LOOP_PARALLEL = 2         # loop steps in flight (each op uses the intra-op threads as well)


_FORCED_DFT: contextvars.ContextVar[str | None] = contextvars.ContextVar("psla_tf_forced_dft",
                                                                       default=None)


@contextlib.contextmanager
def forced_dft(dft: str):
    """Within the block, every ``kaldi_fbank`` built (traced) computes with ``dft`` whatever it
    was asked for (every choice computes the same function). The exports (SavedModel, TFLite,
    ONNX: ``psla_tf.export.ScoringModel``) trace under ``forced_dft("matmul")``: TFLite and
    ONNX have no complex bitcast / general RFFT, and the exported graphs stay one form."""
    if dft not in DFTS or dft == "auto":
        raise ValueError(f"forced_dft needs 'rfft' or 'matmul', got {dft!r}")
    token = _FORCED_DFT.set(dft)
    try:
        yield
    finally:
        _FORCED_DFT.reset(token)


def resolve_dft(dft: str, device: str = "") -> str:
    """The DFT ``kaldi_fbank`` computes with: inside :func:`forced_dft` the forced one;
    ``"auto"`` is ``"matmul"`` on a TPU (a TPU distribution strategy in scope, or ``device``
    naming a TPU) and ``"rfft"`` elsewhere (the fastest exact path on CPU and GPU); ``"rfft"``
    / ``"matmul"`` are returned as given."""
    if dft not in DFTS:
        raise ValueError(f"dft must be one of {DFTS}, got {dft!r}")
    if _FORCED_DFT.get() is not None:
        return _FORCED_DFT.get()
    if dft != "auto":
        return dft
    if "TPU" in (device or "").upper():
        return "matmul"
    if tf.distribute.has_strategy() and "TPU" in type(tf.distribute.get_strategy()).__name__:
        return "matmul"
    return "rfft"


@tf.autograph.experimental.do_not_convert   # plain Python; keeps AutoGraph out of compat
def _in_xla_context() -> bool:
    """True while tracing for XLA (``jit_compile=True``): XLA has no complex bitcast and
    compiles one fused program, so the rfft path neither loops nor bitcasts there."""
    return compat.in_xla_context()


def _default_chunk_samples(x: tf.Tensor) -> int:
    """``CHUNK_SAMPLES`` where the ops run on a CPU, 0 (one step for the whole batch) on a GPU
    or under XLA."""
    if _in_xla_context():
        return 0
    if not tf.config.list_logical_devices("GPU"):
        return CHUNK_SAMPLES
    return CHUNK_SAMPLES if "CPU" in (getattr(x, "device", "") or "").upper() else 0


@functools.lru_cache(maxsize=16)
def _mel_groups(num_mel_bins: int, sample_rate: int, fft_length: int, low_freq: float,
                high_freq: float, groups: int, interleaved: bool
                ) -> tuple[tuple[int, int, np.ndarray], ...]:
    """Kaldi's mel matrix as ``groups`` dense blocks: consecutive bands whose triangles cover
    the FFT bins ``[lo, hi)``, chosen (dynamic programming over the band boundaries) to make
    the blocks' total size smallest. Returns ``(lo, hi, block)`` per group, the bands in order;
    ``interleaved``: each block row repeated twice, for spectra laid out re, im, re, im, ...
    (the 128 × 257 matrix is 98 % zeros; 6 blocks hold 15 % of it)."""
    banks = kaldi_mel_banks(num_mel_bins, sample_rate, fft_length, low_freq, high_freq)
    used = banks != 0
    bands = banks.shape[1]
    first = [int(np.argmax(used[:, j])) if used[:, j].any() else None for j in range(bands)]
    last = [int(len(used) - np.argmax(used[::-1, j])) if used[:, j].any() else None
            for j in range(bands)]

    def span(a: int, b: int) -> tuple[int, int]:
        lo = [v for v in first[a:b] if v is not None]
        hi = [v for v in last[a:b] if v is not None]
        return (min(lo), max(hi)) if lo else (0, 1)   # all-empty bands: one zero row

    groups = max(1, min(int(groups), bands))
    cost = [[(b - a) * (span(a, b)[1] - span(a, b)[0]) if b > a else 0
             for b in range(bands + 1)] for a in range(bands + 1)]
    best = [[math.inf] * (bands + 1) for _ in range(groups + 1)]
    cut = [[0] * (bands + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for b in range(1, bands + 1):
            for a in range(g - 1, b):
                c = best[g - 1][a] + cost[a][b]
                if c < best[g][b]:
                    best[g][b], cut[g][b] = c, a
    g = min(range(1, groups + 1), key=lambda k: best[k][bands])
    edges, b = [], bands
    while g > 0:
        edges.append((cut[g][b], b))
        b, g = cut[g][b], g - 1
    out = []
    for a, b in reversed(edges):
        lo, hi = span(a, b)
        block = banks[lo:hi, a:b]
        if interleaved:
            block = np.repeat(block, 2, axis=0)
        out.append((lo, hi, np.ascontiguousarray(block, np.float32)))
    return tuple(out)


def _rfft_block(x: tf.Tensor, *, num_mel_bins: int, sample_rate: int, frame_length: int,
                frame_shift: int, fft_length: int, low_freq: float, high_freq: float,
                preemphasis: float, power_scale: float, runtime_matrices: bool) -> tf.Tensor:
    """Floored log-mel ``[c, F, bins]`` of ``c`` clips ``x`` ``[c, n]`` by the FFT.

    Kaldi's frame f (start s = f · shift, N samples, mean m) is, after DC removal and
    pre-emphasis, v_i = w_i (d_{s+i} − (1 − a) m) for i ≥ 1 with d_n = x_n − a x_{n−1} the
    pre-emphasis of the whole signal, and v_0 = 0 because the symmetric Hann window has
    w_0 = 0 (so whatever d holds at a frame's first sample is multiplied by 0). Hence the
    pre-emphasis is done once per clip (x minus a times x rolled by one sample), the frame
    means come from sums over rows of the clip, and the DC removal and the window are one
    subtract-multiply of the cut frames.

    Frames are cut without a gather: the clips' d as one column of rows of ``shift`` samples,
    frame t = rows t, t+1, ... and the head of the next row (400 = 160 + 160 + 80), one
    concatenation of row-aligned slices (views, not copies) and the zero padding to the FFT
    length. The column also yields frames straddling two clips (``q`` per clip); they are
    dropped at the end. |X|² is the square of the spectrum seen as interleaved floats (no
    complex abs), summed into the bands by the banded mel blocks (:func:`_mel_groups`).
    """
    if fft_length < frame_length:
        raise ValueError(f"fft_length {fft_length} < frame_length {frame_length}")
    window = np.zeros(fft_length)
    window[:frame_length] = 0.5 - 0.5 * np.cos(
        2.0 * np.pi * np.arange(frame_length) / (frame_length - 1))
    window[0] = 0.0                                  # exactly (cos 0 = 1)
    window /= power_scale
    q, r = divmod(frame_length, frame_shift)
    single = x.shape[0] == 1
    c, n = tf.shape(x)[0], tf.shape(x)[1]
    frames = tf.maximum(0, 1 + (n - frame_length) // frame_shift)
    # rows of `shift` samples per clip: a clip's last frame reaches into row F - 1 + q
    rows = tf.maximum(frames + q - (0 if r else 1), 1)
    starts = tf.maximum(c * rows - q + (0 if r else 1), 0)    # frame starts in the column
    with tf.name_scope("signal"):   # cut/pad to whole rows, pre-emphasis, frame means
        length = rows * frame_shift                  # n itself for 10-s clips: no copy
        x = tf.pad(x, [[0, 0], [0, tf.maximum(length - n, 0)]])[:, :length]
        d = x - preemphasis * tf.roll(x, 1, axis=1)  # d_0 wraps: always under w_0 = 0
        d = tf.reshape(d, [c * rows, frame_shift])
        x_rows = tf.reshape(x, [c * rows, frame_shift])
        row_sum = tf.reduce_sum(x_rows, axis=-1)
        total = tf.add_n([row_sum[j:j + starts] for j in range(q)]) if q else 0.0
        if r:
            total = total + tf.reduce_sum(x_rows[q:q + starts, :r], axis=-1)
        dc = total * ((1.0 - preemphasis) / frame_length)                 # (1 − a) m
    with tf.name_scope("frames"):   # cut + zero-pad (one concat), DC removal and window
        pieces = [d[j:j + starts] for j in range(q)]
        if r:
            pieces.append(d[q:q + starts, :r])
        if fft_length > frame_length:
            pieces.append(tf.zeros([starts, fft_length - frame_length]))
        framed = tf.concat(pieces, axis=-1) if len(pieces) > 1 else pieces[0]  # [T, fft]
        u = (framed - dc[:, tf.newaxis]) * tf.constant(window.astype(np.float32))
    with tf.name_scope("fft"):
        spectrum = tf.signal.rfft(u, fft_length=[fft_length])               # [T, K]
    interleaved = not _in_xla_context()
    with tf.name_scope("power"):
        if interleaved:   # complex64 → float32 pairs (free), squared: re², im², re², ...
            power = tf.square(tf.reshape(tf.bitcast(spectrum, tf.float32), [starts, -1]))
        else:
            power = tf.square(tf.math.real(spectrum)) + tf.square(tf.math.imag(spectrum))
    width = 2 if interleaved else 1
    with tf.name_scope("mel"):
        parts = []
        for lo, hi, block in _mel_groups(num_mel_bins, sample_rate, fft_length, low_freq,
                                         high_freq, MEL_GROUPS, interleaved):
            block = runtime_constant(block, x) if runtime_matrices else tf.constant(block)
            parts.append(tf.linalg.matmul(power[:, width * lo:width * hi], block))
        mel = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]    # [T, bins]
    with tf.name_scope("log"):
        out = _floored_log(mel, power_scale, runtime_matrices, x)
        if single:      # one clip: its frames are the first F rows (a view)
            return out[tf.newaxis, :frames]
        # back to [c, rows, bins]; drop each clip's frames that straddle two clips
        out = tf.pad(out, [[0, c * rows - starts], [0, 0]])
        return tf.reshape(out, [c, rows, num_mel_bins])[:, :frames]


@functools.lru_cache(maxsize=16)
def _eager_rfft_fbank(settings: tuple) -> "tf.types.experimental.PolymorphicFunction":
    """``_rfft_fbank`` with these ``settings`` as a tf.function (any batch and length: traced
    for a new rank of shapes only), for eager callers."""
    return tf.function(lambda x: _rfft_fbank(x, **dict(settings)), reduce_retracing=True,
                       autograph=False)


def _rfft_fbank(x: tf.Tensor, chunk_samples: int, **block_args) -> tf.Tensor:
    """Floored log of ``_rfft_block`` over ``x`` ``[B, n]``: at once (``chunk_samples`` 0), or
    in a loop over groups of whole clips of about ``chunk_samples`` samples."""
    def block(clips):
        return _rfft_block(clips, **block_args)
    if chunk_samples <= 0 or x.shape[0] == 1:   # one step: no loop (tf.data, clip by clip)
        return block(x)
    b, n = tf.shape(x)[0], tf.shape(x)[1]
    per = tf.maximum(1, chunk_samples // tf.maximum(n, 1))                # clips per step
    # clip length known and one clip per step: slices of a static single clip
    one = x.shape[-1] is not None and chunk_samples // max(x.shape[-1], 1) <= 1
    steps = tf.maximum((b + per - 1) // per, 1)       # >= 1: an empty batch concatenates
    out = tf.TensorArray(tf.float32, size=steps, infer_shape=False,
                         element_shape=tf.TensorShape([None, None, block_args["num_mel_bins"]]))

    def step(i, out):
        lo = i * per
        clips = x[lo:lo + 1] if one else x[lo:tf.minimum(lo + per, b)]
        return i + 1, out.write(i, block(clips))
    _, out = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), out),
                           parallel_iterations=LOOP_PARALLEL)
    return out.concat()


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
                dft: str = "auto",
                power_scale: float = 1.0,
                runtime_matrices: bool = False,
                chunk_samples: int | None = None) -> tf.Tensor:
    """Log-mel fbank of ``waveform`` ``[..., samples]`` → ``[..., frames, num_mel_bins]``.

    Frames follow Kaldi's snip_edges rule (1 + (n - 400) // 160; none when n < 400); each
    frame is DC-removed, pre-emphasised (0.97, the first sample uses itself), windowed by a
    symmetric Hann window, zero-padded to 512 and turned into a power spectrum; Kaldi's mel
    banks (20 Hz..Nyquist) sum it and the log is floored at float32 eps. ``sample_rate``,
    frame and FFT sizes default to PSLA's 16 kHz / 25 ms / 10 ms / 512.

    ``dft``: ``"rfft"`` (real FFT, banded mel sum; on a CPU in cache-sized steps of
    ``chunk_samples`` samples of whole clips, default ``CHUNK_SAMPLES``; 0 = the whole batch at
    once, the GPU / XLA default), ``"matmul"`` (DFT and the linear steps folded into one
    ``[400, 514]`` matrix: TPU and TFLite) or ``"auto"`` (:func:`resolve_dft`). All equal the
    reference within float32 rounding.

    ``power_scale`` (s) divides the spectrum's magnitude by s before squaring and adds
    2 ln s back after the log (the floor is applied in the log domain, at ln eps − 2 ln s), so
    intermediate values and constants stay inside float16's range; the result is the same
    function (within float32 rounding).

    ``runtime_matrices`` stores the DFT and mel matrices as int32 bit patterns bitcast to
    float32 at run time, so TFLite weight quantisation (float16, dynamic) cannot round them:
    the front end keeps float32 precision (same values).
    """
    x = tf.convert_to_tensor(waveform)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    if x.shape.rank is not None and x.shape.rank < 1:
        raise ValueError("waveform must have at least one (samples) dimension")
    dft = resolve_dft(dft, getattr(x, "device", "") or "")
    if dft == "matmul":
        frames = tf.signal.frame(x, frame_length, frame_shift, pad_end=False)  # [..., F, N]
        matrix = _folded_dft_matrix(frame_length, fft_length, preemphasis)
        if power_scale != 1.0:
            matrix = (matrix / np.float32(power_scale)).astype(np.float32)
        matrix = runtime_constant(matrix, x) if runtime_matrices else tf.constant(matrix)
        spec = tf.linalg.matmul(frames, matrix)  # rank-agnostic: [..., F, 2K]
        re, im = tf.split(spec, 2, axis=-1)
        power = re * re + im * im
        banks = kaldi_mel_banks(num_mel_bins, sample_rate, fft_length, low_freq, high_freq)
        banks = runtime_constant(banks, x) if runtime_matrices else tf.constant(banks)
        mel = tf.linalg.matmul(power, banks)  # [..., F, bins]
    else:
        lead = tf.shape(x)[:-1]
        # a static clip count keeps one clip (tf.data, clip by clip) out of the loop
        known = x.shape[:-1].is_fully_defined() if x.shape.rank is not None else False
        clips = int(np.prod(x.shape[:-1], dtype=np.int64)) if known else -1
        flat = tf.reshape(x, [clips, tf.shape(x)[-1]])                        # [B, n]
        chunk = _default_chunk_samples(x) if chunk_samples is None else int(chunk_samples)
        settings = (("chunk_samples", chunk), ("num_mel_bins", num_mel_bins),
                    ("sample_rate", sample_rate), ("frame_length", frame_length),
                    ("frame_shift", frame_shift), ("fft_length", fft_length),
                    ("low_freq", low_freq), ("high_freq", high_freq),
                    ("preemphasis", preemphasis), ("power_scale", power_scale),
                    ("runtime_matrices", runtime_matrices))
        if tf.executing_eagerly():   # the loop op by op from Python would be ~20x slower
            out = _eager_rfft_fbank(settings)(flat)
        else:
            out = _rfft_fbank(flat, **dict(settings))
        out = tf.reshape(out, tf.concat([lead, tf.shape(out)[1:]], axis=0))
        if x.shape.rank is not None:
            n = x.shape[-1]
            out.set_shape(x.shape[:-1].concatenate(
                [None if n is None else num_frames(n, frame_length, frame_shift),
                 num_mel_bins]))
        return out
    return _floored_log(mel, power_scale, runtime_matrices, x)


def _floored_log(mel: tf.Tensor, power_scale: float, runtime_matrices: bool,
                 x: tf.Tensor) -> tf.Tensor:
    """log(max(mel, eps)), or with ``power_scale`` s the float16-safe form below."""
    if power_scale == 1.0:
        return tf.math.log(tf.maximum(mel, params.LOG_FLOOR))
    # log(max(m, eps / s²)) = max(log m, log eps − 2 ln s): the floor is applied in the log
    # domain, where it is an ordinary number (eps / s² itself underflows float16; log 0 = −inf
    # is lifted to the floor), then the scaling is undone
    log_floor = np.float32(math.log(params.LOG_FLOOR) - 2.0 * math.log(power_scale))
    shift = np.float32(2.0 * math.log(power_scale))
    if runtime_matrices:   # float16 would round 2 ln s by ~2e-3
        log_floor, shift = runtime_constant(log_floor, x), runtime_constant(shift, x)
    out = tf.maximum(tf.math.log(mel), log_floor)
    return out + shift


@keras.saving.register_keras_serializable(package="psla_tf")
class KaldiFbank(keras.layers.Layer):
    """Keras layer: waveform ``[batch, samples]`` → Kaldi log-mel ``[batch, frames, bins]``.

    Always computes in float32 (even under a mixed-precision policy), see module docstring.
    """

    def __init__(self, sample_rate: int = params.SAMPLE_RATE,
                 num_mel_bins: int = params.NUM_MEL_BINS, dft: str = "auto",
                 power_scale: float = 1.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.num_mel_bins = int(num_mel_bins)
        if dft not in DFTS:
            raise ValueError(f"dft must be one of {DFTS}, got {dft!r}")
        self.dft = dft          # "auto" is resolved where the layer is traced
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
