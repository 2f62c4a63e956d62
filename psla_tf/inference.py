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
from typing import Callable, Iterable, Iterator

import numpy as np

from psla_tf import params
from psla_tf.errors import AudioError, VocabularyMismatch

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(waveforms [B, S] float32, num_samples [B] int32) -> scores [B, C]``."""


def _open(path: str):
    import os

    import soundfile as sf
    if not os.path.exists(path):
        raise AudioError(f"{path}: file not found")
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
    frames: dict[str, np.ndarray] | None = None   # frame-level arrays [H, T', C], if asked


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
             sample_rate: int = params.SAMPLE_RATE,
             frame_fn: Callable[[np.ndarray, np.ndarray], dict] | None = None) -> FileResult:
    """Score every window of ``path`` in batches; pool to clip level (max or mean).

    ``frame_fn`` (e.g. :meth:`KerasScorer.frame_level`) adds each window's frame-level
    arrays to ``Window.frames``.
    """
    return _tag_windows(score_fn, iter_windows(path, window_seconds, hop_seconds, sample_rate),
                        path, window_seconds=window_seconds, batch_size=batch_size,
                        pooling=pooling, sample_rate=sample_rate, frame_fn=frame_fn)


def tag_waveform(score_fn: ScoreFn, waveform: np.ndarray, *, window_seconds: float = 10.0,
                 hop_seconds: float = 5.0, batch_size: int = 8, pooling: str = "max",
                 sample_rate: int = params.SAMPLE_RATE, name: str = "waveform") -> FileResult:
    """:func:`tag_file` for a float32 mono waveform ``[samples]`` already at ``sample_rate``:
    the same windows (``window_starts``), batches and pooling."""
    x = np.asarray(waveform, np.float32)
    if x.ndim != 1:
        raise AudioError(f"{name}: expected a mono waveform [samples], got shape {x.shape}")
    if x.size == 0:
        raise AudioError(f"{name}: no audio samples")
    if x.size < params.FRAME_LENGTH:
        raise AudioError(f"{name}: {x.size} samples at {sample_rate} Hz is shorter than one "
                         f"{params.FRAME_LENGTH}-sample frame (25 ms)")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{name}: contains NaN or Inf samples")
    window = int(round(window_seconds * sample_rate))
    hop = int(round(hop_seconds * sample_rate))
    if window <= 0 or hop <= 0:
        raise ValueError("window_seconds and hop_seconds must be positive")
    windows = ((s, x[s: s + window]) for s in window_starts(x.size, window, hop))
    return _tag_windows(score_fn, windows, name, window_seconds=window_seconds,
                        batch_size=batch_size, pooling=pooling, sample_rate=sample_rate)


def _tag_windows(score_fn: ScoreFn, source: Iterable[tuple[int, np.ndarray]], path: str, *,
                 window_seconds: float, batch_size: int, pooling: str, sample_rate: int,
                 frame_fn: Callable[[np.ndarray, np.ndarray], dict] | None = None
                 ) -> FileResult:
    """Score ``(start_sample, samples)`` windows in zero-padded batches; pool to clip level."""
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
        frames = frame_fn(batch, lengths) if frame_fn is not None else None
        for i, ((start, w), s) in enumerate(zip(pending, scores)):
            fr = None if frames is None else {k: v[i] for k, v in frames.items()}
            windows.append(Window(start / sample_rate, (start + w.size) / sample_rate, s, fr))
        if pooling == "max":
            m = scores.max(axis=0)
            pooled = m if pooled is None else np.maximum(pooled, m)
        else:
            s = scores.sum(axis=0, dtype=np.float64)
            pooled = s if pooled is None else pooled + s
        count += len(pending)
        pending.clear()

    for start, w in source:
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


# ----------------------------------------------------------------------------- scorers


class Scorer:
    """A trained tagger behind one call, with its vocabulary and input length.

    ``scorer(waveform [B, S] float32, num_samples [B] int32) -> scores [B, C] float32``;
    attributes ``mids``, ``names`` (the class map), ``sample_rate`` (16 kHz),
    ``clip_samples`` (the training input length in samples: longer inputs are cut by the
    front end, so windows must not exceed it) and ``kind`` (``keras`` / ``saved_model``).
    """

    kind = "abstract"
    mids: list[str]
    names: list[str]
    sample_rate: int = params.SAMPLE_RATE
    clip_samples: int

    def __call__(self, waveform: np.ndarray, num_samples: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def frame_level(self, waveform: np.ndarray, num_samples: np.ndarray
                    ) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"frame-level output needs a Keras tagger, not a {self.kind}")

    @property
    def num_classes(self) -> int:
        return len(self.mids)

    def _check_vocabulary(self, num_outputs: int, source: str) -> None:
        if num_outputs != len(self.mids):
            raise VocabularyMismatch(
                f"{source} has {num_outputs} outputs but its vocabulary lists {len(self.mids)} "
                "classes (wrong labels.csv / --label_csv?)")


def _frontend_of(model) -> "object | None":
    """The AudioFrontend of a tagger, or of the first member of an ensemble."""
    for layer in model.layers:
        if layer.name == "frontend":
            return layer
    for layer in model.layers:
        if layer.name.startswith("member_") and hasattr(layer, "layers"):
            return _frontend_of(layer)
    return None


class KerasScorer(Scorer):
    """A Keras tagger (``build_tagger``) or ensemble (``psla_tf.ensemble``) in inference mode."""

    kind = "keras"

    def __init__(self, model, mids: list[str], names: list[str], source: str = "model"):
        import tensorflow as tf
        self.model = model
        self.mids, self.names = list(mids), list(names)
        frontend = _frontend_of(model)
        if frontend is None:
            raise ValueError(f"{source}: not a psla_tf tagger (no 'frontend' layer)")
        self.target_length = int(frontend.target_length)
        self.clip_samples = (self.target_length - 1) * params.FRAME_SHIFT + params.FRAME_LENGTH
        self._check_vocabulary(int(model.outputs[0].shape[-1]), source)
        spec = (tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32))
        self._fn = tf.function(
            lambda w, n: model({"waveform": w, "num_samples": n}, training=False),
            input_signature=spec, reduce_retracing=True)
        self._frame_fn = None
        self._spec = spec

    def __call__(self, waveform, num_samples):
        out = self._fn(np.asarray(waveform, np.float32), np.asarray(num_samples, np.int32))
        return np.asarray(out, np.float32)

    def frame_level(self, waveform, num_samples):
        """The attention-pooling time series of a tagger: ``attention`` (normalised attention,
        sums to 1 over time) and ``frame_scores`` (per-frame class scores), both
        ``[B, H, T', C]`` (paper Fig. 2; H heads, T' backbone frames)."""
        import tensorflow as tf
        if self._frame_fn is None:
            names = {layer.name for layer in self.model.layers}
            if not {"frontend", "classifier"} <= names:
                raise NotImplementedError("frame-level output needs a single tagger "
                                          "(an ensemble has one time series per member)")
            frontend = self.model.get_layer("frontend")
            clf = self.model.get_layer("classifier")
            if "frequency_mean" not in {layer.name for layer in clf.layers}:
                raise NotImplementedError("frame-level output needs an attention or mean "
                                          "pooling head (mobilenet_v2 pools globally)")
            pooling = clf.get_layer("pooling")

            def fn(w, n):
                x = frontend(w, n, training=False)
                x = clf.get_layer("mel_time")(x)
                x = clf.get_layer("add_channel")(x)
                x = clf.get_layer("backbone")(x, training=False)
                x = clf.get_layer("frequency_mean")(x)
                return pooling.attention_maps(x), pooling.frame_scores(x)

            self._frame_fn = tf.function(fn, input_signature=self._spec)
        att, cla = self._frame_fn(np.asarray(waveform, np.float32),
                                  np.asarray(num_samples, np.int32))
        return {"attention": np.asarray(att, np.float32),
                "frame_scores": np.asarray(cla, np.float32)}


class ServingScorer(Scorer):
    """An exported SavedModel (``psla_tf.export.load_saved_model``)."""

    kind = "saved_model"

    def __init__(self, serving, source: str = "SavedModel"):
        self.serving = serving
        self.mids, self.names = list(serving.mids), list(serving.names)
        self.sample_rate = int(serving.sample_rate)
        self.clip_samples = int(serving.clip_samples)
        probe = serving(np.zeros((1, params.FRAME_LENGTH), np.float32),
                        np.full((1,), params.FRAME_LENGTH, np.int32))
        self._check_vocabulary(int(np.asarray(probe["scores"]).shape[-1]), source)

    def __call__(self, waveform, num_samples):
        out = self.serving(np.asarray(waveform, np.float32), np.asarray(num_samples, np.int32))
        return np.asarray(out["scores"], np.float32)


def window_samples(scorer: Scorer, window_seconds: float) -> int:
    """``window_seconds`` in samples, checked against the model's input length (a longer
    window would be cut by the front end, silently ignoring its end)."""
    window = int(round(window_seconds * scorer.sample_rate))
    if window <= 0:
        raise ValueError("window_seconds must be positive")
    if window > scorer.clip_samples:
        raise ValueError(
            f"window of {window_seconds:g} s ({window} samples) is longer than the model's "
            f"input of {scorer.clip_samples / scorer.sample_rate:.3f} s ({scorer.clip_samples} "
            "samples): the front end would cut it. Use a window ≤ the model's input length.")
    return window


class FrameLevelWriter:
    """Frame-level output of one file, streamed to disk so memory stays bounded.

    Use an instance as ``tag_file(..., frame_fn=writer)``: each batch's arrays from
    ``frame_fn`` (``attention`` / ``frame_scores`` ``[B, H, T', C]``) are appended to raw
    files beside ``path``; :meth:`finish` packs them (read back in chunks through a memmap)
    with the window and frame times into the ``.npz`` ``path`` (written atomically).
    """

    def __init__(self, frame_fn: Callable[[np.ndarray, np.ndarray], dict], path: str,
                 clip_seconds: float, mids: list[str], names: list[str]):
        import os
        import tempfile
        self.frame_fn, self.path = frame_fn, path
        self.clip_seconds = float(clip_seconds)
        self.mids, self.names = list(mids), list(names)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".frames-", dir=folder)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.count = 0

    def __call__(self, waveform: np.ndarray, num_samples: np.ndarray) -> dict:
        import os
        out = self.frame_fn(waveform, num_samples)
        for key, value in out.items():
            value = np.ascontiguousarray(value, np.float32)
            self.shapes.setdefault(key, value.shape[1:])
            with open(os.path.join(self.tmp, key + ".bin"), "ab") as f:
                f.write(value.tobytes())
        self.count += len(waveform)
        return {}          # nothing kept in memory

    def finish(self, windows: list[Window]) -> str:
        import os
        import shutil
        try:
            if len(windows) != self.count:
                raise ValueError(f"{len(windows)} windows but {self.count} frame-level rows")
            arrays = {key: np.memmap(os.path.join(self.tmp, key + ".bin"), np.float32, "r",
                                     shape=(self.count,) + shape)
                      for key, shape in self.shapes.items()}
            frames = next(iter(self.shapes.values()))[1] if self.shapes else 0
            begin = np.array([w.start for w in windows])[:, None] + (
                np.arange(frames) * self.clip_seconds / max(frames, 1))[None]
            tmp = self.path + ".tmp.npz"
            np.savez(tmp, **arrays, window_start=np.array([w.start for w in windows]),
                     window_end=np.array([w.end for w in windows]), frame_start=begin,
                     frame_end=begin + self.clip_seconds / max(frames, 1),
                     mids=np.asarray(self.mids), names=np.asarray(self.names))
            del arrays
            os.replace(tmp, self.path)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
