"""Random access into TFRecord shards: where every record starts, and its labels.

The i.i.d. training order (:mod:`psla_tf.data.pipeline`, ``sampling_order="iid"``) reads
records at random, as the reference's ``WeightedRandomSampler`` + per-clip loading does, so it
needs, per record, the shard, the byte offset and the length, and — to weight the draw
(Algorithm 1, lines 1-8) before reading anything — the labels. This module keeps them in one
small file beside the manifest, ``{prefix}.index.npz`` (format ``INDEX_FORMAT``):

========== ============== ========================================================
array      shape / dtype  content
========== ============== ========================================================
names      [S] str        shard file names (basenames, as in the manifest)
sizes      [S] int64      each shard's size in bytes when it was indexed
counts     [S] int64      records indexed per shard
lengths    [R] int64      serialised Example bytes of every record, shard by shard
num_labels [R] int64      labels per record
labels     [L] int32      class indices, record by record
========== ============== ========================================================

TFRecord framing (uncompressed): 8-byte little-endian length, 4-byte masked CRC-32C of the
length, the data, 4-byte masked CRC-32C of the data; so record k of a shard starts at byte
``sum_{j<k} (length_j + 16)``. ``tools/make_tfrecords.py`` writes the index while it writes the
shards; for shards without one (or with a stale one: a size that differs) it is built by one
pass over them (labels parsed, lengths measured) and cached. A 2-million-clip AudioSet index is
about 40 MB in memory. GZIP shards have no random access: their index holds the labels only.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from psla_tf.data import records
from psla_tf.data.records import DataError, DataSpec

__all__ = ["INDEX_FORMAT", "index_path", "ShardEntry", "RecordIndex", "load_record_index",
           "write_index", "read_index", "scan_shard", "read_record_op",
           "read_all_records", "CorruptShard"]

INDEX_FORMAT = "psla_tf.record_index/1"
HEADER_BYTES = 12   # length (8) + masked CRC of the length (4)
FOOTER_BYTES = 4    # masked CRC of the data


def index_path(prefix: str) -> str:
    return f"{prefix}.index.npz"


# ----------------------------------------------------------------------------- entries
@dataclasses.dataclass
class ShardEntry:
    """The index of one shard: record lengths and labels (CSR)."""
    name: str
    size: int
    lengths: np.ndarray     # int64 [n]
    num_labels: np.ndarray  # int64 [n]
    labels: np.ndarray      # int32 [sum(num_labels)]

    @property
    def count(self) -> int:
        return int(self.lengths.shape[0])

    def offsets(self) -> np.ndarray:
        """Byte offset of every record's frame (int64 [n])."""
        step = self.lengths + HEADER_BYTES + FOOTER_BYTES
        return np.concatenate([[0], np.cumsum(step)[:-1]]).astype(np.int64)

    def framed_bytes(self) -> int:
        return int((self.lengths + HEADER_BYTES + FOOTER_BYTES).sum())


def entry_from_records(name: str, size: int, lengths: Sequence[int],
                       labels: Sequence[Sequence[int]]) -> ShardEntry:
    """A ShardEntry from per-record lengths and label lists (as a writer knows them)."""
    sets = [sorted(set(int(k) for k in row)) for row in labels]
    flat = [k for s in sets for k in s]
    return ShardEntry(name, int(size), np.asarray(lengths, np.int64),
                      np.asarray([len(s) for s in sets], np.int64),
                      np.asarray(flat, np.int32))


def write_index(path: str, entries: Sequence[ShardEntry]) -> None:
    """Write ``entries`` as one ``.npz`` (temp file + rename; local or gs://)."""
    import tensorflow as tf
    entries = sorted(entries, key=lambda e: e.name)
    arrays = {
        "format": np.asarray(INDEX_FORMAT),
        "names": np.asarray([e.name for e in entries], dtype=str),
        "sizes": np.asarray([e.size for e in entries], np.int64),
        "counts": np.asarray([e.count for e in entries], np.int64),
        "lengths": _cat([e.lengths for e in entries], np.int64),
        "num_labels": _cat([e.num_labels for e in entries], np.int64),
        "labels": _cat([e.labels for e in entries], np.int32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buf.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def read_index(path: str) -> dict[str, ShardEntry]:
    """Shard name → ShardEntry of an index file; {} when the file is absent or unreadable."""
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            z = np.load(io.BytesIO(f.read()), allow_pickle=False)
        if str(z["format"]) != INDEX_FORMAT:
            return {}
        names, sizes, counts = z["names"], z["sizes"], z["counts"]
        lengths, num_labels, labels = z["lengths"], z["num_labels"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        logging.warning("ignoring unreadable record index %s (%s)", path, e)
        return {}
    out = {}
    start = lab = 0
    for name, size, count in zip(names.tolist(), sizes.tolist(), counts.tolist()):
        nl = num_labels[start:start + count]
        k = int(nl.sum())
        out[name] = ShardEntry(name, int(size), lengths[start:start + count].astype(np.int64),
                               nl.astype(np.int64), labels[lab:lab + k].astype(np.int32))
        start += count
        lab += k
    return out


# ----------------------------------------------------------------------------- scanning
@dataclasses.dataclass
class CorruptShard:
    """A shard with fewer readable records than its manifest lists."""
    path: str
    read: int
    listed: int

    def message(self) -> str:
        return (f"corrupt or truncated TFRecord shard {self.path}: read {self.read} of "
                f"{self.listed} records listed in its manifest")


def scan_shard(path: str, compression: str = "") -> ShardEntry:
    """One pass over a shard: every record's length and labels (stops at the first record
    that cannot be read, as the training reader does)."""
    import tensorflow as tf
    spec = {"labels": records.FEATURE_SPEC["labels"]}

    def per_record(rec):
        ex = tf.io.parse_single_example(rec, spec)
        labs = tf.unique(tf.sparse.to_dense(ex["labels"]))[0]
        return tf.strings.length(rec, unit="BYTE"), labs

    ds = tf.data.TFRecordDataset(path, compression_type=compression or "").ignore_errors()
    ds = ds.map(per_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    lengths, labels = [], []
    for length, labs in ds.as_numpy_iterator():
        lengths.append(int(length))
        labels.append(labs.tolist())
    size = tf.io.gfile.stat(path).length
    return entry_from_records(os.path.basename(path), size, lengths, labels)


# ----------------------------------------------------------------------------- combined
@dataclasses.dataclass
class RecordIndex:
    """Every record of a DataSpec's shards (``spec.files`` order, file order inside).

    ``file_index`` points into ``files``; ``position`` is the record's place in its shard
    (the pipeline key is ``file_index * 2**32 + position``); ``offset``/``length`` locate the
    record's frame (None for GZIP shards); labels as CSR (``label_indptr``, ``label_indices``).
    """
    files: list[str]
    file_index: np.ndarray     # int64 [R]
    position: np.ndarray       # int64 [R]
    offset: np.ndarray | None  # int64 [R]
    length: np.ndarray | None  # int64 [R]
    label_indptr: np.ndarray   # int64 [R + 1]
    label_indices: np.ndarray  # int32 [nnz]
    num_classes: int
    corrupt: list[CorruptShard] = dataclasses.field(default_factory=list)

    @property
    def num_records(self) -> int:
        return int(self.file_index.shape[0])

    @property
    def random_access(self) -> bool:
        return self.offset is not None

    def keys(self) -> np.ndarray:
        """Pipeline keys (int64 [R], ascending)."""
        return (self.file_index << 32) + self.position

    def sampling_weights(self, class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """Algorithm 1, Procedure 1: w_i = sum_{k in labels(i)} 1 / c_k (float64 [R])."""
        from psla_tf.data.sampling import inverse_class_counts
        inv = inverse_class_counts(class_counts)
        if inv.shape[0] != self.num_classes:
            raise DataError(f"{inv.shape[0]} class counts for {self.num_classes} classes")
        rows = np.repeat(np.arange(self.num_records), np.diff(self.label_indptr))
        w = np.zeros(self.num_records, np.float64)
        np.add.at(w, rows, inv[self.label_indices])
        return w


_CACHE: dict[tuple, RecordIndex] = {}
_CACHE_LOCK = threading.Lock()


def _shard_sizes(files: Sequence[str]) -> list[int]:
    import tensorflow as tf
    try:
        return [int(tf.io.gfile.stat(f).length) for f in files]
    except tf.errors.NotFoundError as e:
        raise DataError(f"shard not found: {e.message}") from None


def load_record_index(spec: DataSpec, *, skip_corrupt: bool = False, cache: bool = True,
                      progress: bool = False) -> RecordIndex:
    """The RecordIndex of ``spec.files``: from ``{prefix}.index.npz`` where it is current,
    otherwise built by one pass over the missing or changed shards and written back (when
    ``cache`` and the folder is writable).

    A shard whose readable records are fewer than its manifest lists raises DataError naming
    it (``corrupt or truncated TFRecord shard ...``), or with ``skip_corrupt`` keeps the
    records read and reports it in ``RecordIndex.corrupt``.
    """
    sizes = _shard_sizes(spec.files)
    key = (tuple(spec.files), tuple(sizes), spec.num_classes)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        hit = _build(spec, sizes, cache, progress)
        with _CACHE_LOCK:
            _CACHE[key] = hit
    listed = records.shard_counts(spec)
    counts = np.bincount(hit.file_index, minlength=len(spec.files))
    corrupt = []
    for f, n_read, n_listed in zip(spec.files, counts.tolist(), listed.tolist()):
        if n_read > n_listed:
            raise DataError(f"TFRecord shard {f} holds {n_read} records, its manifest lists "
                            f"{n_listed}: the shard and its manifest do not belong together")
        if n_read < n_listed:
            corrupt.append(CorruptShard(f, n_read, n_listed))
    if corrupt and not skip_corrupt:
        raise DataError(corrupt[0].message())
    return dataclasses.replace(hit, corrupt=corrupt)


def _build(spec: DataSpec, sizes: list[int], cache: bool, progress: bool) -> RecordIndex:
    gz = (spec.compression or "").upper() == "GZIP"
    by_prefix: dict[str, list[int]] = {}
    for i, f in enumerate(spec.files):
        by_prefix.setdefault(records.shard_prefix(f), []).append(i)
    entries: dict[int, ShardEntry] = {}
    for prefix, ids in by_prefix.items():
        path = index_path(prefix)
        stored = read_index(path)
        missing = [i for i in ids
                   if os.path.basename(spec.files[i]) not in stored
                   or stored[os.path.basename(spec.files[i])].size != sizes[i]]
        for i in ids:
            if i not in missing:
                entries[i] = stored[os.path.basename(spec.files[i])]
        if missing:
            n = len(missing)
            logging.warning("indexing %d shard(s) of %s for random access (one pass; cached "
                            "in %s)", n, prefix, path)
            if progress:
                print(f"indexing {n} shard(s) of {prefix} (one pass over them, cached in "
                      f"{path})", flush=True)
            for i in missing:
                e = scan_shard(spec.files[i], spec.compression)
                entries[i] = e
                stored[e.name] = e
            if cache and not gz:
                try:
                    write_index(path, list(stored.values()))
                except Exception as err:  # read-only folder or bucket: keep it in memory
                    logging.warning("could not cache the record index in %s (%s); it is "
                                    "rebuilt next time", path, err)
    return _combine(spec, entries, gz)


def _combine(spec: DataSpec, entries: dict[int, ShardEntry], gz: bool) -> RecordIndex:
    fi, pos, off, length, nl, labs = [], [], [], [], [], []
    for i in range(len(spec.files)):
        e = entries[i]
        fi.append(np.full(e.count, i, np.int64))
        pos.append(np.arange(e.count, dtype=np.int64))
        off.append(e.offsets())
        length.append(e.lengths)
        nl.append(e.num_labels)
        labs.append(e.labels)
    indptr = np.concatenate([[0], np.cumsum(_cat(nl, np.int64))]).astype(np.int64)
    indices = _cat(labs, np.int32)
    if indices.size and (indices.min() < 0 or indices.max() >= spec.num_classes):
        raise DataError(f"records of {spec.files[0]}... carry label indices outside the "
                        f"manifest's {spec.num_classes} classes")
    return RecordIndex(list(spec.files), _cat(fi, np.int64), _cat(pos, np.int64),
                       None if gz else _cat(off, np.int64),
                       None if gz else _cat(length, np.int64), indptr, indices,
                       spec.num_classes)


# ----------------------------------------------------------------------------- reading
def read_record_op(path, offset, length):
    """In-graph read of one record: ``path`` (string), ``offset`` (the byte where its frame
    starts) and ``length`` (its data bytes), int64 scalar tensors → the serialised record
    (string scalar tensor). TensorFlow's TFRecord reader from that byte (one frame; both CRCs
    checked, the data's too); a frame that is not there intact (a stale index, a damaged or
    truncated shard) fails with an InvalidArgumentError naming the shard
    (``corrupt or truncated TFRecord shard <path>``). No Python runs per record, so parallel
    reads do not wait for the GIL."""
    import tensorflow as tf
    variant = tf.raw_ops.TFRecordDatasetV2(
        filenames=tf.reshape(path, [1]), compression_type="",
        buffer_size=length + (HEADER_BYTES + FOOTER_BYTES), byte_offsets=tf.reshape(offset, [1]))
    frames = tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string))
    missing = tf.data.Dataset.from_tensors(tf.constant(b""))   # in place of a bad frame
    rec = frames.take(1).ignore_errors().concatenate(missing).take(1).get_single_element()
    intact = tf.equal(tf.cast(tf.strings.length(rec), tf.int64), tf.cast(length, tf.int64))
    check = tf.debugging.Assert(intact, ["corrupt or truncated TFRecord shard", path,
                                         ": no intact record of", length, "bytes at byte",
                                         offset, "(the shard changed after it was indexed?)"])
    with tf.control_dependencies([check]):
        return tf.identity(rec)


def read_all_records(index: RecordIndex) -> Iterator[tuple[int, Any]]:
    """Every indexed record, shard by shard: yields ``(first_row, records)``, ``records`` a
    string tensor ``[n]`` of rows ``first_row .. first_row + n - 1`` (for holding a small set
    in memory). Each shard is read once from its start (both CRCs checked), as many records
    as the index lists for it; a record whose length differs from the index's, or a shard
    that ends early, fails with a DataError naming the shard."""
    import tensorflow as tf
    counts = np.bincount(index.file_index, minlength=len(index.files))
    first = 0
    for path, count in zip(index.files, counts):
        if not count:
            continue
        ds = tf.data.TFRecordDataset(path, buffer_size=1 << 22).take(int(count))
        try:
            recs = ds.batch(int(count)).get_single_element()
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            raise DataError(f"corrupt or truncated TFRecord shard {path} "
                            f"({err.message.strip()})") from None
        got = tf.strings.length(recs).numpy().astype(np.int64)
        want = None if index.length is None else index.length[first:first + count]
        if got.shape[0] != count or (want is not None and not np.array_equal(got, want)):
            raise DataError(f"{path}: its records differ from its index (the shard changed "
                            "after it was indexed?)")
        yield first, recs
        first += int(count)
