"""Audio listing → 16-kHz int16 TFRecord shards + manifest (paper Sec. II-C data format).

Examples:
  python tools/make_tfrecords.py --input=train.json --label_csv=class_labels_indices.csv \\
      --output_prefix=out/train --num_shards=8 --workers=2
  python tools/make_tfrecords.py --input=balanced_train_segments.csv --audio_dir=audio \\
      --filename_pattern='{YTID}_{start:d}.flac' --label_csv=class_labels_indices.csv \\
      --output_prefix=out/bal
  # your own data: one sub-folder per class, 20 % held out for test (stratified by class)
  python tools/make_tfrecords.py --audio_folder=my_sounds --test_fraction=0.2 \\
      --output_prefix=data/mine
  # FSD50K: 30-s model input (3000 frames); clips are kept up to 30 s
  python tools/make_tfrecords.py --input=fsd50k_dev.json --label_csv=fsd50k_labels.csv \\
      --target_length=3000 --output_prefix=data/fsd50k_train --num_shards=64
  # a CSV path,label,speaker; test on one speaker, validate on another (groups by a column)
  python tools/make_tfrecords.py --input=fsdd.csv --fold_column=speaker --test_fold=theo \\
      --val_fold=jackson --output_prefix=data/fsdd
  # or: whole speakers (by file name) as 20 % validation / 20 % test
  python tools/make_tfrecords.py --audio_folder=fsdd_by_digit --group_regex='_([a-z]+)_' \\
      --val_fraction=0.2 --test_fraction=0.2 --output_prefix=data/fsdd

Beside the shards: {prefix}.manifest.json (counts, fbank statistics, failures) and, for
uncompressed shards, {prefix}.index.npz (every record's length and labels: the random access
the default i.i.d. training order reads; docs/architecture.md, "TFRecord schema").

Without --label_csv the vocabulary is written to labels.csv in the output folder
(index,mid,display_name; mid = the label as written, e.g. the class folder's name) and
reused by later runs into the same folder. With a split (--test_fraction / --val_fraction /
--fold_column / --test_fold / --val_fold) the shard sets are {prefix}_train, {prefix}_val, {prefix}_test, each with its
own manifest (clip counts, coverage, fbank statistics).
"""
import os
import sys

from absl import flags

from psla_tf import cli, params
from psla_tf.cli.paths import FOLDER, LABEL_CSV, LISTING, OUT_PREFIX, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Listing: PSLA datafile .json, AudioSet segment CSV, or a "
                    "plain CSV with path,labels columns (extra columns kept for splitting).")
flags.DEFINE_string("audio_folder", None, "Instead of --input: a folder whose sub-folders are "
                    "classes (single-label).")
flags.DEFINE_enum("input_format", "auto", ["auto", "datafile", "audioset", "csv", "folder"],
                  "Format of --input (auto: .json → datafile, YTID header → audioset, else csv).")
flags.DEFINE_string("audio_dir", None, "AudioSet CSV: folder holding the clips.")
flags.DEFINE_string("filename_pattern", "{YTID}.wav", "AudioSet CSV: file name of a clip; "
                    "{YTID}, {start}, {end} (as written in the CSV), {start:d}/{start_int} (int).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name. Without it: "
                    "labels.csv in the output folder if present, else the sorted set of labels "
                    "seen, written there.")
flags.DEFINE_string("output_prefix", None, "Output DIR/name: shards "
                    "{prefix}-NNNNN-of-NNNNN.tfrecord and {prefix}.manifest.json ({prefix}_train "
                    "etc. with a split).")
flags.DEFINE_integer("num_shards", 1, "Number of shards per set (row i → shard i % num_shards).",
                     lower_bound=1)
flags.DEFINE_integer("workers", 1, "Worker processes.", lower_bound=1)
flags.DEFINE_float("max_seconds", None, "Clips longer than this are cut. Default: the model "
                   "input of --target_length frames, at least 10 s (AudioSet's clips): 10.58 s "
                   "for 1056 frames, 30.02 s for FSD50K's 3000, so training's --target_length "
                   "sees whole clips. main.py refuses data cut shorter than its input.")
flags.DEFINE_enum("compression", "", ["", "GZIP"], "TFRecord compression.")
flags.DEFINE_bool("strict", False, "Exit non-zero if any clip failed.")
flags.DEFINE_bool("no_stats", False, "Skip the fbank normalisation statistics.")
flags.DEFINE_integer("target_length", params.TARGET_LENGTH, "Frames per clip of the model "
                     "(training's --target_length: 1056 AudioSet, 3000 FSD50K): what the "
                     "statistics cover and, by default, where clips are cut.", lower_bound=1)
flags.DEFINE_float("val_fraction", 0.0, "Split: fraction of clips for a validation set "
                   "(stratified by the rarest label; whole groups of --group_regex / "
                   "--fold_column; with --test_fold a fraction of the clips outside it; 0 = none).",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_float("test_fraction", 0.0, "Split: fraction of clips for a test set (whole "
                   "groups when groups are given; 0 = none).", lower_bound=0, upper_bound=1)
flags.DEFINE_integer("split_seed", 0, "Split: random seed (same seed + listing → same split).")
flags.DEFINE_string("group_regex", None, "Split: clips whose file names give the same match "
                    "(group 1 if any) stay together, e.g. '^\\d+_([a-z]+)_' (FSDD speaker).")
flags.DEFINE_string("fold_column", None, "Split by a CSV column (ESC-50 'fold', a speaker or "
                    "session column): its values are groups; rows of --test_fold → test, of "
                    "--val_fold → val, fractions take whole groups of the rest, the rest → train.")
flags.DEFINE_string("test_fold", None, "Split: the group(s) (--fold_column value or "
                    "--group_regex match; comma-separated) of the test set.")
flags.DEFINE_string("val_fold", None, "Split: the group(s) (--fold_column value or "
                    "--group_regex match; comma-separated) of the validation set.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
PATHS = {"input": PathFlag(LISTING), "audio_folder": PathFlag(LISTING),
         "audio_dir": PathFlag(FOLDER), "label_csv": PathFlag(LABEL_CSV),
         "output_prefix": PathFlag(OUT_PREFIX)}


def default_max_seconds(target_length: int) -> float:
    """The model input of ``target_length`` frames in seconds ((T - 1) * 10 ms + 25 ms), at
    least 10 s."""
    samples = (target_length - 1) * params.FRAME_SHIFT + params.FRAME_LENGTH
    return max(10.0, samples / params.SAMPLE_RATE)


def _remove_new_files(prefix: str, before: set[str], also: tuple[str, ...] = ()) -> None:
    """Remove the files named ``{prefix}...`` (and ``also``) that were not in the folder
    ``before``."""
    folder, base = os.path.split(os.path.abspath(prefix))
    for name in os.listdir(folder):
        if (name.startswith(base) or name in also) and name not in before:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.remove(path)


def main(argv: list[str] | None = None):
    """psla-prepare (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf.data import prepare, sources, splits
    from psla_tf.data.records import DataError
    manifests = []
    try:
        if bool(FLAGS.input) == bool(FLAGS.audio_folder):
            raise DataError("give exactly one of --input or --audio_folder")
        if not FLAGS.output_prefix:
            raise DataError("--output_prefix is required (DIR/name)")
        src = FLAGS.audio_folder or FLAGS.input
        fmt = "folder" if FLAGS.audio_folder else FLAGS.input_format
        rows = sources.read_rows(src, fmt, FLAGS.audio_dir, FLAGS.filename_pattern)
        split = (FLAGS.val_fraction or FLAGS.test_fraction or FLAGS.fold_column
                 or FLAGS.test_fold is not None or FLAGS.val_fold is not None)
        parts = (splits.make_splits(rows, FLAGS.val_fraction, FLAGS.test_fraction,
                                    FLAGS.split_seed, FLAGS.group_regex, FLAGS.fold_column,
                                    FLAGS.test_fold, FLAGS.val_fold)
                 if split else {"": rows})
        max_seconds = (FLAGS.max_seconds if FLAGS.max_seconds is not None
                       else default_max_seconds(FLAGS.target_length))
        out_dir = os.path.dirname(os.path.abspath(FLAGS.output_prefix))
        before = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
        mids, names, where = sources.output_vocabulary(rows, FLAGS.label_csv, out_dir)
        sources.check_rows(rows, mids, src)
        print(where)
        for name, part in parts.items():
            prefix = f"{FLAGS.output_prefix}_{name}" if name else FLAGS.output_prefix
            if name:
                print(f"{name}: {len(part)} clips → {prefix}-*")
            m = prepare.prepare(
                part, (mids, names), prefix, num_shards=FLAGS.num_shards,
                workers=FLAGS.workers, max_seconds=max_seconds,
                compression=FLAGS.compression, strict=FLAGS.strict,
                stats=not FLAGS.no_stats, target_length=FLAGS.target_length,
                progress=FLAGS.progress)
            failed = prepare.nothing_prepared(m, src)
            if failed:  # nothing usable: no empty set left behind
                _remove_new_files(prefix, before, also=("labels.csv",))
                raise DataError(failed)
            manifests.append((prefix, m))
            print(prepare.summary_line(m))
            if m.failures:
                print(f"failures listed in {prefix}.failures.csv", file=sys.stderr)
    except prepare.PreparationFailed as e:  # --strict and clips failed: a failed run, 1
        print(prepare.summary_line(e.manifest))
        cli.fail(e)
        return 1
    return 0


if __name__ == "__main__":
    main()
