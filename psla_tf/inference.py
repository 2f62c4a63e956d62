"""Tagging audio of any length: streaming decode, 10-s windows with hop, pooled clip scores.

A file is read block by block (soundfile), mixed to mono and resampled to 16 kHz with a
streaming soxr resampler, so memory does not grow with the file's length; windows of
``window_seconds`` start every ``hop_seconds``, the last one may be shorter (it is padded the
way training pads, through ``num_samples``). Clip-level scores pool window scores by max
(default) or mean.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from psla_tf import params

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(waveforms [B, S] float32, num_samples [B] int32) -> scores [B, C]``."""


class AudioError(ValueError):
    """An audio file that cannot be used (unreadable, empty, too short, non-finite)."""


def _open(path: str):
    import soundfile as sf
    try:
        return sf.SoundFile(path)
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError/OSError
        raise AudioError(f"{path}: cannot read audio ({e})") from None


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start samples of the windows covering ``num_samples``: 0, hop, 2·hop, … until a window
    reaches the end (the last may be shorter than ``window``)."""
    if num_samples <= 0:
        return []
    if num_samples <= window:
        return [0]
    count = math.ceil((num_samples - window) / hop) + 1
    return [i * hop for i in range(count)]


def stream_audio(path: str, sample_rate: int = params.SAMPLE_RATE,
                 block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Yield consecutive float32 mono blocks of ``path`` resampled to ``sample_rate``."""
    import soxr
    f = _open(path)
    with f:
        sr = f.samplerate
        resampler = None if sr == sample_rate else soxr.ResampleStream(
            sr, sample_rate, 1, dtype="float32", quality="HQ")
        block = max(1, int(block_seconds * sr))
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioError(f"{path}: decoding failed ({e})") from None
            last = data.shape[0] < block
            mono = data.mean(axis=1).astype(np.float32) if data.size else np.zeros(0, np.float32)
            if not np.all(np.isfinite(mono)):
                raise AudioError(f"{path}: contains NaN or Inf samples")
            out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
            if out.size:
                yield out
            if last:
                return


@dataclasses.dataclass
class Window:
    start: float      # seconds
    end: float        # seconds
    scores: np.ndarray


@dataclasses.dataclass
class FileResult:
    path: str
    duration: float   # seconds at 16 kHz
    windows: list[Window]
    clip_scores: np.ndarray


def iter_windows(path: str, window_seconds: float = 10.0, hop_seconds: float = 5.0,
                 sample_rate: int = params.SAMPLE_RATE) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start_sample, samples)`` windows of a file, streaming (bounded memory)."""
    window = int(round(window_seconds * sample_rate))
    hop = int(round(hop_seconds * sample_rate))
    if window <= 0 or hop <= 0:
        raise ValueError("window_seconds and hop_seconds must be positive")
    buf = np.zeros(0, np.float32)
    buf_start = 0          # absolute sample index of buf[0]
    next_start = 0
    total = 0
    for block in stream_audio(path, sample_rate):
        total += block.size
        buf = np.concatenate([buf, block])
        while next_start + window <= total:
            off = next_start - buf_start
            yield next_start, buf[off: off + window].copy()
            next_start += hop
            drop = next_start - buf_start
            if drop > 0:
                buf = buf[drop:]
                buf_start = next_start
    if total == 0:
        raise AudioError(f"{path}: no audio samples")
    if total < params.FRAME_LENGTH:
        raise AudioError(f"{path}: {total} samples at {sample_rate} Hz is shorter than one "
                         f"{params.FRAME_LENGTH}-sample frame (25 ms)")
    # the tail: a last (shorter) window when the file is shorter than a window, or when the
    # previous full window did not reach the end
    starts = window_starts(total, window, hop)
    while next_start <= starts[-1]:
        off = next_start - buf_start
        yield next_start, buf[off: off + window].copy()
        next_start += hop


def tag_file(score_fn: ScoreFn, path: str, *, window_seconds: float = 10.0,
             hop_seconds: float = 5.0, batch_size: int = 8, pooling: str = "max",
             sample_rate: int = params.SAMPLE_RATE) -> FileResult:
    """Score every window of ``path`` in batches; pool to clip level (max or mean)."""
    if pooling not in ("max", "mean"):
        raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
    window = int(round(window_seconds * sample_rate))
    windows: list[Window] = []
    pending: list[tuple[int, np.ndarray]] = []
    pooled = None
    count = 0
    last_end = 0

    def flush():
        nonlocal pooled, count
        if not pending:
            return
        batch = np.zeros((len(pending), window), np.float32)
        lengths = np.zeros(len(pending), np.int32)
        for i, (_, w) in enumerate(pending):
            batch[i, : w.size] = w
            lengths[i] = w.size
        scores = np.asarray(score_fn(batch, lengths), np.float32)
        for (start, w), s in zip(pending, scores):
            windows.append(Window(start / sample_rate, (start + w.size) / sample_rate, s))
        if pooling == "max":
            m = scores.max(axis=0)
            pooled = m if pooled is None else np.maximum(pooled, m)
        else:
            s = scores.sum(axis=0, dtype=np.float64)
            pooled = s if pooled is None else pooled + s
        count += len(pending)
        pending.clear()

    for start, w in iter_windows(path, window_seconds, hop_seconds, sample_rate):
        if w.size < params.FRAME_LENGTH and windows + pending:
            continue  # a sub-frame tail adds nothing the previous window did not see
        pending.append((start, w))
        last_end = max(last_end, start + w.size)
        if len(pending) >= batch_size:
            flush()
    flush()
    clip = pooled if pooling == "max" else (pooled / count).astype(np.float32)
    return FileResult(path=path, duration=last_end / sample_rate, windows=windows,
                      clip_scores=np.asarray(clip, np.float32))


def top_k(scores: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(names[i], float(scores[i])) for i in order]
