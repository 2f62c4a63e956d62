"""Leave-one-group-out cross-validation, nested (issue 16), and ESC-50-style k-fold.

A *group* is what must not leak between training and testing: an ESC-50 fold, a speaker, a
recording session. It is a CSV column (``fold_column``) or a part of the file name
(``group_regex``). :func:`cross_validate` prepares each group's clips once into
``{data_dir}/fold_{g}`` (shared vocabulary; each manifest carries its own fbank statistics,
and the trainer pools the training groups' statistics exactly) and, for every held-out test
group g, runs one ordinary training job in ``{exp_dir}/fold_{g}`` with eval = g.

* **Nested** (``val_groups=K`` or ``val_fraction=f``): the validation set is chosen among the
  other groups — the K groups after g in the sorted order of groups (wrapping round, so every
  group validates K times), or whole groups making up a fraction f of the remaining clips
  (:func:`psla_tf.data.splits.split_rows`, seeded) — and the rest train. Every choice is made on
  validation only: the 'single' row is the best-validation epoch, and the summary's
  ``chosen`` row is the result row (single / weight averaging / ensemble / adapted) with the
  best validation metric (:mod:`psla_tf.training.selection`). The held-out group is only scored.
* **Not nested** (both 0: the published ESC-50 protocol): train on all other groups; no result
  row is chosen by data (last-5-epoch mean, fixed weight-averaging window, all-epoch
  ensemble), and the test group is only scored too.

With ``--adapt_batchnorm`` every fold also reports the ``adapted`` row: its weight-averaged
model with BatchNorm statistics of the held-out group's own clips, no labels
(:mod:`psla_tf.models.adaptation`); not nested, that row is the headline.

Outputs in ``exp_dir``: ``cv_summary.json`` (per-fold plans and results, mean ± population std
over folds of each row's metric and mAP, the headline row's worst group), ``cv_table.md`` /
``cv_table.csv`` (one line per held-out group) and ``cv_plot.png`` (per-group bars, the mean
and ± std band). Finished folds (their ``summary.json`` exists, with the same plan) are not
trained again, so a killed run resumes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from psla_tf import atomic
from psla_tf import run_folder
from psla_tf.data.records import DataError

__all__ = ["fold_values", "fold_plans", "cross_validate", "aggregate", "headline_row",
           "group_table", "table_markdown", "table_csv", "plot", "report"]

CV_SUMMARY = "cv_summary.json"
PLAN_FILE = "cv_fold.json"
ROWS = ("single", "weight_averaging", "ensemble", "adapted", "chosen")
ROW_NAMES = {"single": "single", "weight_averaging": "weight averaging",
             "ensemble": "checkpoint ensemble", "adapted": "adapted to the group",
             "chosen": "chosen on validation"}


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def fold_values(rows, fold_column: str) -> list[str]:
    """The fold of each row (stripped strings); DataError if the column is missing/empty."""
    from psla_tf.data.splits import column_groups
    return column_groups(rows, fold_column)


def fold_plans(groups: Sequence[str], keys: Sequence[str] | None = None, rows=None,
               val_groups: int = 0, val_fraction: float = 0.0, seed: int = 0
               ) -> dict[str, dict[str, list[str]]]:
    """For every group g (natural order): ``{"test": [g], "val": [...], "train": [...]}``.

    ``val_groups=K``: the K groups after g in the order of ``groups`` (wrapping round).
    ``val_fraction=f``: whole groups of the other groups' clips (``rows`` with their group
    ``keys``), stratified and seeded as :func:`psla_tf.data.splits.split_rows`. Both 0: no
    validation. DataError when a plan would leave no validation or no training group.
    """
    from psla_tf.data.splits import split_rows
    groups = list(groups)
    n = len(groups)
    if val_groups < 0 or not 0 <= val_fraction < 1:
        raise DataError("--val_groups must be >= 0 and --val_fraction in [0, 1)")
    if val_groups and val_fraction:
        raise DataError("give --val_groups or --val_fraction, not both")
    if val_groups and n < val_groups + 2:
        raise DataError(f"--val_groups={val_groups} needs at least {val_groups + 2} groups "
                        f"(test + validation + training), the input has {n}")
    plans = {}
    for i, g in enumerate(groups):
        others = [h for h in groups if h != g]
        if val_groups:
            val = [groups[(i + j) % n] for j in range(1, val_groups + 1)]
        elif val_fraction:
            idx = [k for k, key in enumerate(keys) if key != g]
            part = split_rows([rows[k] for k in idx], val_fraction, 0.0, seed,
                              groups=[keys[k] for k in idx])
            got = {id(r) for r in part["val"]}
            vset = {keys[k] for k in idx if id(rows[k]) in got}
            val = [h for h in others if h in vset]
            if not val or len(val) == len(others):
                raise DataError(f"--val_fraction={val_fraction} gives {len(val)} of the "
                                f"{len(others)} other groups to validation when {g} is the "
                                "test group: choose a fraction that leaves at least one "
                                "group to validate and one to train, or --val_groups")
        else:
            val = []
        plans[g] = {"test": [g], "val": val, "train": [h for h in others if h not in val]}
    return plans


def aggregate(per_fold: dict[str, dict[str, Any]], metric_key: str) -> dict[str, Any]:
    """Mean and population std over folds of ``metric_key`` and mAP of each result row
    (``chosen`` included when every fold chose one)."""
    out: dict[str, Any] = {}
    for row in ROWS:
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


def headline_row(agg: dict[str, Any]) -> str | None:
    """The row a CV result is quoted by: the validation-chosen one when nested, else the
    model adapted to the held-out group (``--adapt_batchnorm``), else the exported
    weight-averaged model, else single."""
    return next((r for r in ("chosen", "adapted", "weight_averaging", "single") if r in agg),
                None)


def group_table(per_fold: dict[str, dict[str, Any]], plans: dict[str, dict[str, list[str]]],
                metric_key: str) -> list[dict[str, Any]]:
    """One dict per held-out group: its plan, clip count and every row's test metric."""
    table = []
    for g, s in per_fold.items():
        row = {"test_group": g, "val_groups": " ".join(plans[g]["val"]),
               "train_groups": " ".join(plans[g]["train"]),
               "test_clips": s.get("eval_examples")}
        for r in ROWS[:4]:
            if s.get(r) and metric_key in s[r]:
                row[r] = float(s[r][metric_key])
        single = s.get("single") or {}
        if "epoch" in single:
            row["single_epoch"] = int(single["epoch"])
        ch = s.get("chosen")
        if ch:
            row["chosen_row"] = ch["row"]
            row["chosen_val"] = float(ch.get(f"val_{metric_key}", float("nan")))
            row["chosen"] = float(ch[metric_key])
        table.append(row)
    return table


_COLUMNS = ("test_group", "test_clips", "val_groups", "train_groups", "single", "single_epoch",
            "weight_averaging", "ensemble", "adapted", "chosen_row", "chosen_val", "chosen")


def _columns(table: list[dict[str, Any]]) -> list[str]:
    return [c for c in _COLUMNS if any(r.get(c) not in (None, "") for r in table)]


def table_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(table), lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()
                    if k in w.fieldnames})
    return buf.getvalue()


def table_markdown(result: dict[str, Any]) -> str:
    """The per-group table, then mean ± std and the worst group of each row (markdown)."""
    table, key = result["table"], result["metric_key"]
    cols = _columns(table)
    head = {"test_group": "test group", "test_clips": "clips", "val_groups": "validation",
            "train_groups": "training", "single": f"single {key}", "single_epoch":
            "epoch (val)", "weight_averaging": f"WA {key}", "ensemble": f"ensemble {key}",
            "adapted": f"adapted {key}", "chosen_row": "chosen on val", "chosen_val": f"val {key}", "chosen":
            f"chosen {key}"}
    out = ["| " + " | ".join(head[c] for c in cols) + " |",
           "| " + " | ".join("---" for _ in cols) + " |"]
    for r in table:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else
                         ROW_NAMES.get(v, v) if c == "chosen_row" else str(v))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for row, r in result["aggregate"].items():
        if key in r:
            vals = r[key]["per_fold"]
            worst = min(vals, key=vals.get)
            out.append(f"- {ROW_NAMES[row]}: {key} {r[key]['mean']:.4f} ± {r[key]['std']:.4f} "
                       f"(worst group {worst}: {vals[worst]:.4f})")
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Per-group bars of each row's metric, with the headline row's mean and ± std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, agg = result["metric_key"], result["aggregate"]
    rows = [r for r in ROWS if r in agg and key in agg[r]]
    groups = list(result["folds"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 3.6))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(groups))
    for j, row in enumerate(rows):
        vals = [agg[row][key]["per_fold"].get(g, np.nan) for g in groups]
        ax.bar(x + (j - (len(rows) - 1) / 2) * width, vals, width, label=ROW_NAMES[row])
    head = result.get("headline")
    if head:
        m, s = head["mean"], head["std"]
        ax.axhline(m, color="k", lw=1)
        ax.axhspan(m - s, m + s, color="k", alpha=0.1,
                   label=f"{ROW_NAMES[head['row']]}: {m:.3f} ± {s:.3f}")
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 8 else 0)
    ax.set_xlabel("held-out test group")
    ax.set_ylabel(key)
    ax.set_title(f"{len(groups)} held-out groups"
                 + (" (nested: chosen on validation groups)" if result.get("nested") else ""))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check_plan(exp_k: str, plan: dict[str, list[str]]) -> None:
    path = os.path.join(exp_k, PLAN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != plan:
            raise DataError(f"{exp_k} holds a fold with another split (validation "
                            f"{old.get('val')} vs {plan['val']}): use a new --exp_dir or the "
                            "same --val_groups/--val_fraction/--val_seed as before")


def _read_groups(input_csv: str, audio_root: str | None, fold_column: str,
                 group_regex: str | None, folds: Sequence[str] | None
                 ) -> tuple[list, list[str], list[str], list[str]]:
    """(rows, each row's group, every group, the groups to run) of the listing."""
    from psla_tf.data import sources, splits
    if not os.path.isfile(input_csv):
        raise DataError(f"--input {input_csv}: not found (a CSV with a fold column)")
    rows, _ = sources.read_plain_csv(input_csv, audio_root)
    fold_of = (splits.row_groups(rows, group_regex) if group_regex
               else fold_values(rows, fold_column))
    by = f"--group_regex {group_regex!r}" if group_regex else f"--fold_column {fold_column!r}"
    all_folds = sorted(set(fold_of), key=_natural)
    if len(all_folds) < 2:
        raise DataError(f"{by} has {len(all_folds)} distinct value(s); "
                        "cross-validation needs at least 2 folds")
    run_folds = [str(f).strip() for f in (folds or all_folds)]
    unknown = [f for f in run_folds if f not in all_folds]
    if unknown:
        raise DataError(f"--folds {unknown} not among the folds {all_folds}")
    return rows, fold_of, all_folds, run_folds


def _prepare_groups(rows: list, fold_of: list[str], groups: list[str], vocab: tuple,
                    data_dir: str, **prepare_kw) -> dict[str, str]:
    """One shard set per group (finished shards are kept: preparation resumes);
    returns ``{group: shard prefix}``. Commands sharing ``data_dir`` (``--folds`` halves run
    side by side) prepare one at a time; the later one finds the shards finished."""
    from psla_tf.data import prepare
    prefixes = {}
    with atomic.exclusive(os.path.join(data_dir, ".prepare.lock")):
        for k in groups:
            part = [r for r, f in zip(rows, fold_of) if f == k]
            prefixes[k] = os.path.join(data_dir, f"fold_{k}")
            m = prepare.prepare(part, vocab, prefixes[k], **prepare_kw)
            failed = prepare.nothing_prepared(m, f"fold {k}")
            if failed:   # e.g. paths relative to another folder: stop, leave no empty set
                prepare.remove_set(prefixes[k])
                raise DataError(failed)
            print(f"fold {k}: " + prepare.summary_line(m), flush=True)
    return prefixes


def _run_fold(cfg, k: str, plan: dict[str, list[str]], prefixes: dict[str, str],
              keep_checkpoints: bool = False) -> dict[str, Any] | None:
    """Train and evaluate fold ``k`` (or read its finished summary); its summary, or None
    on a dry run. Unless ``keep_checkpoints``, the finished fold keeps only its last epoch's
    weights (``run_folder.prune_checkpoints``)."""
    import keras

    from psla_tf.training import trainer

    def glob(gs):
        return ",".join(f"{prefixes[j]}-*.tfrecord*" for j in gs)
    exp_k = os.path.join(cfg.exp_dir, f"fold_{k}")
    _check_plan(exp_k, plan)
    summary_path = run_folder.path(exp_k, run_folder.SUMMARY_FILE)
    if os.path.exists(summary_path) and not cfg.dry_run:
        print(f"fold {k}: finished earlier ({summary_path})", flush=True)
        with open(summary_path) as f:
            return json.load(f)
    cfg_k = dataclasses.replace(cfg, train_data=glob(plan["train"]),
                                val_data=glob(plan["val"]) if plan["val"] else None,
                                eval_data=glob(plan["test"]), exp_dir=exp_k)
    print(f"=== fold {k}: train on {', '.join(plan['train'])}"
          + (f"; choose on validation {', '.join(plan['val'])}" if plan["val"] else "")
          + f"; test on {k} → {exp_k}", flush=True)
    if not cfg.dry_run:
        os.makedirs(exp_k, exist_ok=True)
        atomic.write_json(os.path.join(exp_k, PLAN_FILE), plan, indent=1)
    summary = trainer.run(cfg_k)
    keras.backend.clear_session()
    if summary is not None and not keep_checkpoints:
        freed = run_folder.prune_checkpoints(exp_k)
        print(f"fold {k}: per-epoch weights but the last removed ({freed / 2**20:.0f} MiB; "
              "--keep_checkpoints keeps them)", flush=True)
    return summary


def _headline(agg: dict[str, Any], metric_key: str) -> dict[str, Any] | None:
    """The headline row's mean ± std and worst group."""
    head = headline_row(agg)
    if not head or metric_key not in agg[head]:
        return None
    vals = agg[head][metric_key]["per_fold"]
    worst = min(vals, key=vals.get)
    return {"row": head, "mean": agg[head][metric_key]["mean"],
            "std": agg[head][metric_key]["std"], "worst_group": worst, "worst": vals[worst]}


def _write_result(result: dict[str, Any], exp_dir: str) -> None:
    """cv_summary.json, cv_table.md / .csv and cv_plot.png in ``exp_dir``."""
    atomic.write_json(os.path.join(exp_dir, CV_SUMMARY), result, indent=1)
    for name, text in (("cv_table.md", table_markdown(result)),
                       ("cv_table.csv", table_csv(result["table"]))):
        atomic.write_text(os.path.join(exp_dir, name), text)
    plot(result, os.path.join(exp_dir, "cv_plot.png"))


def cross_validate(cfg, input_csv: str, fold_column: str = "fold",
                   folds: Sequence[str] | None = None, data_dir: str | None = None,
                   audio_root: str | None = None, label_csv: str | None = None,
                   workers: int = 1, max_seconds: float = 10.0,
                   target_length: int | None = None, progress: bool = True,
                   group_regex: str | None = None, val_groups: int = 0,
                   val_fraction: float = 0.0, val_seed: int = 0,
                   keep_checkpoints: bool = False) -> dict[str, Any]:
    """Prepare the groups, train/evaluate each fold (see the module doc); returns the CV
    summary. ``group_regex`` (on file names) replaces ``fold_column`` when given."""
    from psla_tf.data import sources
    from psla_tf.training import plan, selection

    if not cfg.exp_dir:
        raise DataError("--exp_dir is required")
    # flag errors (e.g. --freeze_backbone_epochs without --init_from) before any preparation
    plan.check_config(dataclasses.replace(cfg, train_data="<folds>", eval_data="<fold>"))
    if cfg.val_data:
        raise DataError("--val_data is set by cross-validation itself (--val_groups / "
                        "--val_fraction choose the validation groups of each fold)")
    data_dir = data_dir or os.path.join(cfg.exp_dir, "data")
    rows, fold_of, all_folds, run_folds = _read_groups(input_csv, audio_root, fold_column,
                                                       group_regex, folds)
    plans = fold_plans(all_folds, fold_of, rows, val_groups, val_fraction, val_seed)
    mids, names, where = sources.output_vocabulary(rows, label_csv, data_dir)
    sources.check_rows(rows, mids, input_csv)
    print(where, flush=True)
    prefixes = _prepare_groups(rows, fold_of, all_folds, (mids, names), data_dir,
                               workers=workers, max_seconds=max_seconds,
                               target_length=target_length or cfg.target_length,
                               progress=progress)
    per_fold: dict[str, dict[str, Any]] = {}
    for k in run_folds:
        summary = _run_fold(cfg, k, plans[k], prefixes, keep_checkpoints)
        if summary is not None:
            per_fold[k] = summary
    if cfg.dry_run:
        return {}
    metric_key = selection.METRIC_KEYS[cfg.metric]
    agg = aggregate(per_fold, metric_key)
    result = {"metric": cfg.metric, "metric_key": metric_key,
              "grouping": ({"group_regex": group_regex} if group_regex
                           else {"fold_column": fold_column}),
              "fold_column": fold_column if not group_regex else None,
              "folds": run_folds, "nested": bool(val_groups or val_fraction),
              "validation": {"val_groups": val_groups, "val_fraction": val_fraction,
                             "val_seed": val_seed},
              "plans": {k: plans[k] for k in run_folds},
              "input": os.path.abspath(input_csv), "data_dir": os.path.abspath(data_dir),
              "aggregate": agg, "headline": _headline(agg, metric_key),
              "table": group_table(per_fold, plans, metric_key),
              "complete": run_folds == all_folds}
    _write_result(result, cfg.exp_dir)
    return result


def report(result: dict[str, Any]) -> str:
    """Human-readable mean ± std lines and the per-group table of a :func:`cross_validate`
    result."""
    if not result:
        return "dry run: nothing trained"
    key = result.get("metric_key") or ("accuracy" if result["metric"] == "accuracy" else "mAP")
    grouping = result.get("grouping") or {"fold_column": result.get("fold_column")}
    by = (f"groups of {grouping['group_regex']!r}" if "group_regex" in grouping
          else grouping["fold_column"])
    nested = result.get("nested")
    lines = [f"{len(result['folds'])}-fold cross-validation ({by}: "
             f"{', '.join(result['folds'])})"
             + (", nested: each fold chooses on its validation groups, the test group only "
                "scores" if nested else "")
             + ("" if result.get("complete", True) else " — not all folds of the input")]
    for row in ROWS:
        r = result["aggregate"].get(row)
        if not r:
            continue
        parts = [f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in r.items()]
        folds = " ".join(f"{v:.3f}" for v in r[key]["per_fold"].values()) if key in r else ""
        lines.append(f"  {ROW_NAMES[row]:20s} " + ", ".join(parts) + (f"   per fold: {folds}"
                                                                       if folds else ""))
    head = result.get("headline")
    if head:
        lines.append(f"headline ({ROW_NAMES[head['row']]}): {key} {head['mean']:.4f} ± "
                     f"{head['std']:.4f}, worst group {head['worst_group']} "
                     f"{head['worst']:.4f}")
    if result.get("table"):
        lines += ["", table_markdown(result).rstrip()]
    return "\n".join(lines)
