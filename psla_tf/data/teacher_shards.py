"""Write a teacher's scores into training shards (``tools/add_teacher_scores.py``, issue 19).

Each input shard is copied record by record to ``{prefix}-i-of-n`` with the ``teacher``
float feature added (:data:`psla_tf.data.records.TEACHER_FEATURE`: the clip's raw teacher
values, in the teacher's class order; no feature when no score file lists the clip). The
record index (``{prefix}.index.npz``, for the i.i.d. order) and the manifest (with a
``teacher`` entry) follow; every file is written to a temp name and renamed.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import numpy as np

from psla_tf.data import records
from psla_tf.data.records import DataError, Manifest

__all__ = ["add_teacher_scores", "with_teacher"]


def with_teacher(raw: bytes, lookup: Callable[[str], np.ndarray | None]
                 ) -> tuple[bytes, bool, list[int]]:
    """(new serialised record, has a teacher row, labels): the record with
    ``lookup(id)`` as its teacher feature (any old one replaced; none when None)."""
    import tensorflow as tf
    ex = tf.train.Example.FromString(raw)
    feat = ex.features.feature
    row = lookup(feat["id"].bytes_list.value[0].decode("utf-8"))
    if records.TEACHER_FEATURE in feat:
        del feat[records.TEACHER_FEATURE]
    if row is not None:
        feat[records.TEACHER_FEATURE].float_list.value.extend(np.asarray(row).tolist())
    return ex.SerializeToString(), row is not None, [int(x) for x in
                                                      feat["labels"].int64_list.value]


def add_teacher_scores(data: str, score_files: Sequence[str], prefix: str,
                       progress: bool = True) -> Manifest:
    """Copy the shards ``data`` to ``prefix`` with the averaged teacher of ``score_files``;
    returns the written manifest."""
    import tensorflow as tf
    from tqdm import tqdm
    from psla_tf.data import record_index
    from psla_tf.data import teacher as tlib
    spec = records.load_data_spec(data)
    table = tlib.load_teacher(score_files)
    if table.mids is not None and not set(table.mids) & set(spec.mids):
        raise DataError("the teacher scores none of the data's classes (no common mid)")
    if table.mids is None and table.num_classes != spec.num_classes:
        raise DataError(f"the teacher scores {table.num_classes} classes, the data has "
                        f"{spec.num_classes}, and the score file names no mids")
    row_of = {i: k for k, i in enumerate(table.ids)}
    seen: list[str] = []

    def lookup(cid: str) -> np.ndarray | None:
        k = row_of.get(cid)
        if k is None:
            seen.append(cid)
            return None
        return table.values[k]

    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    options = tf.io.TFRecordOptions(compression_type=spec.compression or "")
    n = len(spec.files)
    shards, entries, found = [], [], 0
    missing = seen
    bar = tqdm(total=spec.num_examples, desc="adding teacher scores", unit="clip",
               disable=not progress, file=sys.stderr)
    for i, src in enumerate(spec.files):
        out = records.shard_name(prefix, i, n, spec.compression)
        if os.path.abspath(out) == os.path.abspath(src):
            raise DataError(f"--output would overwrite the input shard {src}; pick another "
                            "prefix")
        tmp = out + ".tmp"
        lengths, labels = [], []
        with tf.io.TFRecordWriter(tmp, options) as w:
            for raw in tf.data.TFRecordDataset([src], compression_type=spec.compression or None):
                rec, has, labs = with_teacher(raw.numpy(), lookup)
                found += int(has)
                w.write(rec)
                lengths.append(len(rec))
                labels.append(labs)
                bar.update(1)
        tf.io.gfile.rename(tmp, out, overwrite=True)
        shards.append({"file": os.path.basename(out), "num_examples": len(lengths)})
        if not spec.compression:
            entries.append(record_index.entry_from_records(
                os.path.basename(out), os.path.getsize(out), lengths, labels))
    bar.close()
    if entries:
        record_index.write_index(record_index.index_path(prefix), entries)
    fields = records.merged_manifest_fields(spec.manifests)
    extra = fields.pop("extra")
    extra["teacher"] = {
        "kind": table.kind, "classes": table.num_classes, "mids": table.mids,
        "with_teacher": found, "without_teacher": len(missing),
        "missing_examples": missing[:5], "sources": table.sources, "source_data": data}
    man = Manifest(num_examples=found + len(missing), shards=shards, mids=list(spec.mids),
                   names=list(spec.names), class_counts=[int(c) for c in spec.class_counts],
                   extra=extra, **fields)
    man.write(records.manifest_path(prefix))
    return man

