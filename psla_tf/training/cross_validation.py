"""k-fold cross-validation over a fold column (ESC-50's five folds; the reference's ESC-50
recipe trains on four folds and tests on the fifth, in turn, and reports the mean accuracy).

:func:`cross_validate` prepares each fold's clips once into ``{data_dir}/fold_{k}`` (shared
vocabulary; each fold's manifest carries its own fbank statistics, and the trainer pools the
training folds' statistics exactly), runs one ordinary training job per fold in
``{exp_dir}/fold_{k}`` (train = the other folds' shards, eval = fold k) and writes
``{exp_dir}/cv_summary.json`` with per-fold results and mean ± std (population std over
folds) of the chosen metric and of mAP. Finished folds (their ``summary.json`` exists) are
not trained again, so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from psla_tf.data.records import DataError

__all__ = ["fold_values", "cross_validate", "aggregate", "report"]

CV_SUMMARY = "cv_summary.json"


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def fold_values(rows, fold_column: str) -> list[str]:
    """The fold of each row (stripped strings); DataError if the column is missing/empty."""
    out = []
    for r in rows:
        if not isinstance(r.record, dict) or fold_column not in r.record:
            raise DataError(f"--fold_column {fold_column!r} is not a column of the input")
        v = str(r.record[fold_column] or "").strip()
        if not v:
            raise DataError(f"line {r.line}: empty {fold_column!r}")
        out.append(v)
    return out


def aggregate(per_fold: dict[str, dict[str, Any]], metric_key: str) -> dict[str, Any]:
    """Mean and population std over folds of ``metric_key`` and mAP of each result row."""
    out: dict[str, Any] = {}
    for row in ("single", "weight_averaging", "ensemble"):
        vals = {k: s[row] for k, s in per_fold.items() if s.get(row)}
        if len(vals) != len(per_fold) or not vals:
            continue
        out[row] = {}
        for key in dict.fromkeys([metric_key, "mAP"]):
            v = np.array([r[key] for r in vals.values() if key in r], np.float64)
            if len(v) == len(vals):
                out[row][key] = {"mean": float(v.mean()), "std": float(v.std()),
                                 "per_fold": {k: float(r[key]) for k, r in vals.items()}}
    return out


def cross_validate(cfg, input_csv: str, fold_column: str = "fold",
                   folds: Sequence[str] | None = None, data_dir: str | None = None,
                   audio_root: str | None = None, label_csv: str | None = None,
                   workers: int = 1, max_seconds: float = 10.0,
                   target_length: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Prepare the folds, train/evaluate each (see the module doc); returns the CV summary."""
    import keras

    from psla_tf.data import prepare, sources
    from psla_tf.training import trainer
    from psla_tf.training.callbacks import write_json_atomic

    if not cfg.exp_dir:
        raise DataError("--exp_dir is required")
    import dataclasses
    # flag errors (e.g. --freeze_backbone_epochs without --init_from) before any preparation
    trainer.check_config(dataclasses.replace(cfg, train_data="<folds>", eval_data="<fold>"))
    data_dir = data_dir or os.path.join(cfg.exp_dir, "data")
    if not os.path.isfile(input_csv):
        raise DataError(f"--input {input_csv}: not found (a CSV with a fold column)")
    rows, _ = sources.read_plain_csv(input_csv, audio_root)
    fold_of = fold_values(rows, fold_column)
    all_folds = sorted(set(fold_of), key=_natural)
    if len(all_folds) < 2:
        raise DataError(f"--fold_column {fold_column!r} has {len(all_folds)} distinct value(s); "
                        "cross-validation needs at least 2 folds")
    run_folds = [str(f).strip() for f in (folds or all_folds)]
    unknown = [f for f in run_folds if f not in all_folds]
    if unknown:
        raise DataError(f"--folds {unknown} not among the folds {all_folds}")
    mids, names, where = sources.output_vocabulary(rows, label_csv, data_dir)
    sources.check_rows(rows, mids, input_csv)
    print(where, flush=True)
    prefixes = {}
    for k in all_folds:  # finished shards are kept (prepare resumes)
        part = [r for r, f in zip(rows, fold_of) if f == k]
        prefixes[k] = os.path.join(data_dir, f"fold_{k}")
        m = prepare.prepare(part, (mids, names), prefixes[k], workers=workers,
                            max_seconds=max_seconds, target_length=target_length or
                            cfg.target_length, progress=progress)
        print(f"fold {k}: " + prepare.summary_line(m), flush=True)
    per_fold: dict[str, dict[str, Any]] = {}
    for k in run_folds:
        exp_k = os.path.join(cfg.exp_dir, f"fold_{k}")
        summary_path = os.path.join(exp_k, "summary.json")
        if os.path.exists(summary_path) and not cfg.dry_run:
            with open(summary_path) as f:
                per_fold[k] = json.load(f)
            print(f"fold {k}: finished earlier ({summary_path})", flush=True)
            continue
        train_glob = ",".join(f"{prefixes[j]}-*.tfrecord*" for j in all_folds if j != k)
        cfg_k = dataclasses.replace(cfg, train_data=train_glob,
                                    eval_data=f"{prefixes[k]}-*.tfrecord*", exp_dir=exp_k)
        print(f"=== fold {k}: train on folds {', '.join(j for j in all_folds if j != k)}, "
              f"evaluate on fold {k} → {exp_k}", flush=True)
        summary = trainer.run(cfg_k)
        keras.backend.clear_session()
        if summary is not None:
            per_fold[k] = summary
    if cfg.dry_run:
        return {}
    metric_key = trainer.METRIC_KEYS[cfg.metric]
    result = {"metric": cfg.metric, "fold_column": fold_column, "folds": run_folds,
              "input": os.path.abspath(input_csv), "data_dir": os.path.abspath(data_dir),
              "aggregate": aggregate(per_fold, metric_key),
              "complete": run_folds == all_folds}
    write_json_atomic(os.path.join(cfg.exp_dir, CV_SUMMARY), result)
    return result


def report(result: dict[str, Any]) -> str:
    """Human-readable mean ± std table of a :func:`cross_validate` result."""
    if not result:
        return "dry run: nothing trained"
    key = "accuracy" if result["metric"] == "accuracy" else "mAP"
    lines = [f"{len(result['folds'])}-fold cross-validation ({result['fold_column']}: "
             f"{', '.join(result['folds'])})"
             + ("" if result.get("complete", True) else " — not all folds of the input")]
    for row, name in (("single", "single"), ("weight_averaging", "weight averaging"),
                      ("ensemble", "checkpoint ensemble")):
        r = result["aggregate"].get(row)
        if not r:
            continue
        parts = [f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in r.items()]
        folds = " ".join(f"{v:.3f}" for v in r[key]["per_fold"].values()) if key in r else ""
        lines.append(f"  {name:20s} " + ", ".join(parts) + (f"   per fold: {folds}"
                                                              if folds else ""))
    return "\n".join(lines)
