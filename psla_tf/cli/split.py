"""Reproducible train/val/test splits of a listing (datafile JSON, AudioSet CSV, plain CSV,
audio folder), stratified by the rarest label, optionally grouped (speakers) or by folds.

Examples:
  python tools/split.py --input=all.csv --val_fraction=0.1 --test_fraction=0.1 --seed=0 \\
      --output_prefix=lists/esc
  python tools/split.py --input=esc50.csv --fold_column=fold --test_fold=1 --val_fold=2 \\
      --output_prefix=lists/f1
  # a speaker held out for test, whole other speakers (20 % of the rest) for validation
  python tools/split.py --input=fsdd.csv --fold_column=speaker --test_fold=theo \\
      --val_fraction=0.2 --output_prefix=lists/fsdd
  python tools/split.py --audio_folder=fsdd_by_digit --test_fraction=0.1667 --val_fraction=0 \\
      --group_regex='^\\d+_([a-z]+)_' --output_prefix=lists/fsdd
Writes {prefix}_train.EXT, {prefix}_val.EXT, {prefix}_test.EXT (EXT = json for datafiles,
csv otherwise; empty splits are not written) and, for CSV/folder input, {prefix}_labels.csv
(the vocabulary of the whole listing, for make_tfrecords --label_csv).
"""

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import LISTING, OUT_PREFIX, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Listing to split (.json datafile, AudioSet CSV, plain CSV).")
flags.DEFINE_string("audio_folder", None, "Instead of --input: class sub-folder layout.")
flags.DEFINE_enum("input_format", "auto", ["auto", "datafile", "audioset", "csv", "folder"],
                  "Format of --input.")
flags.DEFINE_string("output_prefix", None, "Output DIR/name; writes DIR/name_train.csv etc.")
flags.DEFINE_float("val_fraction", 0.1, "Fraction of clips for validation: whole groups "
                   "(--group_regex / --fold_column) when groups are given; with --test_fold a "
                   "fraction of the clips outside the test fold. 0 = none.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_float("test_fraction", 0.1, "Fraction of clips for test (whole groups when "
                   "groups are given); ignored with --test_fold.", lower_bound=0, upper_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed (same seed + same listing → same split).")
flags.DEFINE_string("group_regex", None, "Regex on the file name; clips with the same match "
                    "(group 1 if present) stay in one split, e.g. '^\\d+_([a-z]+)_' (FSDD speaker).")
flags.DEFINE_string("fold_column", None, "CSV column holding each clip's group (ESC-50 'fold', "
                    "a speaker or session column); splits keep groups whole.")
flags.DEFINE_string("test_fold", None, "Group(s) of --fold_column / --group_regex used as the "
                    "test set (comma-separated).")
flags.DEFINE_string("val_fold", None, "Group(s) of --fold_column / --group_regex used as the "
                    "validation set (comma-separated; instead of --val_fraction).")

PATHS = {"input": PathFlag(LISTING), "audio_folder": PathFlag(LISTING),
         "output_prefix": PathFlag(OUT_PREFIX)}


def main(argv: list[str] | None = None):
    """psla-split (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf.data import sources, splits
    from psla_tf.data.records import DataError, write_label_csv
    if bool(FLAGS.input) == bool(FLAGS.audio_folder):
        raise DataError("give exactly one of --input or --audio_folder")
    if not FLAGS.output_prefix:
        raise DataError("--output_prefix is required")
    src = FLAGS.audio_folder or FLAGS.input
    fmt = "folder" if FLAGS.audio_folder else FLAGS.input_format
    if fmt == "auto":
        fmt = sources.detect_format(src)
    header = None
    if fmt == "csv":
        rows, header = sources.read_plain_csv(src)
    else:
        rows = sources.read_rows(src, fmt, audio_dir=".")
    val_fraction = 0.0 if FLAGS.val_fold is not None else FLAGS.val_fraction
    test_fraction = 0.0 if FLAGS.test_fold is not None else FLAGS.test_fraction
    parts = splits.make_splits(rows, val_fraction, test_fraction, FLAGS.seed,
                               FLAGS.group_regex, FLAGS.fold_column, FLAGS.test_fold,
                               FLAGS.val_fold)
    ext = "json" if fmt == "datafile" else "csv"
    for name, part in parts.items():
        if part:
            path = f"{FLAGS.output_prefix}_{name}.{ext}"
            splits.write_split(part, fmt, path, src, header)
            print(f"{name}: {len(part)} clips → {path}")
    if fmt in ("csv", "folder"):
        write_label_csv(f"{FLAGS.output_prefix}_labels.csv",
                        *sources.build_vocabulary(rows))


if __name__ == "__main__":
    main()
