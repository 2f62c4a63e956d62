"""Offline weight averaging (paper Sec. VI-A): the equal average of all weights — BatchNorm
moving statistics included — of saved epoch checkpoints of one run, saved as one model.
From a run folder the BatchNorm statistics are then re-estimated on the run's training
batches as the trainer does for ``wa_model.keras`` (``--bn_batches``; default the run's
``--wa_bn_batches``), so ``--epochs=WA_START-WA_END`` rebuilds ``wa_model.keras``.

Examples:
  python tools/average_weights.py --checkpoints='exp/full/checkpoints/epoch_02?.weights.h5' \\
      --output=exp/full/wa_20-29.keras
  python tools/average_weights.py --checkpoints=exp/full --epochs=16-30 --output=wa.keras
"""
import os
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import OUT_FILE, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Comma-separated checkpoints (.weights.h5 inside a run "
                    "folder, or .keras files) and/or globs; or a run folder with --epochs.")
flags.DEFINE_string("epochs", None, "With a run folder: inclusive 1-based epoch range A-B "
                    "(checkpoints/epoch_NNN.weights.h5).")
flags.DEFINE_string("output", None, "Averaged model: .keras (whole model; labels.csv written "
                    "beside it) or .weights.h5 (weights only).")
flags.DEFINE_integer("bn_batches", None, "With a run folder: training batches of the run "
                     "(its flags.txt) that re-estimate the BatchNorm statistics; default the "
                     "run's --wa_bn_batches (100 where its flags.txt has none); 0 keeps the "
                     "averaged statistics.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
# --checkpoints mixes globs, files and a run folder: checked by _paths()
PATHS = {"output": PathFlag(OUT_FILE)}


def _paths():
    import glob
    from psla_tf import run_folder
    from psla_tf.data.records import DataError
    items = [p.strip() for p in FLAGS.checkpoints.split(",") if p.strip()]
    if FLAGS.epochs:
        if len(items) != 1 or not os.path.isdir(items[0]):
            raise DataError("--epochs needs --checkpoints=RUN_FOLDER (one folder)")
        try:
            a, b = (int(x) for x in FLAGS.epochs.split("-"))
        except ValueError:
            raise DataError(f"--epochs must be A-B, got {FLAGS.epochs!r}") from None
        if not 1 <= a <= b:
            raise DataError(f"--epochs needs 1 <= A <= B, got {FLAGS.epochs}")
        paths = [run_folder.checkpoint_path(items[0], e) for e in range(a, b + 1)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DataError(f"{len(missing)} checkpoints missing: {', '.join(missing[:3])}")
        return paths
    paths = []
    for it in items:
        found = sorted(glob.glob(it)) if any(c in it for c in "*?[") else [it]
        if not found:
            raise DataError(f"no checkpoint matches {it!r}")
        paths.extend(found)
    return paths


def main(argv: list[str] | None = None):
    """psla-average-weights (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import atomic, run_folder
    from psla_tf.data.records import DataError, write_label_csv
    from psla_tf.errors import PslaError
    from psla_tf.ensemble import average_checkpoints
    from psla_tf.models.loading import find_label_csv, load_vocabulary
    if not FLAGS.checkpoints or not FLAGS.output:
        raise DataError("--checkpoints and --output are required")
    if not FLAGS.output.endswith((".keras", ".weights.h5")):
        raise DataError("--output must end in .keras or .weights.h5")
    paths = _paths()
    if FLAGS.bn_batches and not FLAGS.epochs:
        raise DataError("--bn_batches needs --checkpoints=RUN_FOLDER with --epochs (the run's "
                        "flags.txt names its training data)")
    model = average_checkpoints(paths, progress=FLAGS.progress)
    bn = 0
    if FLAGS.epochs and FLAGS.bn_batches != 0:
        from psla_tf.training.trainer import refresh_run_batchnorm
        try:
            bn = refresh_run_batchnorm(model, FLAGS.checkpoints.strip().rstrip(","),
                                       FLAGS.bn_batches)
        except PslaError as e:
            raise DataError(f"{e} (the BatchNorm statistics are re-estimated on the run's "
                            "training data; --bn_batches=0 keeps the averaged ones)") from None
    vocab = load_vocabulary(paths[0]) if find_label_csv(paths[0]) else None
    out = os.path.abspath(FLAGS.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    suffix = ".keras" if out.endswith(".keras") else ".weights.h5"
    with atomic.atomic_path(out, suffix) as tmp:  # Keras wants the suffix
        if suffix == ".keras":
            model.save(tmp)
        else:
            model.save_weights(tmp)
    print(f"averaged {len(paths)} checkpoints ({os.path.basename(paths[0])} … "
          f"{os.path.basename(paths[-1])})"
          + (f", BatchNorm statistics from {bn} training batches" if bn else "") + f" → {out}")
    if suffix == ".keras" and vocab is not None:
        labels = run_folder.path(os.path.dirname(out), run_folder.LABELS_FILE)
        if not os.path.exists(labels):
            write_label_csv(labels, *vocab)
            print(f"wrote {labels}")
        elif load_vocabulary(out)[0] != vocab[0]:
            print(f"warning: {labels} is not the class map of these checkpoints",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
