"""Evaluation report of score files (tools/predict.py): mAP, mean AUC, d′ (paper Sec. II-B)
as JSON, a per-class CSV sorted by AP, and the sorted class-wise AP plot (the paper's Fig. 7).

Examples:
  python tools/evaluate.py --scores=eval.npz --out_dir=report
  python tools/evaluate.py --scores=seed1.npz,seed2.npz,seed3.npz --out_dir=report_runs \\
      --label_csv=class_labels_indices.csv        # Fig. 7 with ± std over the runs
  python tools/evaluate.py --scores=eval.npz --data='data/eval-*.tfrecord' --out_dir=report
      # coverage: mAP "on 19,185 of 20,371 listed clips" (from the shards' manifests)
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
flags.DEFINE_string("data", None, "The TFRecord shards the scores were predicted on (glob): "
                    "their manifests say how many clips the input listed, so the report "
                    "states the coverage (scored of listed clips) next to mAP.")
flags.DEFINE_integer("listed", None, "How many clips the evaluation set lists (instead of "
                     "--data, e.g. the rows of the original CSV).")


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
        listed, written, source = FLAGS.listed, None, None
        if FLAGS.data:
            if not prediction.is_record_glob(FLAGS.data):
                raise DataError("--data must be the TFRecord shards the scores were predicted "
                                "on (a glob with a manifest); for a listing use --listed=N")
            from psla_tf.data.records import load_data_spec
            spec = load_data_spec(FLAGS.data)
            if list(spec.mids) != list(mids):
                raise DataError(f"--data {FLAGS.data}: its vocabulary differs from the "
                                "scores' class map")
            written, source = int(spec.num_examples), FLAGS.data
            if listed is None:
                listed = int(spec.listed)
        report = evaluation.evaluation_report(preds, mids, names, paths, listed=listed,
                                              written=written, coverage_source=source)
        files = evaluation.write_report(report, names, FLAGS.out_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = report["summary"]
    runs = f" (mean of {len(paths)} runs)" if len(paths) > 1 else ""
    print(f"{s['num_examples']} clips, {s['num_classes_evaluated']}/{s['num_classes']} classes "
          f"with positives{runs}")
    print(f"mAP {s['mAP']:.4f} {evaluation.coverage_text(s['coverage'])}  "
          f"AUC {s['AUC']:.4f}  d-prime {s['d_prime']:.4f}")
    if s["coverage"]["listed"] is not None and not s["coverage"]["complete"]:
        print(f"warning: the metrics cover {s['coverage']['evaluated']} of "
              f"{s['coverage']['listed']} listed clips")
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
