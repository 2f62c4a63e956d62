"""Label propagation over a set's own acoustic neighbours (``--self_train_neighbours``).

Not in PSLA.

A new speaker (device, session) says each word many times; within one speaker the clips of a
word are each other's nearest neighbours by dynamic time warping (DTW) of their cepstra
(FSDD: 96-100 % of a clip's 5 nearest clips of the same speaker say the same digit), a view of
the clips the model does not share. Self-training's pseudo-labels are the adapted model's
scores ``Y`` ``[N, C]`` propagated over that graph (Zhou et al., 2004, "Learning with local and
global consistency"):

    F = (I - alpha S)^-1 Y,   S = D^-1/2 W D^-1/2,

``W`` the symmetrised k-nearest-neighbour graph with Gaussian weights, ``D`` its degrees. A
clip the model gets wrong among neighbours it gets right takes their label; the model's scores
stay the source (``alpha`` < 1). DTW costs O(N^2 T^2) for N clips of T frames: sized for sets of
up to a few thousand short clips (words, calls, events).
"""
from __future__ import annotations

import numpy as np
import scipy.fft

__all__ = ["MAX_CLIPS", "TRIM", "NUM_CEPS", "utterance_cepstra", "dtw_distances", "knn_graph",
           "propagate", "propagate_scores"]

MAX_CLIPS = 10000   # the dense [N, N] graph: 0.8 GB at this size
TRIM = 6.0          # frames kept: mean log-mel within this (natural log, ~26 dB) of the loudest
NUM_CEPS = 13       # cepstral coefficients c1..c13 per frame


def utterance_cepstra(log_mel: np.ndarray, num_ceps: int = NUM_CEPS,
                      trim: float = TRIM) -> np.ndarray:
    """``[T, bins]`` log-mel → ``[t, num_ceps]``: the span from the first to the last frame
    whose mean log-mel is within ``trim`` of the loudest (energy trim), its cepstra c1..cN
    (orthonormal DCT-II), each coefficient's mean over the span removed (CMN)."""
    log_mel = np.asarray(log_mel, np.float64)
    if log_mel.ndim != 2 or not len(log_mel):
        raise ValueError(f"log_mel must be [frames > 0, bins], got {log_mel.shape}")
    level = log_mel.mean(axis=1)
    kept = np.flatnonzero(level > level.max() - trim)
    if not len(kept):                       # every frame equal (silence)
        kept = np.arange(len(level))
    span = log_mel[kept[0]:kept[-1] + 1]
    c = scipy.fft.dct(span, type=2, axis=1, norm="ortho")[:, 1:num_ceps + 1]
    return c - c.mean(axis=0)


def dtw_distances(sequences: list[np.ndarray]) -> np.ndarray:
    """DTW distance of every pair of ``[t_i, d]`` sequences → ``[N, N]``, symmetric, zero
    diagonal: sqrt of the warping path's summed squared frame distances (dtaidistance's DTW, no
    window), divided by sqrt(t_i + t_j) so that long and short clips compare."""
    from dtaidistance import dtw_ndim
    if len(sequences) < 2:
        return np.zeros((len(sequences),) * 2)
    seqs = [np.ascontiguousarray(s, dtype=np.double) for s in sequences]
    dims = {s.shape[1] for s in seqs}
    if len(dims) != 1:
        raise ValueError(f"sequences differ in width: {sorted(dims)}")
    d = np.asarray(dtw_ndim.distance_matrix_fast(seqs, ndim=dims.pop()), np.float64)
    d = np.minimum(d, d.T)                  # the library fills the upper triangle
    lengths = np.array([len(s) for s in seqs], np.float64)
    d = d / np.sqrt(lengths[:, None] + lengths[None, :])
    np.fill_diagonal(d, 0.0)
    return d


def knn_graph(distances: np.ndarray, k: int) -> np.ndarray:
    """``[N, N]`` distances → ``S`` ``[N, N]``: each node's ``k`` nearest other nodes joined with
    weight exp(-(d / sigma)^2) (sigma: the median of those k distances), made symmetric by the
    larger weight, normalised as D^-1/2 W D^-1/2."""
    d = np.array(distances, np.float64)
    n = len(d)
    if d.shape != (n, n):
        raise ValueError(f"distances must be square, got {d.shape}")
    k = min(int(k), n - 1)
    if k < 1:
        raise ValueError(f"a graph needs k >= 1 and 2 or more nodes (k={k}, nodes={n})")
    np.fill_diagonal(d, np.inf)
    rows = np.arange(n)[:, None]
    nn = np.argpartition(d, k - 1, axis=1)[:, :k]
    near = d[rows, nn]
    sigma = float(np.median(near)) or 1.0
    w = np.zeros((n, n))
    w[rows, nn] = np.exp(-(near / sigma) ** 2)
    w = np.maximum(w, w.T)
    degree = np.sqrt(w.sum(axis=1))
    return w / (degree[:, None] * degree[None, :])


def propagate(graph: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """``F = (I - alpha S)^-1 Y`` for ``graph`` ``S`` ``[N, N]`` and ``scores`` ``Y`` ``[N, C]``
    (``0 <= alpha < 1``; ``alpha = 0`` returns ``Y``). Rows keep their scale, not a sum of 1:
    take the top class."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    y = np.asarray(scores, np.float64)
    return np.linalg.solve(np.eye(len(graph)) - alpha * np.asarray(graph), y)


def propagate_scores(waveforms: np.ndarray, scores: np.ndarray, *, k: int, alpha: float,
                     sample_rate: int, num_mel_bins: int, high_freq: float = 0.0) -> np.ndarray:
    """The model's ``scores`` ``[N, C]`` of ``waveforms`` ``[N, samples]`` propagated over the
    clips' DTW neighbours (module doc): Kaldi log-mel (``num_mel_bins``, 20 Hz to ``high_freq``)
    → :func:`utterance_cepstra` → :func:`dtw_distances` → :func:`knn_graph` →
    :func:`propagate`. Returns ``[N, C]``."""
    from psla_tf.features import kaldi_fbank
    waveforms, scores = np.asarray(waveforms, np.float32), np.asarray(scores)
    if waveforms.ndim != 2 or len(waveforms) != len(scores):
        raise ValueError(f"waveforms {waveforms.shape} for scores {scores.shape}")
    if len(scores) < 2:
        return scores.astype(np.float64)
    log_mel = kaldi_fbank(waveforms, sample_rate, num_mel_bins, high_freq=high_freq).numpy()
    distances = dtw_distances([utterance_cepstra(m) for m in log_mel])
    return propagate(knn_graph(distances, k), scores, alpha)
