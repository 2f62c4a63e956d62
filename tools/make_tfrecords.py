"""Audio listing → 16-kHz int16 TFRecord shards + manifest (paper Sec. II-C data format).

Examples:
  python tools/make_tfrecords.py --input=train.json --label_csv=class_labels_indices.csv \\
      --output_prefix=out/train --num_shards=8 --workers=2
  python tools/make_tfrecords.py --input=balanced_train_segments.csv --audio_dir=audio \\
      --filename_pattern='{YTID}_{start:d}.flac' --label_csv=class_labels_indices.csv \\
      --output_prefix=out/bal
  python tools/make_tfrecords.py --audio_folder=recordings_by_digit --output_prefix=out/fsdd
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from psla_tf import params  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Listing: PSLA datafile .json, AudioSet segment CSV, or a "
                    "plain CSV with path,labels columns.")
flags.DEFINE_string("audio_folder", None, "Instead of --input: a folder whose sub-folders are "
                    "classes (single-label).")
flags.DEFINE_enum("input_format", "auto", ["auto", "datafile", "audioset", "csv", "folder"],
                  "Format of --input (auto: .json → datafile, YTID header → audioset, else csv).")
flags.DEFINE_string("audio_dir", None, "AudioSet CSV: folder holding the clips.")
flags.DEFINE_string("filename_pattern", "{YTID}.wav", "AudioSet CSV: file name of a clip; "
                    "{YTID}, {start}, {end} (as written in the CSV), {start:d}/{start_int} (int).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name. Without it the "
                    "vocabulary is the sorted set of labels seen, written to "
                    "{output_prefix}.labels.csv.")
flags.DEFINE_string("output_prefix", None, "Output DIR/name: shards "
                    "{prefix}-NNNNN-of-NNNNN.tfrecord and {prefix}.manifest.json.")
flags.DEFINE_integer("num_shards", 1, "Number of shards (row i → shard i % num_shards).")
flags.DEFINE_integer("workers", 1, "Worker processes.")
flags.DEFINE_float("max_seconds", 10.0, "Clips longer than this are cut.")
flags.DEFINE_enum("compression", "", ["", "GZIP"], "TFRecord compression.")
flags.DEFINE_bool("strict", False, "Exit non-zero if any clip failed.")
flags.DEFINE_bool("no_stats", False, "Skip the fbank normalisation statistics.")
flags.DEFINE_integer("target_length", params.TARGET_LENGTH, "Frames per clip the statistics "
                     "cover (training's target_length).")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def main(argv):
    del argv
    from psla_tf.data import prepare, sources
    from psla_tf.data.records import DataError, write_label_csv
    try:
        if bool(FLAGS.input) == bool(FLAGS.audio_folder):
            raise DataError("give exactly one of --input or --audio_folder")
        if not FLAGS.output_prefix:
            raise DataError("--output_prefix is required (DIR/name)")
        src = FLAGS.audio_folder or FLAGS.input
        fmt = "folder" if FLAGS.audio_folder else FLAGS.input_format
        rows = sources.read_rows(src, fmt, FLAGS.audio_dir, FLAGS.filename_pattern)
        vocab = sources.build_vocabulary(rows, FLAGS.label_csv)
        sources.check_rows(rows, vocab[0], src)
        if not FLAGS.label_csv:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_prefix)), exist_ok=True)
            write_label_csv(FLAGS.output_prefix + ".labels.csv", *vocab)
        manifest = prepare.prepare(
            rows, vocab, FLAGS.output_prefix, num_shards=FLAGS.num_shards,
            workers=FLAGS.workers, max_seconds=FLAGS.max_seconds,
            compression=FLAGS.compression, strict=FLAGS.strict, stats=not FLAGS.no_stats,
            target_length=FLAGS.target_length, progress=FLAGS.progress)
    except prepare.PreparationFailed as e:
        print(prepare.summary_line(e.manifest))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(prepare.summary_line(manifest))
    if manifest.failures:
        print(f"failures listed in {FLAGS.output_prefix}.failures.csv", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
