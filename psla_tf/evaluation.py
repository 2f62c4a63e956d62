"""Evaluation reports of score files: mAP, mean AUC, d′ (Sec. II-B), the per-class table and
the sorted class-wise AP plot (the paper's Fig. 7).

With several score files of the same clips (runs with different seeds), the per-class AP is
the mean over runs with its standard deviation, as in Fig. 7; the summary gives every run's
metrics and their mean. Classes without a positive example have no AP (and classes without
positives or negatives no AUC): they are left out of the means and listed by MID and name.

Coverage: when the data behind the scores listed more clips than were scored (clips missing
from a download, undecodable files, prediction failures), the report states how many of how
many (``summary["coverage"]``, printed next to mAP by tools/evaluate.py): an mAP over 95 % of
a set is not the mAP of the set.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import numpy as np

from psla_tf import metrics
from psla_tf.data.records import DataError
from psla_tf.prediction import Predictions, members_agree

__all__ = ["evaluation_report", "write_report", "plot_sorted_ap", "coverage",
           "coverage_text"]


def coverage(evaluated: int, listed: int | None, written: int | None = None,
             source: str | None = None) -> dict[str, Any]:
    """How many of the listed clips the metrics cover.

    ``evaluated``: clips with scores; ``listed``: clips the input listing named (the
    manifests' ``listed``; None when unknown); ``written``: clips prepared into the shards
    (between the two: the rest failed to download/decode). ``fraction`` = evaluated / listed.
    """
    if listed is not None and int(listed) < int(evaluated):
        raise DataError(f"{evaluated} clips scored but only {listed} listed: the scores are "
                        "not of this data")
    out: dict[str, Any] = {"evaluated": int(evaluated),
                           "listed": None if listed is None else int(listed),
                           "fraction": (None if not listed else int(evaluated) / int(listed))}
    if written is not None:
        out["written"] = int(written)
    if source:
        out["source"] = source
    out["complete"] = listed is not None and int(evaluated) == int(listed)
    return out


def coverage_text(cov: dict[str, Any] | None) -> str:
    """``'on 498 of 500 listed clips (99.6 %)'`` — what follows mAP in a report."""
    if not cov:
        return ""
    if cov.get("listed") is None:
        return f"on {cov['evaluated']} clips (listed count unknown: pass --data or --listed)"
    text = (f"on {cov['evaluated']} of {cov['listed']} listed clips "
            f"({100.0 * cov['fraction']:.1f} %)")
    written = cov.get("written")
    if written is not None and written != cov["listed"]:
        text += f"; {cov['listed'] - written} listed clips were not found or failed to prepare"
    if written is not None and written != cov["evaluated"]:
        text += f"; {written - cov['evaluated']} prepared clips have no score"
    return text


def evaluation_report(preds: Sequence[Predictions], mids: Sequence[str], names: Sequence[str],
                      sources: Sequence[str] | None = None,
                      listed: int | None = None, written: int | None = None,
                      coverage_source: str | None = None) -> dict[str, Any]:
    """Metrics of one or more score files of the same labelled clips.

    Returns ``summary`` (JSON-ready; ``coverage`` = :func:`coverage` of the scored clips
    against ``listed``/``written`` when known; ``accuracy`` when every clip has exactly one
    label) and ``classes`` (per-class rows sorted by AP, classes without AP last).
    """
    sources = list(sources or [f"scores_{i}" for i in range(len(preds))])
    if not preds:
        raise DataError("no score files to evaluate")
    for p, s in zip(preds, sources):
        if p.targets is None:
            raise DataError(f"{s} has no targets (labels were unknown when it was predicted); "
                            "predict on labelled data to evaluate")
        if len(p.ids) == 0:
            raise DataError(f"{s} holds no clips")
    members_agree(preds, sources)
    c = preds[0].scores.shape[1]
    if len(mids) != c:
        raise DataError(f"the class map has {len(mids)} classes, the scores {c}")
    targets = preds[0].targets
    for p, s in zip(preds[1:], sources[1:]):
        if not np.array_equal(p.targets >= 0.5, targets >= 0.5):
            raise DataError(f"{s}: targets differ from {sources[0]}'s")
    runs = [metrics.evaluate(p.targets, p.scores) for p in preds]
    ap = np.stack([r["AP"] for r in runs])            # [R, C]
    auc = np.stack([r["AUC_per_class"] for r in runs])
    positives = (targets >= 0.5).sum(axis=0).astype(int)
    excluded_ap = runs[0]["excluded_ap"]
    excluded_auc = runs[0]["excluded_auc"]
    ap_mean = ap.mean(axis=0)
    ap_std = ap.std(axis=0) if len(runs) > 1 else None
    auc_mean = auc.mean(axis=0)
    rows = []
    for k in range(c):
        row = {"index": k, "mid": mids[k], "name": names[k], "positives": int(positives[k]),
               "AP": _num(ap_mean[k]), "AUC": _num(auc_mean[k])}
        if ap_std is not None:
            row["AP_std"] = _num(ap_std[k])
        rows.append(row)
    rows.sort(key=lambda r: (r["AP"] is None, -(r["AP"] or 0.0), r["index"]))

    def named(ix):
        return [{"index": int(k), "mid": mids[k], "name": names[k]} for k in ix]

    per_run = [dict(metrics.scalar_metrics(r), source=s) for r, s in zip(runs, sources)]
    summary = {
        "num_examples": int(targets.shape[0]),
        "num_classes": int(c),
        "num_classes_evaluated": int(c - len(excluded_ap)),
        "mAP": float(np.mean([r["mAP"] for r in per_run])),
        "AUC": float(np.mean([r["AUC"] for r in per_run])),
        "d_prime": float(np.mean([r["d_prime"] for r in per_run])),
        "excluded_from_mAP": named(excluded_ap),
        "excluded_from_AUC": named(excluded_auc),
        "runs": per_run,
    }
    if ((targets >= 0.5).sum(axis=1) == 1).all():   # single-label clips: accuracy too
        summary["accuracy"] = float(np.mean([metrics.accuracy(p.targets, p.scores)
                                             for p in preds]))
    summary["coverage"] = coverage(targets.shape[0], listed, written, coverage_source)
    if len(runs) > 1:
        summary["mAP_std"] = float(np.std([r["mAP"] for r in per_run]))
    return {"summary": summary, "classes": rows, "ap": ap_mean, "ap_std": ap_std}


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def plot_sorted_ap(ap: np.ndarray, ap_std: np.ndarray | None, names: Sequence[str], path: str,
                   label_extremes: int = 5, title: str | None = None) -> None:
    """Fig. 7: class-wise AP sorted in descending order (± std over runs when given); the
    best and worst ``label_extremes`` classes are named. Classes without AP are omitted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keep = np.flatnonzero(np.isfinite(ap))
    order = keep[np.argsort(-ap[keep], kind="stable")]
    y = ap[order]
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    ax.plot(x, y, color="tab:blue", lw=1.2, label="AP")
    if ap_std is not None:
        s = ap_std[order]
        ax.fill_between(x, y - s, y + s, color="tab:blue", alpha=0.25, lw=0,
                        label="± std over runs")
    for i in list(range(min(label_extremes, len(order)))) + list(
            range(max(label_extremes, len(order) - label_extremes), len(order))):
        ax.annotate(names[order[i]], (x[i], y[i]), fontsize=7, rotation=30,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"classes sorted by AP ({len(order)} with positives)")
    ax.set_ylabel("average precision")
    ax.set_ylim(0, 1.12)
    ax.set_xlim(-0.5, max(len(order) - 0.5, 0.5))
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Sorted class-wise AP (mAP {np.nanmean(ap):.4f})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], names: Sequence[str], out_dir: str) -> dict[str, str]:
    """``metrics.json``, ``classes.csv`` (sorted by AP), ``sorted_ap.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    files = {k: os.path.join(out_dir, v) for k, v in
             (("json", "metrics.json"), ("csv", "classes.csv"), ("png", "sorted_ap.png"))}
    tmp = files["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report["summary"], f, indent=1)
    os.replace(tmp, files["json"])
    cols = ["index", "mid", "name", "positives", "AP", "AUC"]
    if report["ap_std"] is not None:
        cols.insert(5, "AP_std")
    tmp = files["csv"] + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in report["classes"]:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    os.replace(tmp, files["csv"])
    plot_sorted_ap(report["ap"], report["ap_std"], names, files["png"])
    return files
