"""Shards that carry a listing's real label sets and silent 25-ms clips: what the sampling
stream depends on (labels), without the audio. For tools/sampling_report.py at the scale of a
real label distribution (docs/decisions.md, "The stream, inspected": Fig. 6 on AudioSet's
balanced_train labels).

  python benchmarks/label_shards.py \\
      --segments=/work/shared/data/audioset/balanced_train_segments.csv \\
      --label_csv=/work/shared/data/audioset/class_labels_indices.csv \\
      --output_prefix=/tmp/fig6/bal_labels --num_shards=16
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("segments", None, "AudioSet segment CSV (YTID, start, end, labels) or any "
                    "listing tools/make_tfrecords.py reads (only ids and labels are used).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name.")
flags.DEFINE_string("output_prefix", None, "Output shards {prefix}-NNNNN-of-NNNNN.tfrecord.")
flags.DEFINE_integer("num_shards", 16, "Shards (row i → shard i % num_shards).")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from psla_tf.data import records, sources
    rows = sources.read_rows(FLAGS.segments, "auto", audio_dir=".",
                             filename_pattern="{YTID}.wav")
    mids, names = records.read_label_csv(FLAGS.label_csv)
    sources.check_rows(rows, mids, FLAGS.segments)
    index = {m: i for i, m in enumerate(mids)}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_prefix)), exist_ok=True)
    n = FLAGS.num_shards
    counts = np.zeros(len(mids), np.int64)
    shards = []
    silent = np.zeros(400, "<i2")
    for s in range(n):
        path = records.shard_name(FLAGS.output_prefix, s, n)
        part = rows[s::n]
        with tf.io.TFRecordWriter(path) as w:
            for r in part:
                labels = sorted({index[m] for m in r.mids})
                counts[labels] += 1
                w.write(records.make_example(r.id, silent, labels, [mids[k] for k in labels]))
        shards.append({"file": os.path.basename(path), "num_examples": len(part)})
    records.Manifest(num_examples=len(rows), shards=shards, mids=mids, names=names,
                     class_counts=counts.tolist(), max_seconds=0.025, listed=len(rows)
                     ).write(records.manifest_path(FLAGS.output_prefix))
    print(f"wrote {len(rows)} label sets in {n} shards: {FLAGS.output_prefix}-*")


if __name__ == "__main__":
    flags.mark_flags_as_required(["segments", "label_csv", "output_prefix"])
    app.run(main)
