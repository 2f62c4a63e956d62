"""Copies of TFRecord shards with a feature of every record changed.

Two tools write such copies: label enhancement (paper Sec. V, ``tools/enhance_labels.py``)
replaces ``labels`` / ``mids`` (:func:`relabel_shards`); ``tools/add_teacher_scores.py`` sets
the ``teacher`` feature (:mod:`psla_tf.data.teacher_shards`). Both go through
:func:`copy_shards`: the shards of a :class:`~psla_tf.data.records.DataSpec` are copied record
by record, in order, to ``{prefix}-i-of-n`` (every feature the edit does not touch, the audio
included, byte-identical), the record index ``{prefix}.index.npz`` is written for uncompressed
shards (labels as they are after the edit), and :func:`write_copy_manifest` writes the
manifest with the input's fields. Every file goes to a temp name and is renamed.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Sequence

from psla_tf.data import records
from psla_tf.data.records import DataError, DataSpec, Manifest

__all__ = ["copy_shards", "write_copy_manifest", "record_labels", "relabel_shards"]


def copy_shards(spec: DataSpec, prefix: str, edit: Callable[[Any], None], desc: str,
                progress: bool = True) -> list[dict[str, Any]]:
    """Copy ``spec.files`` to ``{prefix}-i-of-n`` with ``edit(example)`` applied in place to
    each parsed ``tf.train.Example``; returns the manifest's ``shards`` entries."""
    import tensorflow as tf
    from tqdm import tqdm
    from psla_tf.data import record_index
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    options = tf.io.TFRecordOptions(compression_type=spec.compression or "")
    n = len(spec.files)
    shards, entries = [], []
    bar = tqdm(total=spec.num_examples, desc=desc, unit="clip", disable=not progress,
               file=sys.stderr)
    for i, src in enumerate(spec.files):
        out = records.shard_name(prefix, i, n, spec.compression)
        if os.path.abspath(out) == os.path.abspath(src):
            raise DataError(f"--output would overwrite the input shard {src}; pick another "
                            "prefix")
        tmp = out + ".tmp"
        lengths, labels = [], []
        with tf.io.TFRecordWriter(tmp, options) as w:
            for raw in tf.data.TFRecordDataset([src], compression_type=spec.compression or None):
                ex = tf.train.Example.FromString(raw.numpy())
                edit(ex)
                rec = ex.SerializeToString()
                w.write(rec)
                lengths.append(len(rec))
                labels.append([int(x) for x in ex.features.feature["labels"].int64_list.value])
                bar.update(1)
        tf.io.gfile.rename(tmp, out, overwrite=True)
        shards.append({"file": os.path.basename(out), "num_examples": len(lengths)})
        if not spec.compression:
            entries.append(record_index.entry_from_records(
                os.path.basename(out), os.path.getsize(out), lengths, labels))
    bar.close()
    if entries:
        record_index.write_index(record_index.index_path(prefix), entries)
    return shards


def write_copy_manifest(spec: DataSpec, prefix: str, shards: Sequence[Mapping[str, Any]],
                        class_counts: Sequence[int], extra: Mapping[str, Any]) -> Manifest:
    """Write ``{prefix}.manifest.json`` for a copy of ``spec``'s shards: the input manifests'
    fields (:func:`~psla_tf.data.records.merged_manifest_fields`), ``class_counts`` [C] of the
    copy, and ``extra`` entries added to the input's."""
    fields = records.merged_manifest_fields(spec.manifests)
    merged = fields.pop("extra")
    merged.update(extra)
    man = Manifest(num_examples=int(sum(s["num_examples"] for s in shards)),
                   shards=[dict(s) for s in shards], mids=list(spec.mids),
                   names=list(spec.names), class_counts=[int(c) for c in class_counts],
                   extra=merged, **fields)
    man.write(records.manifest_path(prefix))
    return man


def record_labels(spec: DataSpec) -> tuple[list[str], list[list[int]]]:
    """Every record's ``id`` and ``labels`` (class indices into ``spec.mids``), in file order."""
    import tensorflow as tf
    ids, labels = [], []
    for f in spec.files:
        for raw in tf.data.TFRecordDataset([f], compression_type=spec.compression or None):
            feat = tf.train.Example.FromString(raw.numpy()).features.feature
            ids.append(feat["id"].bytes_list.value[0].decode("utf-8"))
            labels.append([int(x) for x in feat["labels"].int64_list.value])
    return ids, labels


def relabel_shards(spec: DataSpec, new_labels: Sequence[Sequence[int]], prefix: str,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Copy ``spec``'s shards to ``prefix`` with ``labels`` / ``mids`` of record k replaced by
    ``new_labels[k]`` (class indices into ``spec.mids``; records in file order); returns the
    manifest's ``shards`` entries."""
    done = [0]

    def edit(ex) -> None:
        k = done[0]
        if k >= len(new_labels):
            raise DataError(f"shards changed while rewriting: more than the {len(new_labels)} "
                            "examples read before")
        lab = [int(x) for x in new_labels[k]]
        feat = ex.features.feature
        del feat["labels"].int64_list.value[:]
        feat["labels"].int64_list.value.extend(lab)
        del feat["mids"].bytes_list.value[:]
        feat["mids"].bytes_list.value.extend(spec.mids[j].encode("utf-8") for j in lab)
        done[0] += 1

    shards = copy_shards(spec, prefix, edit, "rewriting labels", progress)
    if done[0] != len(new_labels):
        raise DataError(f"shards changed while rewriting: read {done[0]} examples, expected "
                        f"{len(new_labels)}")
    return shards
