"""Reproducible train / validation / test splits of a clip listing (paper Sec. IV data sets).

* Stratified split (``split_rows``): each clip gets one stratum, its *rarest* label (the label
  with the fewest clips in the whole listing; ties broken by MID; no labels → its own
  stratum). Multi-label iterative stratification balances every label jointly, but for the
  small custom sets this tool targets stratifying on the rarest label already guarantees that
  every rare class reaches every split when it can, and it composes simply with groups. Within
  a stratum the units (clips, or groups of clips) are shuffled with ``seed`` and each goes to
  the split whose remaining quota (fraction × stratum size − assigned) is largest, so every
  stratum is divided in the requested proportions up to one unit.
* Groups (``group_regex``): clips whose file names give the same regex match (group 1 if the
  regex has a group) are one unit and never split (e.g. FSDD speakers). A group's stratum is
  the rarest label among all its clips.
* Folds (``fold_split``): ESC-50 style — rows whose fold column equals ``test_fold`` are the
  test set, the rest train.

Splits are written in the listing's own format (``write_split``) so make_tfrecords reads them.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import re
from typing import Sequence

import numpy as np

from psla_tf.data.records import DataError
from psla_tf.data.sources import Row

SPLIT_NAMES = ("train", "val", "test")


def row_groups(rows: Sequence[Row], group_regex: str | None) -> list[str]:
    """Group key of each row: regex match on the file name (group 1 if any), else the id."""
    if not group_regex:
        return [r.id for r in rows]
    try:
        rx = re.compile(group_regex)
    except re.error as e:
        raise DataError(f"bad --group_regex {group_regex!r}: {e}") from None
    keys = []
    for r in rows:
        name = os.path.basename(r.id)
        m = rx.search(name)
        if not m:
            raise DataError(f"--group_regex {group_regex!r} does not match {name!r} "
                            f"(line {r.line})")
        keys.append(m.group(1) if rx.groups else m.group(0))
    return keys


def split_rows(rows: Sequence[Row], val_fraction: float = 0.1, test_fraction: float = 0.1,
               seed: int = 0, group_regex: str | None = None) -> dict[str, list[Row]]:
    """Stratified (rarest label), optionally grouped, reproducible split → {train, val, test}.

    Input order is kept inside each split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise DataError("--val_fraction and --test_fraction must be >= 0 with a sum below 1")
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    label_count = collections.Counter(m for r in rows for m in set(r.mids))
    groups = row_groups(rows, group_regex)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)

    def rarest(idx: list[int]) -> str:
        labels = {m for i in idx for m in rows[i].mids}
        if not labels:
            return ""
        return min(labels, key=lambda m: (label_count[m], m))

    strata: dict[str, list[str]] = {}
    for g in sorted(members):  # sorted: independent of input order
        strata.setdefault(rarest(members[g]), []).append(g)
    rng = np.random.default_rng(seed)
    assign: dict[str, int] = {}
    for key in sorted(strata):
        units = list(strata[key])
        rng.shuffle(units)
        total = sum(len(members[g]) for g in units)
        got = np.zeros(3)
        for g in units:
            deficit = fractions * total - got
            k = int(np.argmax(deficit))  # first max: train wins ties
            assign[g] = k
            got[k] += len(members[g])
    out = {name: [] for name in SPLIT_NAMES}
    for r, g in zip(rows, groups):
        out[SPLIT_NAMES[assign[g]]].append(r)
    return out


def fold_split(rows: Sequence[Row], fold_column: str, test_fold: str) -> dict[str, list[Row]]:
    """k-fold split by a CSV column: fold == test_fold → test, others → train."""
    out = {"train": [], "val": [], "test": []}
    for r in rows:
        if not isinstance(r.record, dict) or fold_column not in r.record:
            raise DataError(f"--fold_column {fold_column!r} is not a column of the input "
                            "(needs a plain CSV with that column)")
        fold = str(r.record[fold_column]).strip()
        out["test" if fold == str(test_fold).strip() else "train"].append(r)
    if not out["test"]:
        raise DataError(f"no row has {fold_column} == {test_fold!r}")
    return out


def make_splits(rows: Sequence[Row], val_fraction: float = 0.0, test_fraction: float = 0.0,
                seed: int = 0, group_regex: str | None = None, fold_column: str | None = None,
                test_fold: str | None = None) -> dict[str, list[Row]]:
    """The split the tools' flags ask for: by ``fold_column``/``test_fold`` (k-fold), else
    stratified (and grouped) by fractions. Empty splits are dropped."""
    if fold_column or test_fold is not None:
        if not fold_column or test_fold is None:
            raise DataError("--fold_column and --test_fold go together")
        parts = fold_split(rows, fold_column, test_fold)
    else:
        parts = split_rows(rows, val_fraction, test_fraction, seed, group_regex)
    if not parts["train"]:
        raise DataError("the split leaves no training clips")
    return {k: v for k, v in parts.items() if v}


def write_split(rows: Sequence[Row], fmt: str, path: str, input_path: str,
                header: Sequence[str] | None = None) -> None:
    """Write ``rows`` in the input's format (datafile JSON, AudioSet CSV, plain CSV; folder
    listings become a plain CSV ``path,labels``). Relative audio paths are rewritten relative
    to ``path``'s folder so they still resolve."""
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"

    def rel(r: Row) -> str:
        return os.path.relpath(os.path.abspath(r.path), out_dir)

    if fmt == "datafile":
        data = []
        for r in rows:
            e = dict(r.record)
            if not os.path.isabs(str(e["wav"])):
                e["wav"] = rel(r)
            data.append(e)
        with open(tmp, "w") as f:
            json.dump({"data": data}, f, indent=1)
    elif fmt == "audioset":
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["YTID", "start_seconds", "end_seconds", "positive_labels"])
            for r in rows:
                w.writerow(r.record)
    elif fmt == "csv":
        from psla_tf.data.sources import PATH_COLUMNS, _pick
        pcol = _pick(header or [], PATH_COLUMNS)
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(header or []))
            w.writeheader()
            for r in rows:
                rec = dict(r.record)
                if not os.path.isabs(rec[pcol].strip()):
                    rec[pcol] = rel(r)
                w.writerow(rec)
    elif fmt == "folder":
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "labels"])
            for r in rows:
                w.writerow([rel(r), ",".join(r.mids)])
    else:
        raise DataError(f"cannot write format {fmt!r}")
    os.replace(tmp, path)
