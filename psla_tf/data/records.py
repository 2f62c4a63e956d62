"""TFRecord schema, parser and manifests (the storage format of every psla_tf dataset).

One ``tf.train.Example`` per clip:

========== ============ =========================================================
feature    type         content
========== ============ =========================================================
id         bytes        the clip's audio path exactly as written in the input file
                        (AudioSet segment CSV rows: ``{YTID}_{start_seconds}``)
waveform   bytes        int16 little-endian mono PCM at 16 kHz
num_samples int64       number of samples in ``waveform``
labels     int64 list   class indices into the manifest's vocabulary
mids       bytes list   the same labels as MIDs (readable without the vocabulary)
teacher    float list   optional: a teacher's raw scores (or logits) of the clip, one per
                        class of the manifest's ``teacher.mids`` (knowledge distillation;
                        written by tools/add_teacher_scores.py, absent: no teacher score)
========== ============ =========================================================

Shards are named ``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` (``.tfrecord.gz`` when GZIP
compressed); ``{prefix}.manifest.json`` beside them holds the counts the sampler and the
trainer need (see :class:`Manifest`).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

from psla_tf import atomic, params
from psla_tf.errors import DataError

MANIFEST_FORMAT = "psla_tf.tfrecords/1"
TEACHER_FEATURE = "teacher"  # optional float feature (knowledge distillation)
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord(?P<gz>\.gz)?$")


def shard_name(prefix: str, index: int, num_shards: int, compression: str = "") -> str:
    suffix = ".tfrecord.gz" if compression.upper() == "GZIP" else ".tfrecord"
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{suffix}"


def manifest_path(prefix: str) -> str:
    return f"{prefix}.manifest.json"


# ----------------------------------------------------------------------------- writing
def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _float_feature(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _int64_feature(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def float_to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → int16 (round to nearest, clipped)."""
    w = np.clip(np.asarray(waveform, dtype=np.float64) * 32768.0, -32768, 32767)
    return np.round(w).astype("<i2")


def make_example(clip_id: str, waveform_int16: np.ndarray, labels: Sequence[int],
                 mids: Sequence[str], teacher: Sequence[float] | None = None) -> bytes:
    """Serialise one clip (``waveform_int16``: int16 mono 16 kHz) as a tf.train.Example
    (``teacher``: the optional raw teacher values, see the module doc)."""
    pcm = np.asarray(waveform_int16, dtype="<i2")
    if pcm.ndim != 1:
        raise ValueError("waveform must be mono (1-D)")
    feature = {
        "id": _bytes_feature([clip_id.encode("utf-8")]),
        "waveform": _bytes_feature([pcm.tobytes()]),
        "num_samples": _int64_feature([pcm.shape[0]]),
        "labels": _int64_feature(labels),
        "mids": _bytes_feature([m.encode("utf-8") for m in mids]),
    }
    if teacher is not None:
        feature[TEACHER_FEATURE] = _float_feature(teacher)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# ----------------------------------------------------------------------------- parsing
FEATURE_SPEC = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "waveform": tf.io.FixedLenFeature([], tf.string),
    "num_samples": tf.io.FixedLenFeature([], tf.int64),
    "labels": tf.io.VarLenFeature(tf.int64),
    "mids": tf.io.VarLenFeature(tf.string),
}


def parse_teacher(serialized: tf.Tensor) -> tf.Tensor:
    """The optional ``teacher`` feature of one serialised Example: float32 ``[Ct]``, or
    ``[0]`` when the record has none."""
    ex = tf.io.parse_single_example(
        serialized, {TEACHER_FEATURE: tf.io.VarLenFeature(tf.float32)})
    return tf.sparse.to_dense(ex[TEACHER_FEATURE])


def decode_waveform(pcm_bytes: tf.Tensor) -> tf.Tensor:
    """int16 little-endian bytes → float32 samples in [-1, 1) (divided by 32768)."""
    pcm = tf.io.decode_raw(pcm_bytes, tf.int16, little_endian=True)
    return tf.cast(pcm, tf.float32) / 32768.0


def labels_to_multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Class indices ``[k]`` → float32 multi-hot ``[num_classes]`` (duplicates count once)."""
    # max over an empty label list is -inf: clamp at 0 so "no event" clips get all zeros
    hot = tf.maximum(tf.reduce_max(tf.one_hot(labels, num_classes, dtype=tf.float32), axis=0),
                     0.0)
    return tf.reshape(hot, [num_classes])  # one_hot of an empty list reduces to [] otherwise


def parse_example(serialized: tf.Tensor, num_classes: int) -> dict[str, tf.Tensor]:
    """Parse one serialised Example → ``{"id", "waveform" [samples], "labels" [C]}``.

    ``waveform`` is float32 in [-1, 1]; ``labels`` a float32 multi-hot vector.
    """
    ex = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    labels = tf.sparse.to_dense(ex["labels"])
    return {
        "id": ex["id"],
        "waveform": decode_waveform(ex["waveform"]),
        "labels": labels_to_multi_hot(labels, num_classes),
    }


# ----------------------------------------------------------------------------- manifests
@dataclasses.dataclass
class Manifest:
    """What a set of shards holds (written by make_tfrecords, read by training).

    ``class_counts`` are the per-class positive counts c_k that balanced sampling uses
    (Algorithm 1, line 1). ``fbank_mean``/``fbank_std`` are the normalisation statistics of
    the set (None when not computed). ``listed`` is how many clips the input listed, so
    coverage (``num_examples`` of ``listed``) can be reported.
    """
    num_examples: int
    shards: list[dict[str, Any]]
    mids: list[str]
    names: list[str]
    class_counts: list[int]
    compression: str = ""
    total_seconds: float = 0.0
    num_cut: int = 0
    max_seconds: float = 10.0
    sample_rate: int = params.SAMPLE_RATE
    listed: int | None = None
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)
    fbank_mean: float | None = None
    fbank_std: float | None = None
    fbank_frames: int | None = None
    path: str | None = None  # where it was read from (not serialised)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.mids)

    def shard_paths(self) -> list[str]:
        base = os.path.dirname(self.path) if self.path else ""
        return [s["file"] if _is_absolute(s["file"]) else os.path.join(base, s["file"])
                for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        extra = d.pop("extra")
        out = {"format": MANIFEST_FORMAT}
        out.update(d)
        out.update(extra)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], path: str | None = None) -> "Manifest":
        fields = {f.name for f in dataclasses.fields(cls)} - {"path", "extra"}
        known = {k: v for k, v in d.items() if k in fields}
        missing = {"num_examples", "shards", "mids", "names", "class_counts"} - set(known)
        if missing:
            raise DataError(f"manifest {path or ''} lacks {sorted(missing)}")
        extra = {k: v for k, v in d.items() if k not in fields and k != "format"}
        return cls(**known, path=path, extra=extra)

    def write(self, path: str) -> None:
        """Write atomically (temp file + rename): a reader never sees a partial manifest."""
        tmp = path + ".tmp"
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        self.path = path


def _is_absolute(p: str) -> bool:
    return os.path.isabs(p) or "://" in p


def read_manifest(path: str) -> Manifest:
    if not tf.io.gfile.exists(path):
        raise DataError(f"manifest not found: {path}")
    with tf.io.gfile.GFile(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"manifest {path} is not valid JSON: {e}") from None
    return Manifest.from_json(d, path=path)


def expand_glob(pattern: str | Sequence[str]) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs / a list), local or gs://."""
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    files: list[str] = []
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        found = tf.io.gfile.glob(p) if ("://" in p) else globlib.glob(p)
        files.extend(sorted(f for f in found
                            if not f.endswith((".json", ".csv", ".tmp", ".index.npz"))))
    return sorted(dict.fromkeys(files))


def shard_prefix(path: str) -> str:
    m = SHARD_RE.match(path)
    if not m:
        raise DataError(f"{path} is not named like a psla_tf shard "
                        "({prefix}-NNNNN-of-NNNNN.tfrecord)")
    return m.group("prefix")


@dataclasses.dataclass
class DataSpec:
    """Shards matched by a glob with their combined manifest information."""
    files: list[str]
    manifests: list[Manifest]
    num_examples: int
    mids: list[str]
    names: list[str]
    class_counts: np.ndarray
    compression: str

    @property
    def num_classes(self) -> int:
        return len(self.mids)

    @property
    def listed(self) -> int:
        return sum(m.listed if m.listed is not None else m.num_examples for m in self.manifests)


def shard_counts(spec: DataSpec) -> np.ndarray:
    """Records per file of ``spec.files`` according to the manifests (int64 ``[F]``)."""
    per_file: dict[str, int] = {}
    for m in spec.manifests:
        for path, s in zip(m.shard_paths(), m.shards):
            per_file[os.path.basename(path)] = int(s["num_examples"])
    try:
        return np.array([per_file[os.path.basename(f)] for f in spec.files], np.int64)
    except KeyError as e:
        raise DataError(f"shard {e.args[0]} is not listed in any manifest") from None


def merged_manifest_fields(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The fields of one manifest for the union of several sets' shards (a rewritten copy of
    them): counts summed, fbank statistics pooled by frames."""
    m0 = manifests[0]
    out = {"compression": m0.compression, "max_seconds": m0.max_seconds,
           "sample_rate": m0.sample_rate, "extra": dict(m0.extra)}
    out["total_seconds"] = float(sum(m.total_seconds for m in manifests))
    out["num_cut"] = int(sum(m.num_cut for m in manifests))
    out["listed"] = (None if any(m.listed is None for m in manifests)
                     else int(sum(m.listed for m in manifests)))
    out["failures"] = [f for m in manifests for f in m.failures]
    if len(manifests) == 1:
        out.update(fbank_mean=m0.fbank_mean, fbank_std=m0.fbank_std,
                   fbank_frames=m0.fbank_frames)
    elif all(m.fbank_mean is not None and m.fbank_std is not None and m.fbank_frames
             for m in manifests):
        w = np.array([m.fbank_frames for m in manifests], np.float64)
        mu = np.array([m.fbank_mean for m in manifests])
        sd = np.array([m.fbank_std for m in manifests])
        mean = float((w * mu).sum() / w.sum())
        var = float((w * (sd ** 2 + mu ** 2)).sum() / w.sum() - mean ** 2)
        out.update(fbank_mean=mean, fbank_std=float(np.sqrt(max(var, 0.0))),
                   fbank_frames=int(w.sum()))
    return out


def load_data_spec(pattern: str | Sequence[str]) -> DataSpec:
    """Resolve a shard glob and the manifests beside the shards, checking they agree.

    Counts cover only the shards the glob matched (per-shard counts from the manifest), so a
    glob that picks part of a set gets that part's example count; class counts are those of
    whole manifests (scaled per shard is not possible), which is what balanced sampling needs
    up to a constant.
    """
    files = expand_glob(pattern)
    if not files:
        raise DataError(f"no TFRecord shards match {pattern!r}")
    by_prefix: dict[str, list[str]] = {}
    for f in files:
        by_prefix.setdefault(shard_prefix(f), []).append(f)
    manifests: list[Manifest] = []
    num_examples = 0
    compression = None
    counts = None
    mids = names = None
    for prefix, shard_files in by_prefix.items():
        m = read_manifest(manifest_path(prefix))
        if mids is None:
            mids, names = list(m.mids), list(m.names)
            counts = np.zeros(len(mids), np.int64)
        elif list(m.mids) != mids:
            raise DataError(f"vocabulary of {m.path} differs from {manifests[0].path}")
        per_shard = {os.path.basename(s["file"]): int(s["num_examples"]) for s in m.shards}
        for f in shard_files:
            base = os.path.basename(f)
            if base not in per_shard:
                raise DataError(f"shard {f} is not listed in {m.path}")
            num_examples += per_shard[base]
        counts += np.asarray(m.class_counts, np.int64)
        if compression is None:
            compression = m.compression
        elif compression != m.compression:
            raise DataError("shards mix compressed and uncompressed files")
        manifests.append(m)
    return DataSpec(files=files, manifests=manifests, num_examples=num_examples, mids=mids,
                    names=names, class_counts=counts, compression=compression or "")


CUT_TOLERANCE = 0.9  # a cut keeping >= 90 % of the model input's frames is accepted
#                     (AudioSet: 10-s clips, 998 frames, padded to 1056 as the reference does)


def frames_of(samples: int) -> int:
    """Kaldi frames (25 ms, 10-ms shift, snip_edges) of ``samples`` samples."""
    if samples < params.FRAME_LENGTH:
        return 0
    return 1 + (int(samples) - params.FRAME_LENGTH) // params.FRAME_SHIFT


def clips_cut_short(spec: DataSpec, input_frames: int,
                    tolerance: float = CUT_TOLERANCE) -> list[tuple[Manifest, int]]:
    """(manifest, frames kept) of every manifest whose preparation cut clips
    (``num_cut`` > 0) to fewer than ``tolerance`` x ``input_frames`` frames.

    Whole clips shorter than the input are not listed: the model zero-pads them, as the paper
    pads every FSD50K clip to 30 s.
    """
    out = []
    for m in spec.manifests:
        if not m.num_cut:
            continue
        kept = frames_of(int(round(m.max_seconds * m.sample_rate)))
        if kept < tolerance * input_frames:
            out.append((m, kept))
    return out


def read_label_csv(path: str) -> tuple[list[str], list[str]]:
    """Vocabulary CSV ``index,mid,display_name`` → (mids, names) ordered by index."""
    import csv
    if not tf.io.gfile.exists(path):
        raise DataError(f"label CSV not found: {path}")
    rows = []
    with tf.io.gfile.GFile(path) as f:
        reader = csv.DictReader(f)
        need = {"index", "mid", "display_name"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DataError(f"{path}: expected columns index,mid,display_name, "
                            f"got {reader.fieldnames}")
        for row in reader:
            rows.append((int(row["index"]), row["mid"].strip(), row["display_name"].strip()))
    rows.sort()
    if [r[0] for r in rows] != list(range(len(rows))):
        raise DataError(f"{path}: indices must be 0..{len(rows) - 1} without gaps")
    mids = [r[1] for r in rows]
    if len(set(mids)) != len(mids):
        raise DataError(f"{path}: duplicate MIDs")
    return mids, [r[2] for r in rows]


def write_label_csv(path: str, mids: Sequence[str], names: Sequence[str]) -> None:
    """``index,mid,display_name`` rows, written atomically; processes writing the same file at
    once (cross-validation halves preparing one folder) each use a temporary file of their own."""
    import csv
    with (atomic.atomic_path(path, f".{os.getpid()}") as tmp,
          open(tmp, "w", newline="", encoding="utf-8") as f):
        w = csv.writer(f)
        w.writerow(["index", "mid", "display_name"])
        for i, (m, n) in enumerate(zip(mids, names)):
            w.writerow([i, m, n])


def iter_examples(files: Iterable[str], compression: str = "") -> Iterable[dict[str, Any]]:
    """Eagerly iterate parsed examples (numpy) — for tools and tests, not for training."""
    for f in files:
        for raw in tf.data.TFRecordDataset([f], compression_type=compression or None):
            ex = tf.train.Example.FromString(raw.numpy())
            feat = ex.features.feature
            yield {
                "id": feat["id"].bytes_list.value[0].decode("utf-8"),
                "waveform_int16": np.frombuffer(feat["waveform"].bytes_list.value[0], "<i2"),
                "num_samples": feat["num_samples"].int64_list.value[0],
                "labels": list(feat["labels"].int64_list.value),
                "mids": [m.decode("utf-8") for m in feat["mids"].bytes_list.value],
                "teacher": (np.asarray(feat[TEACHER_FEATURE].float_list.value, np.float32)
                            if TEACHER_FEATURE in feat else None),
            }
