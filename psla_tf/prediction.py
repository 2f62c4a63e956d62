"""Clip-level predictions of a trained tagger over a data set, and the scores file.

The scores file (``.npz``, written atomically) is what evaluation (Sec. II-B), label
enhancement (Sec. V, the teacher's scores) and ensembles (Sec. VI) read:

* ``ids``     [N] strings — the TFRecord ``id`` (the audio path as written in the listing;
  AudioSet CSV rows ``{YTID}_{start_seconds}``);
* ``scores``  [N, C] float32;
* ``targets`` [N, C] float32 multi-hot — only where the labels are known;
* ``mids``, ``names`` [C] strings — the class map of the scores.

Inputs: TFRecord shards (a glob; read in file order by :func:`make_eval_dataset`, every clip
padded / cut to the model's input length exactly as in evaluation during training) or a
listing of audio files (PSLA datafile, AudioSet CSV, plain CSV, class folders; decoded with
:func:`psla_tf.data.prepare.decode_audio`, cut to the same length). Memory holds one batch of
audio plus the [N, C] result.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterator, Sequence

import numpy as np

from psla_tf.data.records import DataError

__all__ = ["Predictions", "save_scores", "load_scores", "predict_records", "predict_listing",
           "predict", "is_record_glob", "check_cut_clips"]


@dataclasses.dataclass
class Predictions:
    ids: list[str]
    scores: np.ndarray                 # [N, C] float32
    targets: np.ndarray | None         # [N, C] float32 or None
    mids: list[str]
    names: list[str]
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (id, reason)


def save_scores(path: str, p: Predictions) -> None:
    """Write ``p`` as an ``.npz`` (temp file, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    arrays = dict(ids=np.asarray(p.ids, dtype=str), scores=np.asarray(p.scores, np.float32),
                  mids=np.asarray(p.mids, dtype=str), names=np.asarray(p.names, dtype=str))
    if p.targets is not None:
        arrays["targets"] = np.asarray(p.targets, np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _strings(a: np.ndarray) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.tolist()]


def load_scores(path: str) -> Predictions:
    """Read a scores file; ``mids``/``names`` are empty lists when the file has none."""
    if not os.path.exists(path):
        raise DataError(f"scores file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable scores .npz ({e})") from None
    with z:
        for key in ("ids", "scores"):
            if key not in z.files:
                raise DataError(f"{path} has no {key!r} array (has {z.files}); expected the "
                                "output of tools/predict.py")
        ids = _strings(z["ids"])
        scores = np.asarray(z["scores"])          # as stored (predict.py: float32)
        targets = np.asarray(z["targets"]) if "targets" in z.files else None
        mids = _strings(z["mids"]) if "mids" in z.files else []
        names = _strings(z["names"]) if "names" in z.files else []
    if not np.issubdtype(scores.dtype, np.floating):
        raise DataError(f"{path}: scores must be floats, got {scores.dtype}")
    if scores.ndim != 2 or scores.shape[0] != len(ids):
        raise DataError(f"{path}: scores must be [N, C] with N = len(ids) = {len(ids)}, "
                        f"got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"{path}: {int(np.sum(~np.isfinite(scores)))} scores are NaN or Inf "
                        "(a diverged model?); predict them again with a working model")
    if targets is not None and targets.shape != scores.shape:
        raise DataError(f"{path}: targets {targets.shape} and scores {scores.shape} differ")
    if mids and len(mids) != scores.shape[1]:
        raise DataError(f"{path}: {len(mids)} mids for {scores.shape[1]} score columns")
    return Predictions(ids, scores, targets, mids, names or list(mids))


def is_record_glob(data: str) -> bool:
    """TFRecord shards (``*.tfrecord[.gz]`` glob) rather than a listing of audio files."""
    first = data.split(",")[0].strip()
    return ".tfrecord" in os.path.basename(first)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="clip", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def check_cut_clips(spec, clip_samples: int, allow: bool = False) -> None:
    """Refuse shards whose clips were cut at preparation to less than 90 % of the model's
    input (``clip_samples``; :func:`psla_tf.data.records.clips_cut_short`) unless ``allow``:
    their scores would not be the model's scores of the clips."""
    from psla_tf.data.records import clips_cut_short, frames_of
    frames = frames_of(int(clip_samples))
    short = clips_cut_short(spec, frames)
    if short and not allow:
        m, kept = short[0]
        raise DataError(f"{m.num_cut} clip(s) of {m.path} were cut at preparation to "
                        f"{m.max_seconds:g} s ({kept} frames), shorter than the model's input "
                        f"of {frames} frames ({clip_samples / 16000:.2f} s): prepare them again "
                        f"with tools/make_tfrecords.py --max_seconds={clip_samples / 16000:.3f}"
                        ", or pass --allow_cut_clips if that is intended")


def predict_records(scorer, data: str, batch_size: int = 32, progress: bool = True,
                    allow_cut_clips: bool = False, ignore_labels: bool = False
                    ) -> Predictions:
    """Score every clip of the shards ``data`` (a glob), in file order. Shards cut at
    preparation shorter than the model's input are refused unless ``allow_cut_clips``.
    ``ignore_labels``: no targets, and the shards' vocabulary may differ from the model's
    (an AudioSet model on ESC-50 / FSD50K, evaluated through a class map: Table IX)."""
    from psla_tf.data import pipeline
    spec = pipeline.resolve_data(data)
    check_cut_clips(spec, scorer.clip_samples, allow_cut_clips)
    if spec.mids != list(scorer.mids) and not ignore_labels:
        if len(spec.mids) != len(scorer.mids):
            raise DataError(f"the data's vocabulary has {len(spec.mids)} classes, the model "
                            f"{len(scorer.mids)}: targets cannot be matched")
        raise DataError("the data's vocabulary (manifest mids) differs from the model's "
                        "class map (same size, different classes or order)")
    ds = pipeline.make_eval_dataset(spec, batch_size, scorer.clip_samples, with_ids=True)
    ids, scores, targets = [], [], []
    label = getattr(scorer, "progress_label", "predict")
    with _progress(spec.num_examples, label, progress) as bar:
        for feats, labels in ds:
            s = scorer(feats["waveform"].numpy(), feats["num_samples"].numpy())
            scores.append(s)
            targets.append(labels.numpy().astype(np.float32))
            ids.extend(x.decode("utf-8") for x in feats["id"].numpy().tolist())
            bar.update(len(s))
    c = len(scorer.mids)
    return Predictions(ids, _cat(scores, c), None if ignore_labels else _cat(targets, c),
                       list(scorer.mids), list(scorer.names))


def _cat(parts: list[np.ndarray], c: int) -> np.ndarray:
    return np.concatenate(parts, 0) if parts else np.zeros((0, c), np.float32)


def _decoded(rows, clip_samples: int, sample_rate: int, failures: list
             ) -> Iterator[tuple[object, np.ndarray]]:
    from psla_tf.data.prepare import AudioError, decode_audio
    for row in rows:
        try:
            wav = decode_audio(row.path, sample_rate, max_seconds=clip_samples / sample_rate)
        except AudioError as e:
            failures.append((row.id, f"{row.path}: {e}"))
            continue
        yield row, wav[:clip_samples]


def predict_listing(scorer, listing: str, batch_size: int = 32, fmt: str = "auto",
                    audio_dir: str | None = None, filename_pattern: str = "{YTID}.wav",
                    progress: bool = True, ignore_labels: bool = False) -> Predictions:
    """Score the audio files of a listing (``psla_tf.data.sources`` formats). Clips that
    cannot be decoded are skipped and returned in ``failures``; labels outside the model's
    class map are an error; ``targets`` only when every row has labels."""
    from psla_tf.data import sources
    rows = sources.read_rows(listing, fmt, audio_dir, filename_pattern)
    if not rows:
        raise DataError(f"{listing}: lists no audio files")
    have_labels = all(r.mids for r in rows) and not ignore_labels
    if have_labels:
        sources.check_rows(rows, scorer.mids, listing)
    index = {m: i for i, m in enumerate(scorer.mids)}
    c, clip = len(scorer.mids), int(scorer.clip_samples)
    ids, scores, targets, failures = [], [], [], []
    batch: list[tuple[object, np.ndarray]] = []

    def flush():
        wav = np.zeros((len(batch), clip), np.float32)
        n = np.zeros(len(batch), np.int32)
        for i, (_, w) in enumerate(batch):
            wav[i, : w.size] = w
            n[i] = w.size
        scores.append(scorer(wav, n))
        for row, _ in batch:
            ids.append(row.id)
            t = np.zeros(c, np.float32)
            t[[index[m] for m in row.mids if m in index]] = 1.0
            targets.append(t)
        bar.update(len(batch))
        batch.clear()

    with _progress(len(rows), getattr(scorer, "progress_label", "predict"),
                   progress) as bar:
        for item in _decoded(rows, clip, scorer.sample_rate, failures):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        bar.update(len(failures))
    if not ids:
        raise DataError(f"{listing}: none of the {len(rows)} clips could be decoded "
                        f"(first: {failures[0][1]})")
    return Predictions(ids, _cat(scores, c), np.stack(targets) if have_labels else None,
                       list(scorer.mids), list(scorer.names), failures)


def predict(scorer, data: str, batch_size: int = 32, progress: bool = True,
            allow_cut_clips: bool = False, ignore_labels: bool = False,
            **listing_kwargs) -> Predictions:
    """Dispatch on ``data``: TFRecord shard glob or listing of audio files."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if is_record_glob(data):
        return predict_records(scorer, data, batch_size, progress, allow_cut_clips,
                               ignore_labels)
    if not os.path.exists(data):
        raise DataError(f"--data {data!r}: neither TFRecord shards (*.tfrecord) nor an existing "
                        "listing (datafile .json, CSV or folder)")
    return predict_listing(scorer, data, batch_size, progress=progress,
                           ignore_labels=ignore_labels, **listing_kwargs)


def members_agree(preds: Sequence[Predictions], names: Sequence[str]) -> None:
    """Score files to combine must list the same clips in the same order with the same
    class map (ensembles, Sec. VI)."""
    first = preds[0]
    for p, n in zip(preds[1:], names[1:]):
        if p.scores.shape[1] != first.scores.shape[1]:
            raise DataError(f"{n}: {p.scores.shape[1]} classes, {names[0]} has "
                            f"{first.scores.shape[1]}")
        if p.mids and first.mids and p.mids != first.mids:
            raise DataError(f"{n}: class map differs from {names[0]}'s")
        if p.ids != first.ids:
            missing = set(first.ids) - set(p.ids)
            extra = set(p.ids) - set(first.ids)
            if not missing and not extra:
                raise DataError(f"{n}: same clips as {names[0]} but in another order "
                                "(predict both with the same --data)")
            raise DataError(f"{n}: clips differ from {names[0]}'s ({len(missing)} missing, "
                            f"{len(extra)} extra)")
