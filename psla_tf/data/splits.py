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
* Named groups and grouped fractions (``make_splits``): the group of a clip is its
  ``fold_column`` value (a CSV column: speaker, session, ESC-50 fold) or its ``group_regex``
  match; ``test_fold`` / ``val_fold`` name groups (comma-separated) that become the test /
  validation set, and ``test_fraction`` / ``val_fraction`` take whole groups, stratified as
  above, from the clips no named group took. The validation set is thus grouped like the test
  set: a model chosen on it has not heard the validation speakers either.

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


def column_groups(rows: Sequence[Row], column: str) -> list[str]:
    """The value of CSV column ``column`` of each row (stripped); DataError if it is missing
    or empty."""
    out = []
    for r in rows:
        if not isinstance(r.record, dict) or column not in r.record:
            raise DataError(f"--fold_column {column!r} is not a column of the input "
                            "(needs a plain CSV with that column)")
        v = str(r.record[column] or "").strip()
        if not v:
            raise DataError(f"line {r.line}: empty {column!r}")
        out.append(v)
    return out


def group_keys(rows: Sequence[Row], group_regex: str | None = None,
               fold_column: str | None = None) -> list[str]:
    """Group of each row: its ``fold_column`` value, its ``group_regex`` match, else its id."""
    if fold_column and group_regex:
        raise DataError("give --fold_column or --group_regex, not both (each defines the groups)")
    if fold_column:
        return column_groups(rows, fold_column)
    return row_groups(rows, group_regex)


def split_rows(rows: Sequence[Row], val_fraction: float = 0.1, test_fraction: float = 0.1,
               seed: int = 0, group_regex: str | None = None,
               groups: Sequence[str] | None = None) -> dict[str, list[Row]]:
    """Stratified (rarest label), optionally grouped, reproducible split → {train, val, test}.

    ``groups`` (one key per row) overrides ``group_regex``. Input order is kept inside each
    split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise DataError("--val_fraction and --test_fraction must be >= 0 with a sum below 1")
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    label_count = collections.Counter(m for r in rows for m in set(r.mids))
    groups = list(groups) if groups is not None else row_groups(rows, group_regex)
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


def _names(value: str | None) -> list[str]:
    """``--test_fold`` / ``--val_fold`` → group names (comma-separated, stripped)."""
    if value is None:
        return []
    return [v.strip() for v in str(value).split(",") if v.strip()]


def make_splits(rows: Sequence[Row], val_fraction: float = 0.0, test_fraction: float = 0.0,
                seed: int = 0, group_regex: str | None = None, fold_column: str | None = None,
                test_fold: str | None = None, val_fold: str | None = None
                ) -> dict[str, list[Row]]:
    """The split the tools' flags ask for (see the module doc). Groups: ``fold_column`` or
    ``group_regex``; ``test_fold`` / ``val_fold`` name groups (comma-separated) for test /
    validation; the fractions take whole groups from the clips no named group took (so with
    a named test fold ``val_fraction`` is a fraction of the remaining clips). Empty splits are
    dropped."""
    if fold_column and group_regex:
        raise DataError("give --fold_column or --group_regex, not both (each defines the groups)")
    test_names, val_names = _names(test_fold), _names(val_fold)
    if (test_fold is not None or val_fold is not None) and not (fold_column or group_regex):
        raise DataError("--test_fold/--val_fold name groups: give --fold_column (a CSV column) "
                        "or --group_regex (a part of the file name) too")
    if test_fold is not None and not test_names or val_fold is not None and not val_names:
        raise DataError("--test_fold/--val_fold must name at least one group")
    if test_names and test_fraction:
        raise DataError("give --test_fold or --test_fraction, not both")
    if val_names and val_fraction:
        raise DataError("give --val_fold or --val_fraction, not both")
    both = sorted(set(test_names) & set(val_names))
    if both:
        raise DataError(f"{', '.join(both)} named both as --test_fold and --val_fold")
    if fold_column and not (test_names or val_names or test_fraction or val_fraction):
        raise DataError("--fold_column needs --test_fold (and/or --val_fold, or a "
                        "--test_fraction/--val_fraction of whole groups)")
    keys = group_keys(rows, group_regex, fold_column)
    present = set(keys)
    what = fold_column or "the --group_regex group"
    for flag, names in (("--test_fold", test_names), ("--val_fold", val_names)):
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(f"{flag}: no row has {what} == {missing[0]!r} (groups: "
                            f"{', '.join(sorted(present)[:20])})")
    named = {**{n: "test" for n in test_names}, **{n: "val" for n in val_names}}
    rest = [i for i, k in enumerate(keys) if k not in named]
    part = split_rows([rows[i] for i in rest], val_fraction, test_fraction, seed,
                      groups=[keys[i] for i in rest])
    where = {}
    for name, got in part.items():
        for r in got:
            where[id(r)] = name
    out = {name: [] for name in SPLIT_NAMES}
    for r, k in zip(rows, keys):  # input order kept inside each split
        out[named.get(k) or where[id(r)]].append(r)
    if not out["train"]:
        raise DataError("the split leaves no training clips")
    return {k: v for k, v in out.items() if v}


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
