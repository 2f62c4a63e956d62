"""Report what the training pipeline draws, next to what i.i.d. draws give: class frequency
(Fig. 5), unseen examples with and without mixup (Fig. 6), and the order (repeats inside a
batch, spacing of a clip's copies, copies and partner uses per clip).

Runs psla_tf.data.pipeline.make_train_dataset itself (not a simulation) and writes to
--out_dir: class_frequency.csv, unseen.csv, order.csv, histograms.csv, class_frequency.png,
unseen.png; with --stream_csv also the stream itself (epoch,position,id,partner per example,
in training order).

  python tools/sampling_report.py --train_data='data/train-*.tfrecord' --epochs=30 \\
      --balanced_sampling --mixup=0.5 --out_dir=reports/sampling --stream_csv=stream.csv
"""
import os

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import OUT_DIR, OUT_FILE, SHARDS, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("train_data", None, "Glob of training TFRecord shards.")
flags.DEFINE_integer("epochs", 5, "Epochs to draw.", lower_bound=1)
flags.DEFINE_float("mixup", 0.5, "Mixup rate (main.py's default, the paper's 0.5; 0 without "
                   "mixup).", lower_bound=0, upper_bound=1)
flags.DEFINE_bool("balanced_sampling", True, "Balanced sampling (Algorithm 1; the full-AudioSet "
                  "and FSD50K recipes use it). --nobalanced_sampling: plain shuffled epochs.")
flags.DEFINE_enum("sampling_order", "iid", ["iid", "stream"], "The training order to report "
                  "(main.py's --sampling_order): iid (default; random access) or stream "
                  "(sequential reading + --shuffle_buffer).")
flags.DEFINE_string("out_dir", None, "Output folder.")
flags.DEFINE_string("stream_csv", None, "Also write the training stream: one row "
                    "epoch,position,id,partner per example in training order (epochs from 1, "
                    "positions from 0 within the epoch; partner empty when not mixed).")
flags.DEFINE_integer("batch_size", 100, "Batch size (sets the steps per epoch).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Pipeline seed.")
flags.DEFINE_integer("shuffle_buffer", 1000, "Shuffle buffer (records; stream order only).",
                     lower_bound=1)
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
PATHS = {"train_data": PathFlag(SHARDS, many=True), "out_dir": PathFlag(OUT_DIR, overwrite="merge"),
         "stream_csv": PathFlag(OUT_FILE)}


def main(argv: list[str] | None = None):
    """psla-sampling-report (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf.data import report
    from psla_tf.data.records import DataError
    if not FLAGS.train_data or not FLAGS.out_dir:
        raise DataError("--train_data and --out_dir are required")
    if FLAGS.epochs < 1 or FLAGS.batch_size < 1 or not 0 <= FLAGS.mixup <= 1:
        raise DataError("--epochs and --batch_size must be >= 1, --mixup in [0, 1]")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    try:
        r = report.sampling_report(FLAGS.train_data, FLAGS.epochs, mixup=FLAGS.mixup,
                                   balanced_sampling=FLAGS.balanced_sampling,
                                   batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                                   shuffle_buffer=FLAGS.shuffle_buffer,
                                   sampling_order=FLAGS.sampling_order,
                                   stream_csv=FLAGS.stream_csv, progress=FLAGS.progress)
    except ValueError as e:  # a DataError, or a value the pipeline refuses
        cli.fail(e)
        return 2
    tally = r["tally"]
    out = FLAGS.out_dir
    observed = tally.observed_class_frequency()
    report.write_class_frequency_csv(os.path.join(out, "class_frequency.csv"), r["spec"],
                                     r["expected"], observed)
    report.write_unseen_csv(os.path.join(out, "unseen.csv"), tally.unseen,
                            without_mixup=tally.unseen_without_mixup,
                            expected=r["expected_unseen"],
                            expected_without_mixup=r["expected_unseen_without_mixup"])
    report.write_order_csv(os.path.join(out, "order.csv"), tally)
    report.write_histograms_csv(os.path.join(out, "histograms.csv"), tally)
    title = (f"(balanced={FLAGS.balanced_sampling}, mixup={FLAGS.mixup:g}, "
             f"{FLAGS.sampling_order})")
    report.plot_report(out, r["spec"], r["expected"], observed, tally.unseen, title,
                       unseen_without_mixup=tally.unseen_without_mixup,
                       expected_unseen=r["expected_unseen"],
                       expected_unseen_without_mixup=r["expected_unseen_without_mixup"],
                       mixup=FLAGS.mixup)
    print(summary_text(r, FLAGS.epochs, FLAGS.mixup))
    print(f"wrote {out}" + (f" and {FLAGS.stream_csv}" if FLAGS.stream_csv else ""))
    return 0


def summary_text(r: dict, epochs: int, mixup: float) -> str:
    """A few lines: unseen fractions and the order statistics of the last epoch vs i.i.d."""
    t = r["tally"]
    lines = [f"{r['spec'].num_examples} examples, {epochs} epochs of {r['draws']} draws:"]
    lines.append(f"  unseen after epoch {epochs}: {100 * t.unseen_without_mixup[-1]:.2f} % "
                 f"without mixup (i.i.d. {100 * r['expected_unseen_without_mixup'][-1]:.2f} %)"
                 + (f", {100 * t.unseen[-1]:.2f} % with mixup {mixup:g} (i.i.d. "
                    f"{100 * r['expected_unseen'][-1]:.2f} %)" if mixup > 0 else ""))
    e = t.epochs[-1]
    lines.append(f"  last epoch: repeat pairs inside a batch {e['repeat_pairs']} (i.i.d. "
                 f"{e['repeat_pairs_expected']:.1f}), most copies of a clip in one batch "
                 f"{e['max_copies_in_batch']}")
    if "gap_ratio_mean" in e:
        lines.append(f"  spacing of a clip's first two copies / i.i.d. mean: "
                     f"{e['gap_ratio_mean']:.3f} (i.i.d. 1); within one batch "
                     f"{100 * e['gap_within_batch']:.2f} % (i.i.d. "
                     f"{100 * e['gap_within_batch_expected']:.2f} %); KS p "
                     f"{_p(e['gap_ks_pvalue'])}")
    lines.append(f"  copies per clip vs Binomial(L, p_i): chi-square p {_p(e['copies_pvalue'])}"
                 + (f"; partner uses vs Binomial(M, 1/N): p {_p(e['partners_pvalue'])}"
                    if "partners_pvalue" in e else ""))
    return "\n".join(lines)


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    main()
