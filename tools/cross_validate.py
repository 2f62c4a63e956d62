"""k-fold cross-validation (ESC-50 style): prepare each fold once, train on the other folds,
evaluate on it, report mean ± std of the chosen metric (accuracy for single-label sets).

Example (ESC-50: meta/esc50.csv has filename, fold, category; audio in audio/):
  python tools/cross_validate.py --flagfile=configs/esc50.flags \\
      --input=ESC-50/meta/esc50.csv --fold_column=fold --data_dir=data/esc50 \\
      --exp_dir=exp/esc50 --init_from=exp/audioset
Writes DATA_DIR/fold_{k}-*.tfrecord (+ manifests, labels.csv), EXP_DIR/fold_{k}/ (a normal
training run each) and EXP_DIR/cv_summary.json. A killed run re-run with the same arguments
skips the folds whose summary.json exists and keeps finished shards. All training flags of
main.py apply to every fold (see --helpfull).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from psla_tf import params  # noqa: E402
from psla_tf.training.flags import define_flags  # noqa: E402

FLAGS = flags.FLAGS
define_flags()
flags.DEFINE_string("input", None, "Plain CSV listing (path/filename + labels/category columns) "
                    "with a fold column; relative paths resolve against --audio_root or the "
                    "CSV's folder.")
flags.DEFINE_string("audio_root", None, "Folder the CSV's paths are relative to (ESC-50: the "
                    "audio/ folder; default: the CSV's folder).")
flags.DEFINE_string("fold_column", "fold", "CSV column holding each clip's fold.")
flags.DEFINE_list("folds", None, "Folds to run (default: every value of --fold_column).")
flags.DEFINE_string("data_dir", None, "Where the per-fold shards go (default EXP_DIR/data).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV (default: labels seen, written to "
                    "DATA_DIR/labels.csv).")
flags.DEFINE_integer("workers", 1, "Preparation worker processes.")
flags.DEFINE_float("max_seconds", 10.0, "Clips longer than this are cut when preparing.")


def main(argv):
    del argv
    from psla_tf.data.records import DataError
    from psla_tf.training import cross_validation as cv
    from psla_tf.training.flags import config_from_flags
    from psla_tf.training.trainer import ConfigError
    try:
        if not FLAGS.input:
            raise DataError("--input (a CSV with a fold column) is required")
        if not FLAGS.exp_dir:
            raise DataError("--exp_dir is required")
        cfg = config_from_flags()
        result = cv.cross_validate(
            cfg, FLAGS.input, fold_column=FLAGS.fold_column, folds=FLAGS.folds,
            data_dir=FLAGS.data_dir or os.path.join(FLAGS.exp_dir, "data"),
            audio_root=FLAGS.audio_root, label_csv=FLAGS.label_csv, workers=FLAGS.workers,
            max_seconds=FLAGS.max_seconds,
            target_length=FLAGS.target_length or params.TARGET_LENGTH)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(cv.report(result))


if __name__ == "__main__":
    app.run(main)
