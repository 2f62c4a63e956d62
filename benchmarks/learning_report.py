"""Side-by-side learning report of training runs (psla_tf and the PyTorch reference-style
trainer): a markdown table of single / weight-averaging / ensemble / last-epoch mAP and wall
time per run, and the per-epoch eval mAP curves as a plot.

    python benchmarks/learning_report.py --runs=psla_tf_s0=exp/tf_s0,pytorch_s0=exp/torch_s0 \\
        --plot=docs/learning_curves.png

Each run folder holds the ``summary.json`` that main.py or benchmarks/torch_reference_train.py
wrote (the same keys).
"""
from __future__ import annotations

import argparse
import json
import os


def load(path: str) -> dict:
    """A run's summary.json (``path`` is the run folder or the file)."""
    f = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


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


def plot(runs: list[tuple[str, dict]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in runs:
        ep = [h["epoch"] for h in s["per_epoch"]]
        style = "--" if "torch" in name or "pytorch" in name else "-"
        ax.plot(ep, [h["mAP"] for h in s["per_epoch"]], style, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval mAP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="name=folder,name=folder,...")
    ap.add_argument("--plot", default=None, help="write the curves here (.png)")
    a = ap.parse_args()
    runs = []
    for item in a.runs.split(","):
        name, _, path = item.partition("=")
        try:
            runs.append((name, load(path)))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"error: {path}: no readable summary.json ({e})")
    print(table(runs))
    if a.plot:
        plot(runs, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
