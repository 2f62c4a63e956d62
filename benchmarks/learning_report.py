"""Side-by-side learning report of training runs (psla_tf and the PyTorch reference-style
trainer): a markdown table of single / weight-averaging / ensemble / last-epoch mAP and wall
time per run, the per-epoch eval mAP curves against epochs and against wall time as a plot,
and with ``--reference`` the time to accuracy: when each run's epoch model first reaches the
reference run's final checkpoint-ensemble mAP, as a share of the reference's wall time.

    python benchmarks/learning_report.py --runs=psla_tf_s0=exp/tf_s0,pytorch_s0=exp/torch_s0 \\
        --reference=pytorch_s0 --plot=docs/learning_curves.png

Each run folder holds the ``summary.json`` that main.py or benchmarks/torch_reference_train.py
wrote (the same keys). Elapsed time per epoch: the PyTorch trainer records it per epoch; for a
psla_tf run it is read from the run's TensorBoard log (each epoch's metrics carry a wall time;
the clock starts at the log's first event, when training starts).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def load(path: str) -> dict:
    """A run's summary.json (``path`` is the run folder or the file)."""
    f = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def epoch_seconds(path: str, s: dict) -> list[float] | None:
    """Seconds from the start of training to the end of each epoch's evaluation, or None."""
    if all("seconds" in h for h in s["per_epoch"]):
        return [float(h["seconds"]) for h in s["per_epoch"]]
    import glob
    files = sorted(glob.glob(os.path.join(path, "tensorboard", "train", "events.out.tfevents.*")))
    if not files:
        return None
    import tensorflow as tf
    start, ends = None, {}
    for e in tf.compat.v1.train.summary_iterator(files[-1]):
        start = e.wall_time if start is None else start
        if any(v.tag == "epoch_eval_mAP" for v in e.summary.value):
            ends[int(e.step) + 1] = e.wall_time - start
    if not all(h["epoch"] in ends for h in s["per_epoch"]):
        return None  # a resumed run: its epochs are spread over several logs
    return [ends[h["epoch"]] for h in s["per_epoch"]]


def time_to_accuracy(curve: list[float], seconds: list[float], target: float
                     ) -> tuple[int, float] | None:
    """(epoch, elapsed seconds) of the first epoch whose mAP reaches ``target``, or None."""
    for e, (m, t) in enumerate(zip(curve, seconds), 1):
        if m >= target:
            return e, t
    return None


def tta_table(runs: list[tuple[str, dict, list[float] | None]], reference: str) -> str:
    """Markdown: each run's time to the reference's final checkpoint-ensemble mAP."""
    ref = next((s for n, s, _ in runs if n == reference), None)
    if ref is None or not ref.get("ensemble"):
        raise SystemExit(f"error: --reference={reference}: not a run with an ensemble result")
    target = ref["ensemble"]["mAP"]
    rows = [f"time to the {reference} run's final checkpoint-ensemble mAP {target:.3f} "
            f"(its wall time {ref['seconds']:.0f} s):", "",
            "| run | epoch | elapsed | share of the reference's wall time |", "|---|---|---|---|"]
    for name, s, secs in runs:
        hit = time_to_accuracy([h["mAP"] for h in s["per_epoch"]], secs, target) if secs else None
        if secs is None:
            rows.append(f"| {name} | — | no per-epoch times | — |")
        elif hit is None:
            rows.append(f"| {name} | not reached | — | — |")
        else:
            rows.append(f"| {name} | {hit[0]} | {hit[1]:.0f} s | {hit[1] / ref['seconds']:.2f}× |")
    return "\n".join(rows)


def row(name: str, s: dict) -> str:
    """One markdown table row of run ``name``."""
    def m(key):
        return f"{s[key]['mAP']:.3f}" if s.get(key) else "—"
    curve = [h["mAP"] for h in s["per_epoch"]]
    return (f"| {name} | {m('single')} | {m('weight_averaging')} | {m('ensemble')} | "
            f"{curve[-1]:.3f} | {s['seconds']:.0f} s | " + " ".join(f"{x:.2f}" for x in curve)
            + " |")


def table(runs: list[tuple[str, dict]]) -> str:
    head = ("| run | single (mean of last 5) | weight averaging | checkpoint ensemble | "
            "last epoch | wall time | per-epoch eval mAP |\n|---|---|---|---|---|---|---|")
    return "\n".join([head] + [row(n, s) for n, s in runs])


def plot(runs: list[tuple[str, dict, list[float] | None]], out: str) -> None:
    """Eval mAP per epoch (left) and against elapsed minutes (right) of every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, s, secs in runs:
        curve = [h["mAP"] for h in s["per_epoch"]]
        style = "--" if "torch" in name or "pytorch" in name else "-"
        line, = by_epoch.plot([h["epoch"] for h in s["per_epoch"]], curve, style, marker="o",
                              ms=3, label=name)
        if secs:
            by_time.plot(np.asarray(secs) / 60, curve, style, marker="o", ms=3,
                         color=line.get_color(), label=name)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("minutes of training")
    by_epoch.set_ylabel("eval mAP")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="name=folder,name=folder,...")
    ap.add_argument("--plot", default=None, help="write the curves here (.png)")
    ap.add_argument("--reference", default=None,
                    help="name of the run whose final ensemble mAP the others race to")
    a = ap.parse_args()
    runs, paths = [], []
    for item in a.runs.split(","):
        name, _, path = item.partition("=")
        paths.append(path)
        try:
            runs.append((name, load(path)))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"error: {path}: no readable summary.json ({e})")
    print(table(runs))
    timed = [(name, s, epoch_seconds(path, s)) for (name, s), path in zip(runs, paths)]
    if a.reference:
        print()
        print(tta_table(timed, a.reference))
    if a.plot:
        plot(timed, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
