"""Report what the training pipeline draws: class frequency (Fig. 5) and unseen examples (Fig. 6).

Runs psla_tf.data.pipeline.make_train_dataset itself (not a simulation) and writes
class_frequency.csv, unseen.csv, class_frequency.png and unseen.png to --out_dir.

  python tools/sampling_report.py --train_data='data/train-*.tfrecord' --epochs=30 \
      --balanced_sampling --mixup=0.5 --out_dir=reports/sampling
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("train_data", None, "Glob of training TFRecord shards.")
flags.DEFINE_integer("epochs", 5, "Epochs to draw.")
flags.DEFINE_float("mixup", 0.0, "Mixup rate (0.5 in the paper).")
flags.DEFINE_bool("balanced_sampling", True, "Balanced sampling (Algorithm 1; the full-AudioSet "
                  "and FSD50K recipes use it). --nobalanced_sampling: plain shuffled epochs.")
flags.DEFINE_string("out_dir", None, "Output folder.")
flags.DEFINE_integer("batch_size", 100, "Batch size (sets the steps per epoch).")
flags.DEFINE_integer("seed", 0, "Pipeline seed.")
flags.DEFINE_integer("shuffle_buffer", 1000, "Shuffle buffer (records).")
flags.mark_flags_as_required(["train_data", "out_dir"])


def main(argv):
    del argv
    import tensorflow as tf
    from psla_tf.data import report
    from psla_tf.data.pipeline import data_error_from
    from psla_tf.data.records import DataError
    try:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        r = report.sampling_report(FLAGS.train_data, FLAGS.epochs, mixup=FLAGS.mixup,
                                   balanced_sampling=FLAGS.balanced_sampling,
                                   batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                                   shuffle_buffer=FLAGS.shuffle_buffer)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except tf.errors.OpError as e:
        err = data_error_from(e)
        print(f"error: {err or e.message}", file=sys.stderr)
        return 1
    tally = r["tally"]
    observed = tally.observed_class_frequency()
    report.write_class_frequency_csv(os.path.join(FLAGS.out_dir, "class_frequency.csv"),
                                     r["spec"], r["expected"], observed)
    report.write_unseen_csv(os.path.join(FLAGS.out_dir, "unseen.csv"), tally.unseen)
    title = (f"(balanced={FLAGS.balanced_sampling}, mixup={FLAGS.mixup})")
    report.plot_report(FLAGS.out_dir, r["spec"], r["expected"], observed, tally.unseen, title)
    print(f"{r['spec'].num_examples} examples, {FLAGS.epochs} epochs: unseen after the last "
          f"epoch {100 * tally.unseen[-1]:.1f}%; wrote {FLAGS.out_dir}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
