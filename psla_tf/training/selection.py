"""Which set chose what: the part of ``summary.json`` that shows no choice looked at the
eval (test) set.

The result rows and what fixes each:

* ``single`` — with ``--val_data`` the epoch with the best validation metric (``--metric``;
  the earliest on ties), reported on the eval set; without validation data the mean of the
  eval metrics of the last min(5, E) epochs (fixed by the flags, no selection);
* ``weight_averaging`` — the average of epochs ``wa_start``..``wa_end`` (fixed by the flags);
  its model is ``wa_model.keras``, the one a run folder exports;
* ``ensemble`` — the average of every epoch's scores (fixed);
* ``adapted`` (``--adapt_batchnorm``) — the weight-averaged model (else the last epoch's) with
  its BatchNorm statistics re-estimated on the scored set's own clips, no labels (fixed; its
  validation metrics come from the model adapted on the validation clips).

With validation data every row also carries its validation metrics (``val_mAP``,
``val_accuracy``) and :func:`chosen_row` picks the row with the best validation metric (ties:
weight averaging, then ensemble, then single) — the row a user deploys without looking at the
test set; its eval metrics are the summary's ``chosen`` entry. Without validation data nothing
is chosen (``chosen`` is None) and the table says so.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SUMMARY_KEYS = ("mAP", "AUC", "d_prime", "accuracy")
METRIC_KEYS = {"map": "mAP", "accuracy": "accuracy"}  # --metric → summary key

ROWS = ("single", "weight_averaging", "ensemble", "adapted")
ROW_NAMES = {"single": "single", "weight_averaging": "weight averaging",
             "ensemble": "checkpoint ensemble", "adapted": "adapted"}
# ties: the exported model first; the adapted model last (it needs the new domain's clips)
_TIE_ORDER = ("weight_averaging", "ensemble", "single", "adapted")


def val_fields(val_metrics: dict[str, float] | None) -> dict[str, float]:
    """``{val_mAP, val_accuracy}`` of a row's validation metrics (empty without them)."""
    if not val_metrics:
        return {}
    return {f"val_{k}": float(val_metrics[k]) for k in ("mAP", "accuracy") if k in val_metrics}


def chosen_row(summary: dict[str, Any], metric_key: str) -> str | None:
    """The row with the best validation ``metric_key`` (None without validation metrics)."""
    vals = {row: summary[row][f"val_{metric_key}"] for row in ROWS
            if summary.get(row) and f"val_{metric_key}" in summary[row]}
    if not vals:
        return None
    best = max(vals.values())
    return next(row for row in _TIE_ORDER if vals.get(row) == best)


def describe(cfg, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary['selection']``: the selecting set and what fixed each row (see module doc)."""
    has_val = bool(cfg.val_data)
    key = "accuracy" if cfg.metric == "accuracy" else "mAP"
    single = summary.get("single") or {}
    rows = {}
    if has_val and "epoch" in single:
        rows["single"] = f"epoch {single['epoch']}: best validation {key}"
    elif single.get("epochs"):
        e = single["epochs"]
        rows["single"] = f"mean of epochs {e[0]}-{e[-1]} (fixed, no selection)"
    wa = summary.get("weight_averaging")
    if wa:
        rows["weight_averaging"] = (f"average of epochs {wa['epochs'][0]}-{wa['epochs'][-1]} "
                                    "(fixed by --wa_start/--wa_end; wa_model.keras, exported)")
    ens = summary.get("ensemble")
    if ens:
        rows["ensemble"] = f"all {len(ens['epochs'])} epochs (fixed)"
    adapted = summary.get("adapted")
    if adapted:
        base = "weight averaging" if adapted["model"] == "weight_averaging" else "last epoch"
        rows["adapted"] = (f"{base}, BatchNorm statistics of the scored set's own clips "
                           "(no labels; adapted_model.keras)")
    chosen = chosen_row(summary, key) if has_val else None
    return {"set": "val" if has_val else None, "metric": key, "rows": rows,
            "chosen": chosen, "eval_used_for_choices": False}


def add_selection(cfg, summary: dict[str, Any]) -> dict[str, Any]:
    """Add ``selection`` and ``chosen`` (the chosen row's eval metrics) to ``summary``."""
    sel = describe(cfg, summary)
    summary["selection"] = sel
    row = sel["chosen"]
    summary["chosen"] = dict(summary[row], row=row) if row else None
    return summary


def selection_lines(summary: dict[str, Any]) -> list[str]:
    """Lines under the result table: which set chose, and the chosen row."""
    sel = summary.get("selection")
    if not sel:
        return []
    if sel["set"] is None:
        out = ["chosen on: nothing (no --val_data); every row is fixed by the flags, none "
               "looked at the eval set"]
    else:
        ch = summary.get("chosen") or {}
        row = sel["chosen"]
        out = [f"chosen on: the validation set (--val_data), {sel['metric']}; the eval set "
               "chose nothing"]
        if row:
            out.append(f"chosen row: {ROW_NAMES[row]} (val {sel['metric']} "
                       f"{ch.get('val_' + sel['metric'], float('nan')):.4f}) → eval "
                       f"{sel['metric']} {ch.get(sel['metric'], float('nan')):.4f}")
    out += [f"  {ROW_NAMES[k]}: {v}" for k, v in sel["rows"].items()]
    return out


def single_result(eval_history: list[dict], val_history: list[dict] | None,
                  metric: str = "map") -> dict:
    """'single' row of the summary (see the module doc); with validation data the epoch is
    selected on ``metric`` (map or accuracy)."""
    keys = [k for k in SUMMARY_KEYS if all(k in h for h in eval_history)]
    if val_history:
        key = METRIC_KEYS[metric]
        best = max(range(len(val_history)), key=lambda i: val_history[i][key])
        out = {k: float(eval_history[best][k]) for k in keys}
        out.update(epoch=int(eval_history[best]["epoch"]), selected_on="val")
        out[f"val_{key}"] = float(val_history[best][key])
        return out
    last = eval_history[-5:]
    out = {k: float(np.mean([h[k] for h in last])) for k in keys}
    out["epochs"] = [int(h["epoch"]) for h in last]
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """The result table main.py prints: a line per row of ``summary`` (accuracy first with
    ``--metric=accuracy``), then which set chose what and the data coverage."""
    acc = summary.get("metric") == "accuracy"
    out = [f"{'':22s} " + (f"{'accuracy':>8s} " if acc else "")
           + f"{'mAP':>8s} {'AUC':>8s} {'d-prime':>8s}"]
    for key in ROWS:
        r = summary.get(key)
        if r:
            out.append(f"{ROW_NAMES[key]:22s} "
                       + (f"{r.get('accuracy', float('nan')):8.4f} " if acc else "")
                       + f"{r['mAP']:8.4f} {r['AUC']:8.4f} {r['d_prime']:8.4f}")
    out += selection_lines(summary)
    cov = summary.get("coverage")
    if cov:
        out.append("coverage: " + "; ".join(f"{k} {v['written']} of {v['listed']} listed clips"
                                            for k, v in cov.items()))
    return "\n".join(out)
