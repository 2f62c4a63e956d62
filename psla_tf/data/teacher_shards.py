"""Write a teacher's scores into training shards (``tools/add_teacher_scores.py``, issue 19).

Each input shard is copied record by record to ``{prefix}-i-of-n`` with the ``teacher`` float
feature added (:data:`psla_tf.data.records.TEACHER_FEATURE`: the clip's raw teacher values, in
the teacher's class order; no feature when no score file lists the clip). The record index
(``{prefix}.index.npz``, for the i.i.d. order) and the manifest (with a ``teacher`` entry)
follow; every file is written to a temp name and renamed (:mod:`psla_tf.data.shard_copy`,
shared with label enhancement).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from psla_tf.data import records, shard_copy
from psla_tf.data.records import DataError, Manifest

__all__ = ["add_teacher_scores", "set_teacher"]


def set_teacher(ex, lookup: Callable[[str], np.ndarray | None]) -> bool:
    """Give the ``tf.train.Example`` ``ex`` ``lookup(id)`` as its teacher feature, in place
    (any old one replaced; none when None); True if it got one."""
    feat = ex.features.feature
    row = lookup(feat["id"].bytes_list.value[0].decode("utf-8"))
    if records.TEACHER_FEATURE in feat:
        del feat[records.TEACHER_FEATURE]
    if row is not None:
        feat[records.TEACHER_FEATURE].float_list.value.extend(np.asarray(row).tolist())
    return row is not None


def add_teacher_scores(data: str, score_files: Sequence[str], prefix: str,
                       progress: bool = True) -> Manifest:
    """Copy the shards ``data`` to ``prefix`` with the averaged teacher of ``score_files``;
    returns the written manifest."""
    from psla_tf.data import teacher as tlib
    spec = records.load_data_spec(data)
    table = tlib.load_teacher(score_files)
    if table.mids is not None and not set(table.mids) & set(spec.mids):
        raise DataError("the teacher scores none of the data's classes (no common mid)")
    if table.mids is None and table.num_classes != spec.num_classes:
        raise DataError(f"the teacher scores {table.num_classes} classes, the data has "
                        f"{spec.num_classes}, and the score file names no mids")
    row_of = {i: k for k, i in enumerate(table.ids)}
    missing: list[str] = []
    found = [0]

    def lookup(cid: str) -> np.ndarray | None:
        k = row_of.get(cid)
        if k is None:
            missing.append(cid)
            return None
        return table.values[k]

    def edit(ex) -> None:
        found[0] += int(set_teacher(ex, lookup))

    shards = shard_copy.copy_shards(spec, prefix, edit, "adding teacher scores", progress)
    teacher = {
        "kind": table.kind, "classes": table.num_classes, "mids": table.mids,
        "with_teacher": found[0], "without_teacher": len(missing),
        "missing_examples": missing[:5], "sources": table.sources, "source_data": data}
    return shard_copy.write_copy_manifest(spec, prefix, shards, spec.class_counts,
                                          {"teacher": teacher})
