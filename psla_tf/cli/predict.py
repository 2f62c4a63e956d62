"""Clip-level scores of a trained tagger over a data set → ``scores.npz`` (ids, scores,
targets where labels are known, mids, names). Feeds evaluate.py, ensemble.py and
enhance_labels.py (the teacher's scores, paper Sec. V).

Examples:
  python tools/predict.py --model=exp/full --data='data/eval-*.tfrecord' --output=eval.npz
  python tools/predict.py --model=exp/full/checkpoints/epoch_030.weights.h5 \\
      --data=train.json --output=train_scores.npz
  python tools/predict.py --model=export/psla --data=clips.csv --output=clips.npz
  # an AudioSet model on ESC-50 (another vocabulary; evaluate with --class_map, Table IX)
  python tools/predict.py --model=exp/full --data='data/esc50-*.tfrecord' --ignore_labels \\
      --output=esc50_scores.npz
"""
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import DATA, FOLDER, LABEL_CSV, MODEL, OUT_FILE, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A .keras file, a training run's folder (its wa_model.keras, "
                    "else final_model.keras), a checkpoints/epoch_NNN.weights.h5 of a run, or "
                    "an exported SavedModel folder (tools/export.py).")
flags.DEFINE_string("data", None, "TFRecord shards (glob, e.g. 'data/eval-*.tfrecord'; their "
                    "manifest gives the labels) or a listing of audio files: PSLA datafile "
                    ".json, AudioSet segment CSV (with --audio_dir), plain CSV path,labels, "
                    "or a folder of class sub-folders.")
flags.DEFINE_string("output", None, "Output .npz (written atomically).")
flags.DEFINE_string("label_csv", None, "Class map index,mid,display_name of a Keras model "
                    "(default: the labels.csv beside the model / in its run folder).")
flags.DEFINE_integer("batch_size", 32, "Clips per forward pass (memory: one batch of audio).",
                     lower_bound=1)
flags.DEFINE_string("audio_dir", None, "AudioSet CSV listings: folder holding the clips.")
flags.DEFINE_string("filename_pattern", "{YTID}.wav", "AudioSet CSV listings: file name of a "
                    "clip ({YTID}, {start}, {end}, {start:d}).")
flags.DEFINE_bool("allow_cut_clips", False, "Accept shards whose clips were cut at "
                  "preparation (make_tfrecords --max_seconds) to less than 90 % of the model's "
                  "input; refused otherwise (their scores are not the model's on the clips).")
flags.DEFINE_bool("ignore_labels", False, "Write scores only (no targets), whatever the "
                  "data's labels: for a set labelled in another vocabulary (an AudioSet model "
                  "on ESC-50 / FSD50K), evaluated with tools/evaluate.py --class_map "
                  "--target_data (paper Table IX).")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
PATHS = {"model": PathFlag(MODEL), "data": PathFlag(DATA), "label_csv": PathFlag(LABEL_CSV),
         "audio_dir": PathFlag(FOLDER), "output": PathFlag(OUT_FILE)}


def main(argv: list[str] | None = None):
    """psla-predict (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import prediction
    from psla_tf.data.records import DataError
    from psla_tf.scoring import load_scorer
    for name in ("model", "data", "output"):
        if not getattr(FLAGS, name):
            raise DataError(f"--{name} is required")
    vocab = None
    if prediction.is_record_glob(FLAGS.data) and not FLAGS.ignore_labels:
        from psla_tf.data.records import load_data_spec
        spec = load_data_spec(FLAGS.data)
        vocab = (spec.mids, spec.names)
    scorer = load_scorer(FLAGS.model, FLAGS.label_csv, vocabulary=vocab)
    preds = prediction.predict(scorer, FLAGS.data, FLAGS.batch_size, FLAGS.progress,
                               allow_cut_clips=FLAGS.allow_cut_clips,
                               ignore_labels=FLAGS.ignore_labels,
                               audio_dir=FLAGS.audio_dir,
                               filename_pattern=FLAGS.filename_pattern)
    prediction.save_scores(FLAGS.output, preds)
    for clip_id, reason in preds.failures:
        print(f"skipped {clip_id}: {reason}", file=sys.stderr)
    n, c = preds.scores.shape
    what = "with targets" if preds.targets is not None else "no labels"
    print(f"wrote {FLAGS.output}: {n} clips x {c} classes ({what})"
          + (f"; {len(preds.failures)} clips skipped" if preds.failures else ""))
    if preds.targets is not None and n:
        from psla_tf import metrics
        r = metrics.evaluate(preds.targets, preds.scores)
        print(f"mAP {r['mAP']:.4f}  AUC {r['AUC']:.4f}  d-prime {r['d_prime']:.4f}")


if __name__ == "__main__":
    main()
