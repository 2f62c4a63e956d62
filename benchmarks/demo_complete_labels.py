"""Score demo runs against the complete labels of clips drawn from the demo's training set.

A validation split of the demo's training clips carries their deliberately missing labels
(psla_tf/demo.py); a model that recovers them (a teacher's scores, label enhancement) is
penalised there. The generator records each clip's events, so its complete labels are known:
this prints, per run folder, the mAP of its saved per-epoch evaluation scores
(``predictions/eval_epoch_*.npy``, `--save_predictions`, on by default) against the split's
own labels and against the complete ones — the scores averaged over ``--epochs`` (the
weight-averaging window) and the ensemble of all epochs (docs/distillation.md).

    python benchmarks/demo_complete_labels.py --data='demo_val/demo_val-*.tfrecord' \
        --runs=exp_l0,exp_l0.5 --epochs=6-10
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
from absl import app, flags

from psla_tf import demo, metrics, run_folder
from psla_tf.data import records

flags.DEFINE_string("data", None, "The runs' evaluation shards (a split of the demo's train set).")
flags.DEFINE_string("datafile", "demo_data/audio/train.json", "The demo's train.json (events).")
flags.DEFINE_list("runs", None, "Run folders whose eval data is --data.")
flags.DEFINE_string("epochs", "6-10", "First-last epoch whose scores are averaged.")
flags.mark_flags_as_required(["data", "runs"])
FLAGS = flags.FLAGS


def complete_targets(data: str, datafile: str, mids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(split labels, complete labels) ``[N, C]`` of the clips of ``data`` in reading order."""
    with open(datafile, encoding="utf-8") as f:
        events = {e["wav"]: e["events"] for e in json.load(f)["data"]}
    col = {m: i for i, m in enumerate(mids)}
    given, complete = [], []
    for ex in records.iter_examples(records.expand_glob(data)):
        if ex["id"] not in events:
            raise SystemExit(f"error: clip {ex['id']} is not in {datafile}")
        exact = demo.complete_labels(events[ex["id"]])
        for rows, labels in ((given, ex["mids"]), (complete, exact)):
            rows.append(np.zeros(len(mids), np.float32))
            rows[-1][[col[m] for m in labels]] = 1.0
    return np.stack(given), np.stack(complete)


def main(_) -> None:
    try:
        first, last = (int(e) for e in FLAGS.epochs.split("-"))
    except ValueError:
        raise SystemExit(f"error: --epochs={FLAGS.epochs}: want FIRST-LAST, e.g. 6-10") from None
    given = complete = None
    print("| run | split labels: mean of epochs | complete labels: mean of epochs | "
          "complete labels: ensemble |")
    print("|---|---|---|---|")
    for run in FLAGS.runs:
        pred = os.path.join(run, "predictions")
        files = list(itertools.takewhile(os.path.exists, (
            os.path.join(pred, run_folder.prediction_name("eval", e)) for e in itertools.count(1))))
        if not files:
            raise SystemExit(f"error: no predictions/eval_epoch_*.npy in {run}")
        if given is None:
            mids, _ = records.read_label_csv(os.path.join(run, "labels.csv"))
            given, complete = complete_targets(FLAGS.data, FLAGS.datafile, mids)
        if not np.array_equal(np.load(os.path.join(pred, run_folder.targets_name("eval"))), given):
            raise SystemExit(f"error: {run}'s evaluation clips are not --data in reading order")
        scores = np.stack([np.load(f) for f in files])
        window = scores[first - 1:last].mean(0)
        m_ap = [metrics.evaluate(t, s)["mAP"]
                for t, s in ((given, window), (complete, window), (complete, scores.mean(0)))]
        print(f"| {run} | " + " | ".join(f"{m:.4f}" for m in m_ap) + " |")


if __name__ == "__main__":
    app.run(main)
