"""Audio → TFRecord shards: decode, mono, soxr 16 kHz, cut, int16; manifest and statistics.

The back end of ``tools/make_tfrecords.py`` (paper Sec. II-C: every clip is 16 kHz mono, at
most 10 s for AudioSet). Rows are assigned to shards deterministically (row i → shard
i % num_shards, input order kept inside a shard); each shard is written by one worker process
to a temporary name and renamed, then a sidecar ``{shard}.done.json`` with that shard's counts,
failures and fbank statistics is written atomically. A re-run with the same arguments skips
every shard that has its sidecar (with a matching fingerprint), so a killed run completes, and
the manifest is assembled from the sidecars.

Normalisation statistics: mean and std of every fbank value of every frame training sees —
``kaldi_fbank`` of the stored clip (int16 / 32768) minus its mean, frames cut to
``target_length``, padding excluded — accumulated as float64 sums per shard and combined
exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queuelib
import sys
import time
from typing import Any, Sequence

import numpy as np

from psla_tf import atomic
from psla_tf import params
from psla_tf.data import records
from psla_tf.data.records import DataError, Manifest
from psla_tf.data.sources import Row
from psla_tf.errors import AudioError

SIDECAR_VERSION = 1


class PreparationFailed(DataError):
    """Raised by ``prepare(strict=True)`` after writing when some clips failed."""

    def __init__(self, message: str, manifest: Manifest):
        super().__init__(message)
        self.manifest = manifest


# ----------------------------------------------------------------------------- decoding
def _wav_truncated(info_text: str) -> bool:
    """libsndfile reports a WAV whose data chunk is shorter than its header says as
    ``data : N (should be M)`` in its extra info."""
    return any(line.strip().startswith("data") and "should be" in line
               for line in info_text.splitlines())


def decode_audio(path: str, target_sr: int = params.SAMPLE_RATE,
                 max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` (wav/flac/ogg/mp3) → float32 mono at ``target_sr`` (soxr HQ).

    Channels are averaged. With ``max_seconds`` the result is cut to that length (only that
    much input plus 0.5 s of resampler context is read). Raises :class:`AudioError` with the
    reason for a missing, unreadable, truncated, empty or non-finite file.
    """
    import soundfile as sf
    import soxr

    if not os.path.exists(path):
        raise AudioError("missing file")
    try:
        sfile = sf.SoundFile(path)
    except Exception as e:  # libsndfile: "Format not recognised", etc.
        raise AudioError(f"unreadable: {_one_line(e)}") from None
    with sfile:
        sr, total = sfile.samplerate, sfile.frames
        if sfile.format == "WAV" and _wav_truncated(sfile.extra_info):
            raise AudioError("truncated file (data chunk shorter than its header says)")
        want = total
        if max_seconds is not None and total > 0:
            want = min(total, int(math.ceil((max_seconds + 0.5) * sr)))
        try:
            data = sfile.read(frames=want, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"truncated or corrupt: {_one_line(e)}") from None
    if data.shape[0] == 0:
        raise AudioError("empty (0 samples)")
    if 0 < total < (1 << 62) and data.shape[0] < want:
        raise AudioError(f"truncated file (read {data.shape[0]} of {want} frames)")
    if not np.all(np.isfinite(data)):
        raise AudioError("non-finite samples (NaN/Inf)")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ").astype(np.float32)
    if max_seconds is not None:
        mono = mono[: int(round(max_seconds * target_sr))]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _source_seconds(path: str) -> float:
    import soundfile as sf
    info = sf.info(path)
    return info.frames / float(info.samplerate)


# ----------------------------------------------------------------------------- statistics
_FBANK_FN = None


def _fbank_fn():
    """kaldi_fbank as one tf.function over a 1-D waveform of any length (no retracing)."""
    global _FBANK_FN
    if _FBANK_FN is None:
        import tensorflow as tf
        from psla_tf.features import kaldi_fbank
        _FBANK_FN = tf.function(kaldi_fbank, input_signature=[
            tf.TensorSpec([None], tf.float32)], reduce_retracing=True)
    return _FBANK_FN


def fbank_sums(pcm: np.ndarray, target_length: int = params.TARGET_LENGTH
               ) -> tuple[float, float, int]:
    """(Σx, Σx², count) of the fbank values training sees for one stored int16 clip.

    waveform = pcm / 32768 minus its mean; frames cut to ``target_length``; count = frames·128.
    """
    from psla_tf.features import num_frames
    n = pcm.shape[0]
    frames = min(num_frames(n), target_length)
    if frames <= 0:
        return 0.0, 0.0, 0
    w = pcm.astype(np.float32) / 32768.0
    w = w - w.mean(dtype=np.float64).astype(np.float32)
    used = params.FRAME_LENGTH + (frames - 1) * params.FRAME_SHIFT
    fb = _fbank_fn()(w[:used]).numpy().astype(np.float64)
    return float(fb.sum()), float(np.square(fb).sum()), int(fb.size)


def combine_stats(parts: Sequence[tuple[float, float, int]]) -> tuple[float | None, float | None, int]:
    """Exact combination of per-shard (Σx, Σx², n) → (mean, std, frames); std is the
    population std. ``frames`` counts fbank frames (n / 128)."""
    s = sum(p[0] for p in parts)
    ss = sum(p[1] for p in parts)
    n = sum(p[2] for p in parts)
    if n == 0:
        return None, None, 0
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    return mean, math.sqrt(var), n // params.NUM_MEL_BINS


# ----------------------------------------------------------------------------- shards
@dataclasses.dataclass
class ShardJob:
    index: int
    num_shards: int
    path: str
    rows: list[tuple[int, str, str, tuple[str, ...]]]  # (row number, id, path, mids)
    mid_index: dict[str, int]
    max_seconds: float
    compression: str
    stats: bool
    target_length: int
    fingerprint: str


def sidecar_path(shard_path: str) -> str:
    return shard_path + ".done.json"


def _read_sidecar(path: str, fingerprint: str) -> dict | None:
    try:
        with open(sidecar_path(path)) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("fingerprint") != fingerprint or not os.path.exists(path):
        return None
    return d


_PROGRESS: Any = None


def _init_worker(progress_queue: Any, single_thread: bool) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    if single_thread:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TF already initialised in this process


def write_shard(job: ShardJob) -> dict:
    """Write one shard (temp name → rename) and its sidecar; return the sidecar dict."""
    import tensorflow as tf

    num_classes = len(job.mid_index)
    class_counts = np.zeros(num_classes, np.int64)
    failures, n_ok, n_cut, n_unlabelled, seconds = [], 0, 0, 0, 0.0
    lengths, label_lists = [], []   # the record index (psla_tf.data.record_index)
    s = ss = 0.0
    cnt = 0
    max_samples = int(round(job.max_seconds * params.SAMPLE_RATE))
    tmp = job.path + ".tmp"
    options = tf.io.TFRecordOptions(compression_type=job.compression or "")
    with tf.io.TFRecordWriter(tmp, options) as writer:
        for (rownum, clip_id, path, mids) in job.rows:
            try:
                wave = decode_audio(path, params.SAMPLE_RATE, job.max_seconds)
                cut = _source_seconds(path) > job.max_seconds and wave.shape[0] >= max_samples
            except AudioError as e:
                failures.append({"row": rownum, "id": clip_id, "path": path, "reason": str(e)})
            else:
                pcm = records.float_to_int16(wave)
                labels = [job.mid_index[m] for m in mids]
                rec = records.make_example(clip_id, pcm, labels, list(mids))
                writer.write(rec)
                lengths.append(len(rec))
                label_lists.append(sorted(set(labels)))
                n_ok += 1
                n_cut += int(cut)
                n_unlabelled += int(not mids)
                seconds += pcm.shape[0] / params.SAMPLE_RATE
                for k in set(labels):
                    class_counts[k] += 1
                if job.stats:
                    a, b, c = fbank_sums(pcm, job.target_length)
                    s, ss, cnt = s + a, ss + b, cnt + c
            if _PROGRESS is not None:
                _PROGRESS.put(1)
    os.replace(tmp, job.path)
    side = {"version": SIDECAR_VERSION, "fingerprint": job.fingerprint,
            "file": os.path.basename(job.path), "num_examples": n_ok,
            "class_counts": class_counts.tolist(), "total_seconds": seconds, "num_cut": n_cut,
            "failures": failures, "num_unlabelled": n_unlabelled,
            "stats": [s, ss, cnt] if job.stats else None,
            "record_lengths": lengths, "record_labels": label_lists}
    atomic.write_json(sidecar_path(job.path), side, fsync=True)
    return side


def _fingerprint(rows: Sequence[tuple], mids: Sequence[str], max_seconds: float,
                 compression: str, stats: bool, target_length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(mids), max_seconds, compression, stats, target_length,
                         SIDECAR_VERSION]).encode())
    for r in rows:
        h.update(json.dumps([r[1], r[2], list(r[3])]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- driver
def prepare(rows: Sequence[Row], vocabulary: tuple[Sequence[str], Sequence[str]],
            output_prefix: str, num_shards: int = 1, workers: int = 1,
            max_seconds: float = 10.0, compression: str = "", strict: bool = False,
            stats: bool = True, target_length: int = params.TARGET_LENGTH,
            progress: bool = True, extra: dict[str, Any] | None = None) -> Manifest:
    """Write ``rows`` as ``num_shards`` TFRecord shards + manifest + failures CSV.

    ``vocabulary`` = (mids, names). Unknown MIDs and duplicate ids raise DataError before
    anything is written. Finished shards (with a matching sidecar) are skipped. Returns the
    manifest (``extra`` keys are added to it). Failures are recorded, not raised; the caller
    decides about ``strict`` (the manifest's ``failures``), but ``strict`` is stored in the
    manifest extra for reference.
    """
    from psla_tf.data.sources import check_rows
    mids, names = list(vocabulary[0]), list(vocabulary[1])
    check_rows(rows, mids)
    if num_shards < 1:
        raise DataError("--num_shards must be >= 1")
    if workers < 1:
        raise DataError("--workers must be >= 1")
    if max_seconds <= 0:
        raise DataError("--max_seconds must be > 0")
    compression = (compression or "").upper()
    if compression not in ("", "GZIP"):
        raise DataError(f"--compression must be '' or GZIP, got {compression!r}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    mid_index = {m: i for i, m in enumerate(mids)}

    jobs: list[ShardJob] = []
    done: dict[int, dict] = {}
    for i in range(num_shards):
        shard_rows = [(n, r.id, r.path, tuple(r.mids)) for n, r in enumerate(rows)
                      if n % num_shards == i]
        path = records.shard_name(output_prefix, i, num_shards, compression)
        fp = _fingerprint(shard_rows, mids, max_seconds, compression, stats, target_length)
        side = _read_sidecar(path, fp)
        if side is not None:
            done[i] = side
        else:
            jobs.append(ShardJob(i, num_shards, path, shard_rows, mid_index, max_seconds,
                                 compression, stats, target_length, fp))

    total_todo = sum(len(j.rows) for j in jobs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows), initial=len(rows) - total_todo, unit="clip",
                   desc="preparing", file=sys.stderr, dynamic_ncols=True)
    try:
        if jobs and workers == 1:
            global _PROGRESS
            _PROGRESS = _BarTicker(bar)
            try:
                for job in jobs:
                    done[job.index] = write_shard(job)
            finally:
                _PROGRESS = None
        elif jobs:
            ctx = mp.get_context("spawn")  # TF is not fork-safe
            q = ctx.Queue()
            with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker,
                          initargs=(q, True)) as pool:
                pending = [(job.index, pool.apply_async(write_shard, (job,))) for job in jobs]
                while pending:
                    _drain(q, bar, timeout=0.2)
                    still = []
                    for i, res in pending:
                        if res.ready():
                            done[i] = res.get()
                        else:
                            still.append((i, res))
                    pending = still
                _drain(q, bar)
    finally:
        if bar is not None:
            bar.close()

    sides = [done[i] for i in range(num_shards)]
    failures = sorted((f for s in sides for f in s["failures"]), key=lambda f: f["row"])
    class_counts = np.sum([s["class_counts"] for s in sides], axis=0).astype(int).tolist()
    mean = std = frames = None
    if stats:
        mean, std, frames = combine_stats([tuple(s["stats"]) for s in sides])
    manifest = Manifest(
        num_examples=sum(s["num_examples"] for s in sides),
        shards=[{"file": s["file"], "num_examples": s["num_examples"]} for s in sides],
        mids=mids, names=names, class_counts=class_counts, compression=compression,
        total_seconds=float(sum(s["total_seconds"] for s in sides)),
        num_cut=sum(s["num_cut"] for s in sides), max_seconds=float(max_seconds),
        listed=len(rows),
        failures=[{"id": f["id"], "path": f["path"], "reason": f["reason"]} for f in failures],
        fbank_mean=mean, fbank_std=std, fbank_frames=frames,
        extra={"num_unlabelled": sum(s["num_unlabelled"] for s in sides),
               "target_length": int(target_length), **(extra or {})})
    write_failures_csv(output_prefix + ".failures.csv", manifest.failures)
    if not compression:
        _write_record_index(output_prefix, num_shards, sides)
    manifest.write(records.manifest_path(output_prefix))
    if strict and manifest.failures:
        raise PreparationFailed(f"{len(manifest.failures)} clip(s) failed (strict mode); see "
                                f"{output_prefix}.failures.csv", manifest)
    return manifest


def _write_record_index(prefix: str, num_shards: int, sides: Sequence[dict]) -> None:
    """``{prefix}.index.npz`` from the lengths and labels the writers recorded (shards from an
    older sidecar without them are indexed by the first training run instead)."""
    from psla_tf.data import record_index
    out_dir = os.path.dirname(os.path.abspath(prefix))
    entries = []
    for side in sides:
        if "record_lengths" not in side:
            continue
        path = os.path.join(out_dir, side["file"])
        entries.append(record_index.entry_from_records(
            side["file"], os.path.getsize(path), side["record_lengths"], side["record_labels"]))
    if entries:
        record_index.write_index(record_index.index_path(prefix), entries)


class _BarTicker:
    """In-process stand-in for the workers' progress queue."""

    def __init__(self, bar: Any):
        self.bar = bar

    def put(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


def _drain(q: Any, bar: Any, timeout: float = 0.0) -> None:
    n = 0
    try:
        if timeout:
            n += q.get(timeout=timeout)
        while True:
            n += q.get_nowait()
    except (queuelib.Empty, EOFError, OSError):
        pass
    if bar is not None and n:
        bar.update(n)


def write_failures_csv(path: str, failures: Sequence[dict]) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "reason"])
        for x in failures:
            w.writerow([x["id"], x["path"], x["reason"]])


def nothing_prepared(m: Manifest, source: str) -> str | None:
    """The one-line error when every listed clip of ``source`` failed (``m`` written
    nothing), naming the first failure; None when something was written."""
    if m.num_examples or not m.failures:
        return None
    first = m.failures[0]
    return (f"{source}: none of the {len(m.failures)} clips could be prepared (first: "
            f"{first['path']}: {first['reason']}); nothing written")


def remove_set(output_prefix: str) -> None:
    """Remove every file :func:`prepare` writes for ``output_prefix`` (shards, their sidecars,
    index, manifest, failures list); other sets in the folder are kept."""
    folder, base = os.path.split(os.path.abspath(output_prefix))
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith((base + "-", base + ".")):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.remove(path)


def summary_line(m: Manifest) -> str:
    """One-line summary: written / failed / cut / listed (+ clips without labels)."""
    unl = m.extra.get("num_unlabelled", 0)
    return (f"written {m.num_examples} / failed {len(m.failures)} / cut {m.num_cut} / "
            f"listed {m.listed} clips ({unl} without labels) → {len(m.shards)} shard(s), "
            f"{m.total_seconds / 3600:.2f} h; manifest {m.path}")


# ----------------------------------------------------------------------------- benchmark
def benchmark_prepare(workdir: str, num_clips: int = 16, seconds: float = 10.0,
                      sample_rate: int = 44100, workers_list: Sequence[int] = (1, 2),
                      stats: bool = True) -> dict[int, float]:
    """Preparation throughput (clips/s) on ``num_clips`` synthetic ``seconds``-long stereo
    clips at ``sample_rate``, for each worker count (one shard per worker)."""
    import soundfile as sf
    from psla_tf.data.sources import Row as _Row
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_clips):
        p = os.path.join(workdir, f"clip{i:04d}.wav")
        if not os.path.exists(p):
            x = (0.1 * rng.standard_normal((int(seconds * sample_rate), 2))).astype(np.float32)
            sf.write(p, x, sample_rate, subtype="PCM_16")
        rows.append(_Row(id=p, path=p, mids=("a",), line=i + 1))
    result = {}
    for w in workers_list:
        prefix = os.path.join(workdir, f"bench_w{w}", "set")
        if os.path.isdir(os.path.dirname(prefix)):
            for f in os.listdir(os.path.dirname(prefix)):
                os.remove(os.path.join(os.path.dirname(prefix), f))
        t0 = time.perf_counter()
        prepare(rows, (["a"], ["a"]), prefix, num_shards=max(w, 2 * w), workers=w,
                stats=stats, progress=False)
        result[w] = num_clips / (time.perf_counter() - t0)
    return result
