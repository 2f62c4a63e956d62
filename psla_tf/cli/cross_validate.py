"""Leave-one-group-out cross-validation, nested: for every group (speaker, session, ESC-50
fold) held out as the test set, train on the others, choose (epoch, result row) on validation
groups taken from the others, score the held-out group once; report mean ± std, the worst
group, a per-group table and a plot.

Examples:
  # FSDD, leave one speaker out over all 6 speakers (docs/own_data.md); --val_groups=1:
  # nested, each fold validates on the next speaker
  python tools/cross_validate.py --flagfile=configs/fsdd.flags --input=fsdd.csv \\
      --fold_column=speaker --val_groups=0 --workers=2 --exp_dir=exp/fsdd_loso
  # groups from the file names instead of a column; 20 % of the other clips (whole groups)
  python tools/cross_validate.py --flagfile=configs/custom_singlelabel.flags --input=mine.csv \\
      --group_regex='^([a-z]+)_' --val_fraction=0.2 --init_from=exp/audioset --exp_dir=exp/cv
  # ESC-50's published protocol (train on 4 folds, test on the 5th; nothing chosen by data)
  python tools/cross_validate.py --flagfile=configs/esc50.flags \\
      --input=ESC-50/meta/esc50.csv --audio_root=ESC-50/audio --fold_column=fold \\
      --val_groups=0 --exp_dir=exp/esc50 --init_from=exp/audioset
Writes DATA_DIR/fold_{g}-*.tfrecord (+ manifests, labels.csv), EXP_DIR/fold_{g}/ (a normal
training run each, with cv_fold.json naming its train/val/test groups), EXP_DIR/cv_summary.json,
cv_table.md, cv_table.csv and cv_plot.png; a finished fold keeps only its last epoch's weights
(--keep_checkpoints: all). A killed run re-run with the same arguments skips
the folds whose summary.json exists and keeps finished shards. All training flags of main.py
apply to every fold (see --helpfull); --val_data is set per fold.
"""
import os

from absl import flags

from psla_tf import cli, params
from psla_tf.cli.paths import FOLDER, LABEL_CSV, LISTING, OUT_DIR, TRAINING, PathFlag
from psla_tf.training.flags import define_flags

FLAGS = flags.FLAGS
define_flags()
flags.DEFINE_string("input", None, "Plain CSV listing (path/filename + labels/category columns) "
                    "with a fold column; relative paths resolve against --audio_root or the "
                    "CSV's folder.")
flags.DEFINE_string("audio_root", None, "Folder the CSV's paths are relative to (ESC-50: the "
                    "audio/ folder; default: the CSV's folder).")
flags.DEFINE_string("fold_column", "fold", "CSV column holding each clip's group (fold, "
                    "speaker, session).")
flags.DEFINE_string("group_regex", None, "Instead of --fold_column: the group is this regex's "
                    "match on the file name (group 1 if any), e.g. '^\\d+_([a-z]+)_'.")
flags.DEFINE_list("folds", None, "Held-out groups to run (default: every group).")
flags.DEFINE_integer("val_groups", 1, "Nested: each fold validates on the next N groups "
                     "(sorted, wrapping round) and trains on the rest; choices (best epoch, "
                     "result row) are made on them. 0 with --val_fraction=0: no validation "
                     "(train on all other groups, nothing chosen by data).")
flags.DEFINE_float("val_fraction", 0.0, "Nested, instead of --val_groups: whole groups "
                   "making up this fraction of the other groups' clips validate.")
flags.DEFINE_integer("val_seed", 0, "Seed of the --val_fraction choice of groups.")
flags.DEFINE_string("data_dir", None, "Where the per-fold shards go (default EXP_DIR/data).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV (default: labels seen, written to "
                    "DATA_DIR/labels.csv).")
flags.DEFINE_integer("workers", 1, "Preparation worker processes.")
flags.DEFINE_float("max_seconds", 10.0, "Clips longer than this are cut when preparing.")
flags.DEFINE_bool("keep_checkpoints", False, "Keep every epoch's weights of a finished fold "
                  "(default: only the last epoch's; the WA / adapted models, predictions and "
                  "summary are kept either way; EfficientNet-B0 writes ~50 MB an epoch).")

PATHS = {**TRAINING, "input": PathFlag(LISTING, folder_ok=False),
         "audio_root": PathFlag(FOLDER), "label_csv": PathFlag(LABEL_CSV),
         "data_dir": PathFlag(OUT_DIR, overwrite="resume"),
         "exp_dir": PathFlag(OUT_DIR, overwrite="resume")}


def main(argv: list[str] | None = None):
    """psla-cross-validate (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf.data.records import DataError
    from psla_tf.training import cross_validation as cv
    from psla_tf.training.flags import config_from_flags
    if not FLAGS.input:
        raise DataError("--input (a CSV with a group column) is required")
    if not FLAGS.exp_dir:
        raise DataError("--exp_dir is required")
    cfg = config_from_flags()
    if cfg.teacher_scores and cfg.teacher_scores != "stored":  # read before any fold is made
        from psla_tf.data.teacher import load_teacher
        load_teacher(cfg.teacher_scores.split(","))
    result = cv.cross_validate(
        cfg, FLAGS.input, fold_column=FLAGS.fold_column, folds=FLAGS.folds,
        data_dir=FLAGS.data_dir or os.path.join(FLAGS.exp_dir, "data"),
        audio_root=FLAGS.audio_root, label_csv=FLAGS.label_csv, workers=FLAGS.workers,
        max_seconds=FLAGS.max_seconds,
        target_length=FLAGS.target_length or params.TARGET_LENGTH,
        group_regex=FLAGS.group_regex,
        val_groups=0 if FLAGS.val_fraction else FLAGS.val_groups,
        val_fraction=FLAGS.val_fraction, val_seed=FLAGS.val_seed,
        keep_checkpoints=FLAGS.keep_checkpoints)
    print(cv.report(result))


if __name__ == "__main__":
    main()
