"""Teacher targets for knowledge distillation (issue 19): score files → per-clip soft targets.

A *teacher* is one or more score files keyed by clip id, as ``tools/predict.py`` and
``tools/ensemble.py`` write them (``ids`` [N], ``scores`` [N, Ct], ``mids`` [Ct]); a file may
hold ``logits`` [N, Ct] instead of ``scores`` (e.g. a teacher from another framework).
Several files are averaged per clip, over the files that score the clip (all files must score
the same classes and be of one kind). Raw teacher values become targets in [0, 1]:

* ``scores`` (probabilities; PSLA's multi-head output ``Σ_h w_h out_h`` is not bounded by 1,
  the heads' learnt weights need not sum to 1): ``p = clip(s, 0, 1)``; with a temperature
  ``T ≠ 1``, ``p = σ(logit(clip(s, ε, 1 − ε)) / T)`` (ε = 1e-7);
* ``logits``: ``p = σ(z / T)`` (EfficientAT's convention: the student is not tempered).

Teacher classes are matched to the model's vocabulary by MID (files without ``mids`` must have
the model's class count); model classes the teacher does not score learn from labels only.
The training pipeline gets the raw values in one of two ways, both in-graph:

* :class:`TeacherTable` — the averaged files in memory, looked up by the record's ``id``
  through a hash table (``--teacher_scores=FILE[,FILE…]``; [M, Ct] float32, fine up to
  :data:`MAX_TABLE_VALUES` values);
* the ``teacher`` float feature stored in each record by ``tools/add_teacher_scores.py``
  (``--teacher_scores=stored``; the manifest's ``teacher`` entry names the kind, the
  classes, the sources and how many clips have a score) — the way for AudioSet-size sets.

:class:`ExampleTargets` is the per-example transform the pipeline applies after parsing: labels
into the model's vocabulary (``--append_classes``) and ``teacher`` [C] / ``has_teacher``
(1.0 if the clip has a teacher score, else 0.0: it then trains on labels only) /
``has_labels`` (0.0 for a clip of the unlabelled transfer set, whose labels are zeroed:
``--labelled_fraction``, :func:`labelled_subset`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

import numpy as np

from psla_tf import params
from psla_tf.data.records import DataError

__all__ = ["KINDS", "STORED", "MAX_TABLE_VALUES", "TRANSFER_SET_NEEDS_IID", "TeacherFile", "TeacherTable",
           "read_teacher_file", "load_teacher", "targets_numpy", "targets_tf", "column_map",
           "class_lambdas", "StoredTeacher", "stored_teacher", "ExampleTargets",
           "training_keys_and_ids", "labelled_subset", "coverage"]

KINDS = ("scores", "logits")
STORED = "stored"            # --teacher_scores=stored: the shards' own teacher feature
MAX_TABLE_VALUES = 1 << 28   # 268 M float32 values (1 GiB) held in memory for the lookup
#: why --labelled_fraction refuses the stream order (config check and pipeline alike)
TRANSFER_SET_NEEDS_IID = ("--labelled_fraction needs --sampling_order=iid (the stream order's "
                          "balanced sampling reads every record's labels)")


@dataclasses.dataclass
class TeacherFile:
    """One score file as read (``values`` raw, float32 [N, Ct])."""
    path: str
    ids: list[str]
    values: np.ndarray
    mids: list[str] | None
    kind: str


@dataclasses.dataclass
class TeacherTable:
    """Raw teacher values averaged over files, one row per clip id."""
    ids: list[str]               # [M]
    values: np.ndarray           # [M, Ct] float32, raw (scores or logits)
    mids: list[str] | None       # [Ct] teacher classes (None: the model's, by position)
    kind: str                    # "scores" | "logits"
    sources: list[dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return int(self.values.shape[1])


def _strings(a: np.ndarray) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.tolist()]


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_teacher_file(path: str) -> TeacherFile:
    """A score file (``ids`` + ``scores`` or ``logits``, optional ``mids``) → TeacherFile."""
    if not os.path.exists(path):
        raise DataError(f"teacher scores file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable scores .npz ({e})") from None
    with z:
        kinds = [k for k in KINDS if k in z.files]
        if "ids" not in z.files or not kinds:
            raise DataError(f"{path}: a teacher file needs 'ids' and 'scores' (or 'logits') "
                            f"arrays, has {z.files} (write it with tools/predict.py)")
        if len(kinds) > 1:
            raise DataError(f"{path} holds both 'scores' and 'logits'; keep one")
        kind = kinds[0]
        ids = _strings(z["ids"])
        values = np.asarray(z[kind])
        mids = _strings(z["mids"]) if "mids" in z.files else None
    if not np.issubdtype(values.dtype, np.floating):
        raise DataError(f"{path}: {kind} must be floats, got {values.dtype}")
    if values.ndim != 2 or values.shape[0] != len(ids):
        raise DataError(f"{path}: {kind} must be [N, C] with N = len(ids) = {len(ids)}, got "
                        f"{values.shape}")
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: {kind} hold non-finite values")
    if mids is not None and len(mids) != values.shape[1]:
        raise DataError(f"{path}: {len(mids)} mids for {values.shape[1]} columns")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: some clip ids are listed more than once")
    return TeacherFile(path, ids, values.astype(np.float32), mids, kind)


def load_teacher(paths: Sequence[str]) -> TeacherTable:
    """Average teacher files per clip id (over the files that score the clip)."""
    paths = [p.strip() for p in paths if p.strip()]
    if not paths:
        raise DataError("--teacher_scores: no file given")
    files = [read_teacher_file(p) for p in paths]
    first = files[0]
    for f in files[1:]:
        if f.kind != first.kind:
            raise DataError(f"teacher files mix kinds: {first.path} holds {first.kind}, "
                            f"{f.path} {f.kind}")
        if (f.mids or None) != (first.mids or None) or f.values.shape[1] != \
                first.values.shape[1]:
            raise DataError(f"teacher files score different classes: {first.path} and "
                            f"{f.path} (average them over the same vocabulary)")
    if len(files) == 1:
        ids, values = first.ids, first.values
    else:
        row: dict[str, int] = {}
        for f in files:
            for i in f.ids:
                row.setdefault(i, len(row))
        ids = list(row)
        total = np.zeros((len(ids), first.values.shape[1]), np.float32)
        count = np.zeros(len(ids), np.float32)
        for f in files:
            rows = np.fromiter((row[i] for i in f.ids), np.int64, count=len(f.ids))
            total[rows] += f.values
            count[rows] += 1.0
        values = total / count[:, None]
    sources = [{"path": os.path.abspath(f.path), "sha256": sha256_of(f.path),
                "clips": len(f.ids), "classes": int(f.values.shape[1]), "kind": f.kind}
               for f in files]
    return TeacherTable(ids, np.ascontiguousarray(values, np.float32), first.mids, first.kind,
                        sources)


# ----------------------------------------------------------------------------- targets
def targets_numpy(raw: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Raw teacher values → targets in [0, 1] (see the module doc); NumPy reference."""
    raw = np.asarray(raw, np.float64)
    if kind == "logits":
        return 1.0 / (1.0 + np.exp(-raw / temperature))
    if kind != "scores":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = np.clip(raw, 0.0, 1.0)
    if temperature == 1.0:
        return p
    p = np.clip(p, params.CLAMP_EPS, float(np.float32(1.0 - params.CLAMP_EPS)))  # as float32
    return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / temperature))


def targets_tf(raw, kind: str, temperature: float = 1.0):
    """:func:`targets_numpy` in TensorFlow (float32 in, float32 out)."""
    import tensorflow as tf
    raw = tf.cast(raw, tf.float32)
    t = tf.constant(float(temperature), tf.float32)
    if kind == "logits":
        return tf.sigmoid(raw / t)
    if kind != "scores":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = tf.clip_by_value(raw, 0.0, 1.0)
    if temperature == 1.0:
        return p
    p = tf.clip_by_value(p, params.CLAMP_EPS, 1.0 - params.CLAMP_EPS)
    return tf.sigmoid((tf.math.log(p) - tf.math.log1p(-p)) / t)


def column_map(teacher_mids: Sequence[str] | None, teacher_classes: int,
               model_mids: Sequence[str]) -> np.ndarray:
    """For every model class, the teacher column scoring it, or -1 (int64 [C])."""
    if teacher_mids is None:
        if teacher_classes != len(model_mids):
            raise DataError(f"the teacher scores {teacher_classes} classes, the model has "
                            f"{len(model_mids)}, and the teacher file names no mids")
        return np.arange(len(model_mids), dtype=np.int64)
    col = {m: i for i, m in enumerate(teacher_mids)}
    out = np.array([col.get(m, -1) for m in model_mids], np.int64)
    if not (out >= 0).any():
        raise DataError("the teacher scores none of the model's classes (no common mid)")
    return out


def class_lambdas(kd_lambda: float, covered: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Per-class weight of the teacher term (float64 [C]): ``kd_lambda`` where a class has
    labels and a teacher, 1 where it has only a teacher (``--append_classes``: the original
    classes on the new data), 0 where it has only labels."""
    covered = np.asarray(covered, bool)
    labelled = np.asarray(labelled, bool)
    lam = np.where(covered & labelled, float(kd_lambda), 0.0)
    return np.where(covered & ~labelled, 1.0, lam)


# ----------------------------------------------------------------------------- stored
@dataclasses.dataclass
class StoredTeacher:
    """The teacher stored in the shards (the train manifests' ``teacher`` entry)."""
    mids: list[str] | None
    kind: str
    classes: int
    with_teacher: int
    without_teacher: int
    sources: list[dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return self.classes


def stored_teacher(spec) -> StoredTeacher:
    """Read and check the ``teacher`` entries of ``spec``'s manifests (DataSpec)."""
    entries = [m.extra.get("teacher") for m in spec.manifests]
    bad = [m.path for m, e in zip(spec.manifests, entries) if not e]
    if bad:
        raise DataError(f"--teacher_scores=stored: {bad[0]} has no teacher scores (add them "
                        "with tools/add_teacher_scores.py)")
    first = entries[0]
    for m, e in zip(spec.manifests, entries):
        if e["kind"] != first["kind"] or e.get("mids") != first.get("mids") or \
                int(e["classes"]) != int(first["classes"]):
            raise DataError(f"--teacher_scores=stored: {m.path} stores another teacher "
                            f"(kind / classes) than {spec.manifests[0].path}")
    return StoredTeacher(first.get("mids"), first["kind"], int(first["classes"]),
                         sum(int(e["with_teacher"]) for e in entries),
                         sum(int(e["without_teacher"]) for e in entries),
                         [s for e in entries for s in e.get("sources", [])])


# ----------------------------------------------------------------------------- pipeline
class ExampleTargets:
    """Per-example transform ``(parsed example, serialised record) → example`` (in-graph).

    ``label_map`` (int [C_data], model column of each data class) maps the labels into the
    model's vocabulary; with a teacher (a :class:`TeacherTable`, or :class:`StoredTeacher` for
    the records' own ``teacher`` feature) it adds ``teacher`` [C_model] (targets, 0 where the
    teacher does not score the class) and ``has_teacher`` (float32 scalar). With
    ``labelled_keys`` (int64 record keys, :func:`training_keys_and_ids`) it adds
    ``has_labels`` (1.0 for those records, else 0.0 with the labels zeroed) and, without a
    teacher, zero ``teacher`` / ``has_teacher``, so the targets have one layout. Build it
    where the dataset is built (tf.data captures the lookup tables).
    """

    def __init__(self, num_model_classes: int, label_map: np.ndarray | None = None,
                 teacher: TeacherTable | StoredTeacher | None = None,
                 teacher_columns: np.ndarray | None = None, temperature: float = 1.0,
                 labelled_keys: np.ndarray | None = None):
        import tensorflow as tf
        self.num_model_classes = int(num_model_classes)
        self.labelled_keys = None
        if labelled_keys is not None:
            self.labelled_keys = np.unique(np.asarray(labelled_keys, np.int64))
            keys = tf.constant(self.labelled_keys, tf.int64)
            self.labelled = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.float32)),
                default_value=0.0)
        self.label_map = None
        if label_map is not None:
            m = np.zeros((len(label_map), self.num_model_classes), np.float32)
            m[np.arange(len(label_map)), np.asarray(label_map)] = 1.0
            self.label_map = tf.constant(m)
        self.teacher = teacher
        self.temperature = float(temperature)
        if teacher is None:
            return
        ct = teacher.num_classes
        cols = np.asarray(teacher_columns, np.int64)
        # model column c ← teacher column cols[c]; -1 → the appended zero column ct
        self.gather = tf.constant(np.where(cols >= 0, cols, ct), tf.int64)
        if isinstance(teacher, TeacherTable):
            if teacher.values.size > MAX_TABLE_VALUES:
                raise DataError(f"--teacher_scores: {teacher.values.shape[0]} clips x "
                                f"{ct} classes is too large to hold in memory; store the "
                                "scores in the shards with tools/add_teacher_scores.py and "
                                "pass --teacher_scores=stored")
            keys = tf.constant(np.asarray(teacher.ids, dtype=object), tf.string)
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    keys, tf.range(len(teacher.ids), dtype=tf.int64)), default_value=-1)
            self.values = tf.constant(teacher.values, tf.float32)

    def _raw(self, ex: dict, rec):
        """(raw teacher values [Ct], has_teacher bool) of one example."""
        import tensorflow as tf
        ct = self.teacher.num_classes
        if isinstance(self.teacher, TeacherTable):
            row = self.table.lookup(ex["id"])
            raw = tf.gather(self.values, tf.maximum(row, 0))
            return raw, row >= 0
        from psla_tf.data.records import parse_teacher
        raw = parse_teacher(rec)
        has = tf.equal(tf.size(raw), ct)
        raw = tf.cond(has, lambda: tf.reshape(raw, [ct]), lambda: tf.zeros([ct], tf.float32))
        return raw, has

    def __call__(self, ex: dict, rec) -> dict:
        import tensorflow as tf
        out = dict(ex)
        if self.label_map is not None:
            out["labels"] = tf.linalg.matvec(self.label_map, ex["labels"], transpose_a=True)
        if self.labelled_keys is not None:
            has_labels = self.labelled.lookup(ex["key"])
            out["labels"] = out["labels"] * has_labels
            out["has_labels"] = has_labels
            if self.teacher is None:
                out["teacher"] = tf.zeros([self.num_model_classes], tf.float32)
                out["has_teacher"] = tf.constant(0.0, tf.float32)
        elif self.teacher is not None:
            out["has_labels"] = tf.constant(1.0, tf.float32)
        if self.teacher is None:
            return out
        raw, has = self._raw(ex, rec)
        t = targets_tf(raw, self.teacher.kind, self.temperature)
        t = tf.gather(tf.concat([t, tf.zeros([1], tf.float32)], 0), self.gather)
        has = tf.cast(has, tf.float32)
        out["teacher"] = tf.ensure_shape(t * has, [self.num_model_classes])
        out["has_teacher"] = has
        return out


# ----------------------------------------------------------------------------- coverage
def training_keys_and_ids(spec) -> tuple[np.ndarray, list[str]]:
    """Every record's pipeline key (file index * 2**32 + position, as
    :func:`psla_tf.data.pipeline.example_key_parts` splits it) and ``id``, in file order."""
    import tensorflow as tf
    keys, ids = [], []
    for fi, path in enumerate(spec.files):
        ds = tf.data.TFRecordDataset(path, compression_type=spec.compression or None)
        ds = ds.map(lambda r: tf.io.parse_single_example(
            r, {"id": tf.io.FixedLenFeature([], tf.string)})["id"], num_parallel_calls=4,
            deterministic=True).batch(4096)
        n0 = len(ids)
        ids.extend(x.decode("utf-8") for b in ds for x in b.numpy().tolist())
        keys.append((np.int64(fi) << 32) + np.arange(len(ids) - n0, dtype=np.int64))
    return (np.concatenate(keys) if keys else np.zeros([0], np.int64)), ids


def labelled_subset(ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which clips keep their labels under ``--labelled_fraction`` (bool [N]).

    Clip ``i`` is labelled when the first 8 bytes of SHA-256(id), read as a fraction of
    2**64, are below ``fraction``: a fixed subset of each clip id (the same in every run,
    seed and sharding), of expected size ``fraction · N``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    u = np.fromiter((int.from_bytes(hashlib.sha256(i.encode("utf-8")).digest()[:8], "big")
                     for i in ids), np.float64, count=len(ids)) / 2.0 ** 64
    return u < fraction


def coverage(data_ids: Sequence[str], teacher_ids: Sequence[str]) -> dict[str, Any]:
    """How many of the data's clips have a teacher score; a few of those without."""
    known = set(teacher_ids)
    missing = [i for i in data_ids if i not in known]
    return {"with_teacher": len(data_ids) - len(missing), "without_teacher": len(missing),
            "missing_examples": missing[:5]}
