"""Evaluation report of score files (tools/predict.py): mAP, mean AUC, d′ (paper Sec. II-B)
as JSON, a per-class CSV sorted by AP, and the sorted class-wise AP plot (the paper's Fig. 7).

Examples:
  python tools/evaluate.py --scores=eval.npz --out_dir=report
  python tools/evaluate.py --scores=seed1.npz,seed2.npz,seed3.npz --out_dir=report_runs \\
      --label_csv=class_labels_indices.csv        # Fig. 7 with ± std over the runs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("scores", None, "Score file (.npz from tools/predict.py) or a comma-"
                    "separated list of score files of the same clips (runs: per-class AP is "
                    "their mean ± std, as in Fig. 7).")
flags.DEFINE_string("label_csv", None, "Class map index,mid,display_name (default: the mids "
                    "and names stored in the score file).")
flags.DEFINE_string("out_dir", None, "Output folder: metrics.json, classes.csv, sorted_ap.png.")
flags.DEFINE_integer("show", 5, "Best and worst classes printed.")


def main(argv):
    del argv
    from psla_tf import evaluation, prediction
    from psla_tf.data.records import DataError, read_label_csv
    try:
        if not FLAGS.scores or not FLAGS.out_dir:
            raise DataError("--scores and --out_dir are required")
        paths = [p.strip() for p in FLAGS.scores.split(",") if p.strip()]
        preds = [prediction.load_scores(p) for p in paths]
        if FLAGS.label_csv:
            mids, names = read_label_csv(FLAGS.label_csv)
            if preds[0].mids and preds[0].mids != mids:
                raise DataError(f"{FLAGS.label_csv} does not match the class map stored in "
                                f"{paths[0]}")
        elif preds[0].mids:
            mids, names = preds[0].mids, preds[0].names
        else:
            raise DataError(f"{paths[0]} stores no class map; pass --label_csv")
        report = evaluation.evaluation_report(preds, mids, names, paths)
        files = evaluation.write_report(report, names, FLAGS.out_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = report["summary"]
    runs = f" (mean of {len(paths)} runs)" if len(paths) > 1 else ""
    print(f"{s['num_examples']} clips, {s['num_classes_evaluated']}/{s['num_classes']} classes "
          f"with positives{runs}")
    print(f"mAP {s['mAP']:.4f}  AUC {s['AUC']:.4f}  d-prime {s['d_prime']:.4f}")
    rated = [r for r in report["classes"] if r["AP"] is not None]
    k = min(FLAGS.show, len(rated))
    if k:
        print("best:  " + "; ".join(f"{r['name']} {r['AP']:.3f}" for r in rated[:k]))
        print("worst: " + "; ".join(f"{r['name']} {r['AP']:.3f}" for r in rated[-k:][::-1]))
    if s["excluded_from_mAP"]:
        print(f"{len(s['excluded_from_mAP'])} classes without positives (excluded): "
              + ", ".join(e["name"] for e in s["excluded_from_mAP"][:10])
              + (" ..." if len(s["excluded_from_mAP"]) > 10 else ""))
    print("wrote " + ", ".join(files.values()))


if __name__ == "__main__":
    app.run(main)
