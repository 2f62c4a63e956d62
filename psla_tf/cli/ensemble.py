"""Ensemble of runs (paper Sec. VI-B, Table XI): average the members' clip scores, print the
Table XI row (number of models, average member mAP, best member mAP, ensemble mAP) and write
the ensemble's scores; ``--export`` saves one Keras model averaging the members' outputs.

Examples:
  python tools/ensemble.py --scores=seed1.npz,seed2.npz,seed3.npz --output=ens.npz
  python tools/ensemble.py --models=exp/seed1,exp/seed2,exp/seed3 \\
      --data='data/eval-*.tfrecord' --output=ens.npz --export=exp/ensemble
  python tools/export.py --model=exp/ensemble/ensemble.keras --saved_model_dir=serving/ens
"""
import os
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import DATA, LABEL_CSV, MODEL, OUT_DIR, OUT_FILE, SCORES, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("scores", None, "Comma-separated score files (tools/predict.py) of the "
                    "members, all over the same clips.")
flags.DEFINE_string("models", None, "Instead of --scores: comma-separated models (anything "
                    "tools/predict.py --model takes), scored on --data.")
flags.DEFINE_string("data", None, "With --models: TFRecord shard glob or audio listing.")
flags.DEFINE_string("output", None, "Ensemble scores .npz (optional).")
flags.DEFINE_string("export", None, "With --models (Keras models): folder to save the ensemble "
                    "as one Keras model, DIR/ensemble.keras with DIR/labels.csv.")
flags.DEFINE_string("label_csv", None, "Class map of Keras members without a labels.csv.")
flags.DEFINE_integer("batch_size", 32, "Clips per forward pass with --models.", lower_bound=1)
flags.DEFINE_string("json", None, "Also write the Table XI row (and member mAPs) as JSON here.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
PATHS = {"scores": PathFlag(SCORES, many=True), "models": PathFlag(MODEL, many=True),
         "data": PathFlag(DATA), "label_csv": PathFlag(LABEL_CSV),
         "output": PathFlag(OUT_FILE), "json": PathFlag(OUT_FILE),
         "export": PathFlag(OUT_DIR, overwrite="merge")}


def _members(paths):
    from psla_tf import prediction
    from psla_tf.scoring import load_scorer
    preds = []
    for p in paths:
        scorer = load_scorer(p, FLAGS.label_csv)
        print(f"member {len(preds)}: {p}", file=sys.stderr)
        preds.append(prediction.predict(scorer, FLAGS.data, FLAGS.batch_size, FLAGS.progress))
    return preds


def _export(paths, out_dir):
    from psla_tf import atomic, ensemble, run_folder
    from psla_tf.data.records import DataError, write_label_csv
    from psla_tf.models.loading import is_saved_model, load_tagger, load_vocabulary
    models, vocab = [], None
    for p in paths:
        if is_saved_model(p):
            raise DataError(f"--export needs Keras members; {p} is a SavedModel")
        v = load_vocabulary(p, FLAGS.label_csv)
        if vocab is not None and v[0] != vocab[0]:
            raise DataError(f"{p}: class map differs from {paths[0]}'s")
        vocab = v
        models.append(load_tagger(p))
    model = ensemble.build_ensemble(models)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ensemble.keras")
    with atomic.atomic_path(path, ".keras") as tmp:
        model.save(tmp)
    write_label_csv(run_folder.path(out_dir, run_folder.LABELS_FILE), *vocab)
    return path


def main(argv: list[str] | None = None):
    """psla-ensemble (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import ensemble, prediction
    from psla_tf.data.records import DataError
    from psla_tf import atomic
    if bool(FLAGS.scores) == bool(FLAGS.models):
        raise DataError("give exactly one of --scores or --models")
    if FLAGS.models and not FLAGS.data:
        raise DataError("--models needs --data (the clips to score)")
    if FLAGS.export and not FLAGS.models:
        raise DataError("--export needs --models (score files hold no weights)")
    paths = [p.strip() for p in (FLAGS.scores or FLAGS.models).split(",") if p.strip()]
    if len(paths) < 2:
        raise DataError(f"an ensemble needs at least 2 members, got {len(paths)}")
    preds = ([prediction.load_scores(p) for p in paths] if FLAGS.scores
             else _members(paths))
    ens = ensemble.average_predictions(preds, paths)
    row = ensemble.ensemble_table(preds, paths) if ens.targets is not None else None
    exported = _export(paths, FLAGS.export) if FLAGS.export else None
    if FLAGS.output:
        prediction.save_scores(FLAGS.output, ens)
        print(f"wrote {FLAGS.output}: {len(ens.ids)} clips x {ens.scores.shape[1]} classes")
    if row is None:
        print(f"{len(paths)} models averaged; no targets, so no mAP")
    else:
        for m in row["members"]:
            print(f"  mAP {m['mAP']:.4f}  {m['source']}")
        print(ensemble.format_table(row))
        if FLAGS.json:
            atomic.write_json(FLAGS.json, row, indent=1)
    if exported:
        print(f"wrote {exported} (one Keras model; export it with tools/export.py)")


if __name__ == "__main__":
    main()
