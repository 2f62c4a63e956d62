"""Evaluation report of score files (tools/predict.py): mAP, mean AUC, d′ (paper Sec. II-B)
as JSON, a per-class CSV sorted by AP, and the sorted class-wise AP plot (the paper's Fig. 7).

Examples:
  python tools/evaluate.py --scores=eval.npz --out_dir=report
  python tools/evaluate.py --scores=seed1.npz,seed2.npz,seed3.npz --out_dir=report_runs \\
      --label_csv=class_labels_indices.csv        # Fig. 7 with ± std over the runs
  python tools/evaluate.py --scores=eval.npz --data='data/eval-*.tfrecord' --out_dir=report
      # coverage: mAP "on 19,185 of 20,371 listed clips" (from the shards' manifests)
  # Table IX: an AudioSet model on a set with another vocabulary (predict.py --ignore_labels)
  python tools/evaluate.py --scores=fsd50k_eval.npz --target_data='data/fsd50k_eval-*.tfrecord' \
      --class_map=mid --out_dir=report_fsd50k         # ESC-50: --class_map=esc50_to_audioset.csv
  # Sec. VII-B / Table VII: class-wise AP correlated with another model's and with class
  # properties (training count from the shards' manifest; AudioSet's qa_true_counts.csv)
  python tools/evaluate.py --scores=b2_4head.npz --compare_scores=b0_1head.npz \
      --class_counts_data='data/full_train-*.tfrecord' --class_info=qa_true_counts.csv \
      --out_dir=report
"""
import dataclasses

import numpy as np
from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import DATA, LABEL_CSV, OUT_DIR, SCORES, SHARDS, TABLE, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("scores", None, "Score file (.npz from tools/predict.py) or a comma-"
                    "separated list of score files of the same clips (runs: per-class AP is "
                    "their mean ± std, as in Fig. 7).")
flags.DEFINE_string("label_csv", None, "Class map index,mid,display_name (default: the mids "
                    "and names stored in the score file).")
flags.DEFINE_string("out_dir", None, "Output folder: metrics.json, classes.csv, sorted_ap.png.")
flags.DEFINE_integer("show", 5, "Best and worst classes printed.", lower_bound=0)
flags.DEFINE_string("data", None, "The TFRecord shards the scores were predicted on (glob): "
                    "their manifests say how many clips the input listed, so the report "
                    "states the coverage (scored of listed clips) next to mAP.")
flags.DEFINE_integer("listed", None, "How many clips the evaluation set lists (instead of "
                     "--data, e.g. the rows of the original CSV).", lower_bound=0)
flags.DEFINE_string("class_map", None, "Evaluate the scores on a set with another vocabulary "
                    "(paper Table IX): mid (same MIDs, e.g. FSD50K), name (same display "
                    "names) or a CSV target,source of MIDs / names (several sources per target "
                    "allowed: the maximum score). Needs --target_data. Metrics cover the mapped "
                    "classes on the clips with a mapped label; unmapped classes are listed.")
flags.DEFINE_string("target_data", None, "With --class_map: the evaluated set's labels, as "
                    "TFRecord shards (glob) or a listing (datafile / CSV path,labels / folder); "
                    "clips matched to the scores by id.")
flags.DEFINE_string("target_label_csv", None, "With a --target_data listing: its vocabulary "
                    "(default: the labels seen, sorted).")
flags.DEFINE_string("compare_scores", None, "Another model's score file(s) of the same clips "
                    "(comma-separated): Pearson/Spearman correlation of the class-wise APs "
                    "(paper Sec. VII-B).")
flags.DEFINE_string("class_info", None, "CSV of per-class numbers (a mid/label_id, index or "
                    "name column + numeric columns; AudioSet's qa_true_counts.csv gives "
                    "quality = num_true / num_rated): correlation of the class-wise AP with "
                    "each column (paper Table VII).")
flags.DEFINE_string("class_counts_data", None, "Training shards (glob): their manifest's class "
                    "counts as the property train_count (Table VII).")

PATHS = {"scores": PathFlag(SCORES, many=True), "label_csv": PathFlag(LABEL_CSV),
         "data": PathFlag(SHARDS, many=True, hint="pass the TFRecord shards the scores were "
                          "predicted on (a glob with a manifest); for a listing use --listed=N"),
         "class_map": PathFlag(TABLE, keywords=("mid", "name")),
         "target_data": PathFlag(DATA), "target_label_csv": PathFlag(LABEL_CSV),
         "compare_scores": PathFlag(SCORES, many=True), "class_info": PathFlag(TABLE),
         "class_counts_data": PathFlag(SHARDS, many=True),
         "out_dir": PathFlag(OUT_DIR, overwrite="merge")}


def main(argv: list[str] | None = None):
    """psla-evaluate (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import evaluation, prediction
    from psla_tf.data.records import DataError, read_label_csv
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
    mapping = None
    own_vocab = (list(mids), list(names))   # the scores' own class map
    if FLAGS.class_map or FLAGS.target_data:
        if not (FLAGS.class_map and FLAGS.target_data):
            raise DataError("--class_map and --target_data go together")
        preds, mids, names, mapping = _map_classes(preds, mids, names)
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
    extra = _analyses(report, own_vocab, mids, names, mapping)
    report["summary"].update(extra)
    files = evaluation.write_report(report, names, FLAGS.out_dir)
    s = report["summary"]
    runs = f" (mean of {len(paths)} runs)" if len(paths) > 1 else ""
    print(f"{s['num_examples']} clips, {s['num_classes_evaluated']}/{s['num_classes']} classes "
          f"with positives{runs}")
    print(f"mAP {s['mAP']:.4f} {evaluation.coverage_text(s['coverage'])}  "
          f"AUC {s['AUC']:.4f}  d-prime {s['d_prime']:.4f}"
          + (f"  accuracy {s['accuracy']:.4f}" if "accuracy" in s else ""))
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
    _print_analyses(report["summary"])
    print("wrote " + ", ".join(files.values()))


def _map_classes(preds, mids, names):
    """Scores of the model's vocabulary → the --target_data set's mapped classes."""
    from psla_tf import class_analysis as ca
    t_ids, t_y, t_mids, t_names = ca.read_target_labels(FLAGS.target_data,
                                                        FLAGS.target_label_csv)
    cmap = ca.build_class_map(FLAGS.class_map, (mids, names), (t_mids, t_names))
    out = []
    for p in preds:
        if p.mids and list(p.mids) != list(mids):
            from psla_tf.data.records import DataError
            raise DataError("score files with different class maps")
        p = dataclasses.replace(p, mids=list(mids), names=list(names))
        mapped, info = ca.apply_class_map(p, cmap, t_ids, t_y)
        out.append(mapped)
    return out, out[0].mids, out[0].names, (cmap, t_ids, t_y, info)


def _analyses(report, source, mids, names, mapping) -> dict:
    """Table IX's class map, Sec. VII-B's AP correlation, Table VII's class correlations."""
    from psla_tf import class_analysis as ca
    from psla_tf import evaluation, prediction
    from psla_tf.data.records import DataError, load_data_spec
    extra = {}
    if mapping is not None:
        extra["class_map"] = dict(mapping[3], spec=FLAGS.class_map, target_data=FLAGS.target_data)
    if FLAGS.compare_scores:
        other = [prediction.load_scores(p.strip()) for p in FLAGS.compare_scores.split(",")
                 if p.strip()]
        if mapping is not None:
            cmap, t_ids, t_y, _ = mapping
            other = [ca.apply_class_map(dataclasses.replace(o, mids=source[0],
                                                            names=source[1]),
                                        cmap, t_ids, t_y)[0] for o in other]
        if other[0].scores.shape[1] != len(mids):
            raise DataError(f"--compare_scores has {other[0].scores.shape[1]} classes, the "
                            f"scores {len(mids)}")
        rep = evaluation.evaluation_report(other, mids, names, FLAGS.compare_scores.split(","))
        extra["ap_correlation"] = dict(ca.ap_correlation(report["ap"], rep["ap"]),
                                       compare_scores=FLAGS.compare_scores,
                                       compare_mAP=rep["summary"]["mAP"])
    props = {}
    if FLAGS.class_counts_data:
        spec = load_data_spec(FLAGS.class_counts_data)
        by_mid = dict(zip(spec.mids, np.asarray(spec.class_counts, float)))
        props["train_count"] = np.array([by_mid.get(m, np.nan) for m in mids])
    if FLAGS.class_info:
        props.update(ca.read_class_info(FLAGS.class_info, mids, names))
    if props:
        extra["class_correlations"] = ca.property_correlations(report["ap"], props)
    return extra


def _print_analyses(s: dict) -> None:
    cm = s.get("class_map")
    if cm:
        print(f"class map ({cm['spec']}): {len(cm['mapped'])} classes mapped, "
              f"{len(cm['unmapped'])} unmapped; {cm['clips_evaluated']} clips with a mapped "
              f"label ({cm['clips_without_mapped_label']} without, "
              f"{cm['clips_without_scores']} without scores)")
        if cm["unmapped"]:
            print("unmapped: " + ", ".join(u["name"] for u in cm["unmapped"][:20])
                  + (" ..." if len(cm["unmapped"]) > 20 else ""))
    c = s.get("ap_correlation")
    if c:
        print(f"class-wise AP vs {c['compare_scores']} (mAP {c['compare_mAP']:.4f}): Pearson "
              f"{c['pearson']:.4f} (p {c['pearson_p']:.2g}), Spearman {c['spearman']:.4f} over "
              f"{c['classes']} classes")
    for name, c in (s.get("class_correlations") or {}).items():
        print(f"class-wise AP vs {name}: Pearson {c['pearson']:.4f} (p {c['pearson_p']:.2g}), "
              f"Spearman {c['spearman']:.4f} over {c['classes']} classes")


if __name__ == "__main__":
    main()
