"""The paper's class-level analyses of score files (``tools/evaluate.py`` options).

* **Another vocabulary** (Table IX): an AudioSet model's scores on a set labelled in another
  vocabulary (ESC-50's 50 classes, FSD50K's 200) through a class map. A target class mapped
  to several source classes scores the maximum of their scores (the event is there if any of
  them is). Metrics cover the mapped classes on the clips that carry at least one mapped label
  (the paper: the 1,600 ESC-50 clips of the 40 classes that overlap AudioSet); unmapped
  classes are listed.
* **Correlation of class-wise APs between models** (Sec. VII-B: "over 0.95" between
  architectures): Pearson (and Spearman) over the classes with an AP in both.
* **Class AP against class properties** (Table VII: training sample count, the AudioSet
  authors' annotation quality estimate): Pearson (and Spearman) per property.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np
from scipy import stats

from psla_tf.data.records import DataError
from psla_tf.prediction import Predictions

__all__ = ["ClassMap", "build_class_map", "read_target_labels", "apply_class_map",
           "ap_correlation", "read_class_info", "property_correlations"]


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


@dataclasses.dataclass
class ClassMap:
    """Target class t ← source classes ``sources[t]`` (empty: unmapped)."""
    target_mids: list[str]
    target_names: list[str]
    sources: list[list[int]]

    @property
    def mapped(self) -> list[int]:
        return [t for t, s in enumerate(self.sources) if s]

    @property
    def unmapped(self) -> list[int]:
        return [t for t, s in enumerate(self.sources) if not s]


def build_class_map(spec: str, source: tuple[Sequence[str], Sequence[str]],
                    target: tuple[Sequence[str], Sequence[str]]) -> ClassMap:
    """``spec``: ``mid`` (same MID; FSD50K's classes are AudioSet MIDs), ``name`` (same
    display name, case and spacing ignored) or a CSV with columns ``target,source`` whose
    cells are MIDs or display names (several rows per target allowed)."""
    s_mids, s_names = list(source[0]), list(source[1])
    t_mids, t_names = list(target[0]), list(target[1])
    s_by_mid = {m: i for i, m in enumerate(s_mids)}
    s_by_name: dict[str, list[int]] = {}
    for i, n in enumerate(s_names):
        s_by_name.setdefault(_norm(n), []).append(i)
    sources: list[list[int]] = [[] for _ in t_mids]
    if spec == "mid":
        for t, m in enumerate(t_mids):
            if m in s_by_mid:
                sources[t] = [s_by_mid[m]]
    elif spec == "name":
        for t, n in enumerate(t_names):
            sources[t] = list(s_by_name.get(_norm(n), []))
    else:
        if not os.path.exists(spec):
            raise DataError(f"--class_map {spec!r}: not 'mid', 'name' or an existing CSV")
        t_by_mid = {m: i for i, m in enumerate(t_mids)}
        t_by_name = {_norm(n): i for i, n in enumerate(t_names)}
        with open(spec, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"target", "source"} <= set(reader.fieldnames):
                raise DataError(f"{spec}: expected columns target,source (MIDs or display "
                                f"names), got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                tk, sk = row["target"].strip(), row["source"].strip()
                t = t_by_mid.get(tk, t_by_name.get(_norm(tk)))
                if t is None:
                    raise DataError(f"{spec}, line {line}: target class {tk!r} is not in the "
                                    "evaluated set's vocabulary")
                found = [s_by_mid[sk]] if sk in s_by_mid else s_by_name.get(_norm(sk), [])
                if not found:
                    raise DataError(f"{spec}, line {line}: source class {sk!r} is not in the "
                                    "model's class map")
                sources[t] = sorted(set(sources[t]) | set(found))
    cmap = ClassMap(t_mids, t_names, sources)
    if not cmap.mapped:
        raise DataError(f"--class_map={spec}: no class of the evaluated set maps to the "
                        "model's classes")
    return cmap


def read_target_labels(data: str, label_csv: str | None = None
                       ) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(ids, multi-hot [N, T], mids, names) of the evaluated set: TFRecord shards (their
    manifest's vocabulary) or a listing (datafile / CSV / folder; vocabulary from
    ``label_csv``, else the labels seen, sorted)."""
    from psla_tf.prediction import is_record_glob
    if is_record_glob(data):
        import tensorflow as tf
        from psla_tf.data import records
        spec = records.load_data_spec(data)
        feats = {"id": records.FEATURE_SPEC["id"], "labels": records.FEATURE_SPEC["labels"]}
        ds = tf.data.TFRecordDataset(spec.files, compression_type=spec.compression or None)
        ds = ds.map(lambda r: tf.io.parse_single_example(r, feats))
        ids, hot = [], []
        for ex in ds.as_numpy_iterator():
            ids.append(ex["id"].decode("utf-8"))
            row = np.zeros(spec.num_classes, np.float32)
            labels = ex["labels"]  # a SparseTensorValue, or (TF ≥ 2.20) its dense values
            row[np.asarray(getattr(labels, "values", labels), np.int64)] = 1.0
            hot.append(row)
        y = np.stack(hot) if hot else np.zeros((0, spec.num_classes), np.float32)
        return ids, y, list(spec.mids), list(spec.names)
    from psla_tf.data import sources
    if not os.path.exists(data):
        raise DataError(f"--target_data {data!r}: neither TFRecord shards nor a listing")
    rows = sources.read_rows(data)
    mids, names = sources.build_vocabulary(rows, label_csv)
    sources.check_rows(rows, mids, data)
    index = {m: i for i, m in enumerate(mids)}
    y = np.zeros((len(rows), len(mids)), np.float32)
    for i, r in enumerate(rows):
        y[i, [index[m] for m in r.mids]] = 1.0
    return [r.id for r in rows], y, list(mids), list(names)


def apply_class_map(pred: Predictions, cmap: ClassMap, target_ids: Sequence[str],
                    target_y: np.ndarray) -> tuple[Predictions, dict[str, Any]]:
    """Scores of the mapped target classes (max over their source classes) with the target
    labels, on the scored clips that carry a mapped label; and what was left out."""
    pos = {c: i for i, c in enumerate(pred.ids)}
    missing = [c for c in target_ids if c not in pos]
    mapped = cmap.mapped
    y = np.asarray(target_y, np.float32)
    keep = [i for i, c in enumerate(target_ids) if c in pos and y[i, mapped].max(initial=0) > 0]
    if not keep:
        raise DataError("no scored clip of the evaluated set carries a mapped label (do the "
                        "score file's ids match the set's?)")
    rows = np.array([pos[target_ids[i]] for i in keep])
    scores = np.stack([pred.scores[rows][:, cmap.sources[t]].max(axis=1) for t in mapped], 1)
    out = Predictions([target_ids[i] for i in keep], scores.astype(np.float32),
                      y[keep][:, mapped], [cmap.target_mids[t] for t in mapped],
                      [cmap.target_names[t] for t in mapped])
    info = {
        "mapped": [{"mid": cmap.target_mids[t], "name": cmap.target_names[t],
                    "sources": [{"mid": pred.mids[s] if pred.mids else str(s),
                                 "name": pred.names[s] if pred.names else str(s)}
                                for s in cmap.sources[t]]} for t in mapped],
        "unmapped": [{"mid": cmap.target_mids[t], "name": cmap.target_names[t]}
                     for t in cmap.unmapped],
        "clips_evaluated": len(keep),
        "clips_without_mapped_label": int(len(target_ids) - len(keep) - len(missing)),
        "clips_without_scores": len(missing),
    }
    return out, info


def ap_correlation(ap_a: np.ndarray, ap_b: np.ndarray) -> dict[str, Any]:
    """Pearson and Spearman correlation of two class-wise AP vectors (classes with an AP in
    both; Sec. VII-B)."""
    a, b = np.asarray(ap_a, float), np.asarray(ap_b, float)
    if a.shape != b.shape:
        raise DataError(f"class-wise APs of different sizes: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        raise DataError("fewer than 3 classes with an AP in both: no correlation")
    r, p = stats.pearsonr(a[ok], b[ok])
    rho, p_rho = stats.spearmanr(a[ok], b[ok])
    return {"pearson": float(r), "pearson_p": float(p), "spearman": float(rho),
            "spearman_p": float(p_rho), "classes": int(ok.sum())}


def read_class_info(path: str, mids: Sequence[str], names: Sequence[str]
                    ) -> dict[str, np.ndarray]:
    """Numeric per-class columns of a CSV → {column: float [C]} (NaN where a class is absent).

    Rows name their class by ``mid`` / ``label_id`` (AudioSet's qa_true_counts.csv), ``index``
    or ``name`` / ``display_name``. ``num_rated`` + ``num_true`` (AudioSet's quality estimate)
    add ``quality`` = num_true / num_rated.
    """
    if not os.path.exists(path):
        raise DataError(f"--class_info {path!r} not found")
    by_mid = {m: i for i, m in enumerate(mids)}
    by_name = {_norm(n): i for i, n in enumerate(names)}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        key = next((c for c in ("mid", "label_id", "index", "name", "display_name")
                    if c in cols), None)
        if key is None:
            raise DataError(f"{path}: needs a mid, label_id, index, name or display_name "
                            f"column, got {cols}")
        values: dict[str, np.ndarray] = {}
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            k = row[key]
            c = (int(k) if key == "index" and k.isdigit() else
                 by_mid.get(k) if key in ("mid", "label_id") else by_name.get(_norm(k)))
            if c is None or not 0 <= c < len(mids):
                continue   # a class the scores do not have
            for col, v in row.items():
                if col == key:
                    continue
                try:
                    x = float(v)
                except ValueError:
                    continue
                values.setdefault(col, np.full(len(mids), np.nan))[c] = x
    if "num_rated" in values and "num_true" in values:
        with np.errstate(invalid="ignore", divide="ignore"):
            values["quality"] = values["num_true"] / values["num_rated"]
    if not values:
        raise DataError(f"{path}: no numeric column for the scores' classes")
    return values


def property_correlations(ap: np.ndarray, props: dict[str, np.ndarray]) -> dict[str, Any]:
    """Table VII: correlation of class-wise AP with each per-class property."""
    out = {}
    for name, v in props.items():
        a = np.asarray(ap, float)
        ok = np.isfinite(a) & np.isfinite(v)
        if ok.sum() < 3 or np.ptp(v[ok]) == 0:
            continue
        r, p = stats.pearsonr(a[ok], v[ok])
        rho, p_rho = stats.spearmanr(a[ok], v[ok])
        out[name] = {"pearson": float(r), "pearson_p": float(p), "spearman": float(rho),
                     "spearman_p": float(p_rho), "classes": int(ok.sum())}
    return out
