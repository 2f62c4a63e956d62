"""A released PSLA PyTorch checkpoint (.pth state dict) → a psla_tf tagger (.keras).

The reference's EffNetAttention (efficientnet_pytorch EfficientNet-B{b} with a 1-channel
stem, mean / single-head / multi-head attention pooling) is rebuilt with psla_tf's layers and
every tensor is mapped onto it (psla_tf/models/torch_import.py; table in docs/checkpoint_import.md). Any
missing, unexpected or mis-shaped tensor is an error listing them; nothing is loaded partially.
The output is a waveform → scores tagger like a training run's final_model.keras, with
labels.csv beside it, ready for tools/predict.py, tools/evaluate.py and tools/export.py.

Needs the optional extra: pip install -r requirements-import.txt (CPU torch,
efficientnet_pytorch).

Example (the authors' AudioSet model, EfficientNet-B2 + 4 heads):
  python tools/import_psla_checkpoint.py --checkpoint=audioset_0.4440.pth \\
      --label_csv=class_labels_indices.csv --output=imported/audioset_b2/model.keras
"""
import os

from absl import flags

from psla_tf import cli, params
from psla_tf.cli.paths import LABEL_CSV, OUT_FILE, TORCH, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "The reference's .pth state dict (keys like "
                    "module.effnet._conv_stem.weight; the module. prefix is optional).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name of the "
                    "checkpoint's classes (AudioSet: class_labels_indices.csv, 527 classes).")
flags.DEFINE_string("output", None, "Output .keras file; labels.csv is written beside it.")
flags.DEFINE_integer("eff_b", None, "EfficientNet-B variant 0-7 (default: inferred from the "
                     "checkpoint; the released models are B2).", lower_bound=0, upper_bound=7)
flags.DEFINE_integer("att_head", None, "Pooling: 0 mean, 1 single-head attention, > 1 "
                     "multi-head (default: inferred from the checkpoint; released models: 4).",
                     lower_bound=0)
flags.DEFINE_integer("target_length", params.TARGET_LENGTH, "Input frames of the model "
                     "(the reference's AudioSet models: 1056, FSD50K: 3000).", lower_bound=1)
flags.DEFINE_float("dataset_mean", params.DATASET_MEAN, "Fbank normalisation mean the "
                   "checkpoint was trained with (the reference's AudioSet value).")
flags.DEFINE_float("dataset_std", params.DATASET_STD, "Fbank normalisation std the "
                   "checkpoint was trained with (the reference's AudioSet value).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (and its labels.csv).")
PATHS = {"checkpoint": PathFlag(TORCH), "label_csv": PathFlag(LABEL_CSV),
         "output": PathFlag(OUT_FILE, overwrite="refuse")}


def _flag_problem() -> str | None:
    """What is wrong with the flags alone (checked before TensorFlow is loaded)."""
    for name in ("checkpoint", "label_csv", "output"):
        if not getattr(FLAGS, name):
            return f"--{name} is required"
    if not FLAGS.output.endswith(".keras"):
        return f"--output must end in .keras, got {FLAGS.output!r}"
    if os.path.exists(FLAGS.output) and not FLAGS.overwrite:
        return f"{FLAGS.output} exists (pass --overwrite to replace it)"
    for name in ("checkpoint", "label_csv"):
        if not os.path.isfile(getattr(FLAGS, name)):
            return f"--{name} {getattr(FLAGS, name)!r} does not exist"
    return None


def main(argv: list[str] | None = None):
    """psla-import-checkpoint (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    problem = _flag_problem()
    if problem:
        from psla_tf.errors import DataError
        raise DataError(problem)
    from psla_tf.data.records import DataError, read_label_csv, write_label_csv
    from psla_tf.models import torch_import
    from psla_tf.models.loading import LABELS_FILE
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    labels_path = os.path.join(out_dir, LABELS_FILE)
    mids, names = read_label_csv(FLAGS.label_csv)
    if not FLAGS.overwrite:
        if os.path.exists(labels_path) and read_label_csv(labels_path) != (mids, names):
            raise DataError(f"{labels_path} exists with another vocabulary; choose another "
                            "folder for --output (or pass --overwrite)")
    model = torch_import.import_checkpoint(
        FLAGS.checkpoint, len(mids), eff_b=FLAGS.eff_b, att_head=FLAGS.att_head,
        target_length=FLAGS.target_length, dataset_mean=FLAGS.dataset_mean,
        dataset_std=FLAGS.dataset_std)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(FLAGS.output)}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, FLAGS.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_label_csv(labels_path, mids, names)
    classifier = model.get_layer("classifier")
    print(f"imported {FLAGS.checkpoint} ({torch_import.describe(classifier)}, "
          f"{len(torch_import.tensor_mapping(classifier))} tensors, "
          f"{model.count_params():,} parameters) → {FLAGS.output} (+ {labels_path})")


if __name__ == "__main__":
    main()
