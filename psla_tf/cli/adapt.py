"""A trained tagger adapted to a new speaker, microphone or room from unlabelled recordings
of it: every BatchNorm layer's statistics re-estimated on those clips (AdaBN; psla_tf/models/
adaptation.py); with --epochs, a single-label tagger's BatchNorm scale and offset then by
information maximisation and SHOT's pseudo-labels on them; every other weight unchanged → a
``.keras`` model that predict / evaluate / export take.

Examples:
  python tools/adapt.py --model=exp/fsdd --data='data/fsdd_test-*.tfrecord' \\
      --epochs=10 --output=exp/fsdd/adapted_theo.keras
  python tools/adapt.py --model=exp/fsdd --data=recordings/ --output=adapted/model.keras
      # recordings/new_speaker/*.wav: a folder of sub-folders, labels not needed
  python tools/predict.py --model=exp/fsdd/adapted_theo.keras \\
      --data='data/fsdd_test-*.tfrecord' --output=theo.npz
"""
import os
import sys

from absl import flags

from psla_tf import cli, params
from psla_tf.cli.paths import DATA, FOLDER, LABEL_CSV, MODEL, OUT_FILE, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A .keras tagger, a training run's folder (its "
                    "wa_model.keras, else final_model.keras) or a checkpoints/epoch_NNN."
                    "weights.h5 of a run (not a SavedModel: adapt before exporting).")
flags.DEFINE_string("data", None, "Recordings of the new domain, labels not used: TFRecord "
                    "shards (glob) or a listing of audio files (datafile .json, CSV, or a "
                    "folder of sub-folders of audio files, any names).")
flags.DEFINE_string("output", None, "The adapted model (.keras, written atomically); a "
                    "labels.csv is written beside it when none is there.")
flags.DEFINE_string("label_csv", None, "Class map of the model (default: the labels.csv beside "
                    "the model / in its run folder).")
flags.DEFINE_integer("batch_size", 100, "Clips per statistics batch (the statistics are the "
                     "clip-weighted mean over batches of each batch's mean and variance).",
                     lower_bound=2)
flags.DEFINE_integer("epochs", 0, "Single-label taggers (--loss=ce): after the statistics, "
                     "adapt the BatchNorm scale and offset by this many epochs of information "
                     "maximisation over the clips (at most 1,000, a uniform sample beyond; "
                     "assumes they cover the classes roughly evenly). 0: statistics only. "
                     "configs/fsdd.flags uses 10.", lower_bound=0)
flags.DEFINE_float("pseudo_label_weight", params.PSEUDO_LABEL_WEIGHT, "With --epochs: the "
                   "weight β of SHOT's pseudo-label term (each clip labelled by the nearest "
                   "class centroid of the clips' embeddings, every epoch). 0: information "
                   "maximisation alone.", lower_bound=0)
flags.DEFINE_enum("pseudo_labels", params.PSEUDO_LABELS[0], list(params.PSEUDO_LABELS),
                  "With --epochs and --pseudo_label_weight > 0: centroid, each clip takes its "
                  "nearest class centroid (SHOT); balanced, the same similarities assigned so "
                  "that the clips spread evenly over the classes (Sinkhorn-Knopp; lower on FSDD's "
                  "validation speakers, docs/fsdd_recipe.md).")
flags.DEFINE_enum("scope", params.ADAPT_SCOPES[0], list(params.ADAPT_SCOPES), "With "
                  "--epochs: what information maximisation adapts: batchnorm, the BatchNorm scale and offset "
                  "(configs/fsdd.flags' choice); encoder, every backbone weight, the attention "
                  "head fixed (SHOT's choice; no better on FSDD's validation speakers, "
                  "docs/fsdd_recipe.md).")
flags.DEFINE_float("learning_rate", params.IM_LEARNING_RATE, "With --epochs: Adam's "
                   "learning rate (1e-3 for --scope=batchnorm; lower, e.g. 1e-4, for "
                   "--scope=encoder).", lower_bound=0)
flags.DEFINE_integer("min_clips", 16, "Fewer clips than this are refused (their statistics "
                     "are too noisy to replace the training data's).", lower_bound=2)
flags.DEFINE_string("audio_dir", None, "AudioSet CSV listings: folder holding the clips.")
flags.DEFINE_string("filename_pattern", "{YTID}.wav", "AudioSet CSV listings: file name of a "
                    "clip ({YTID}, {start}, {end}, {start:d}).")
flags.DEFINE_bool("allow_cut_clips", False, "Accept shards whose clips were cut at "
                  "preparation to less than 90 % of the model's input.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
PATHS = {"model": PathFlag(MODEL), "data": PathFlag(DATA), "label_csv": PathFlag(LABEL_CSV),
         "audio_dir": PathFlag(FOLDER), "output": PathFlag(OUT_FILE)}


def main(argv: list[str] | None = None):
    """psla-adapt (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import atomic, prediction
    from psla_tf.models.adaptation import MAX_IM_CLIPS, BatchNormAdapter, is_single_label
    from psla_tf.data.records import DataError, write_label_csv
    from psla_tf.models.loading import (ModelLoadError, is_saved_model, load_tagger,
                                        load_vocabulary)
    for name in ("model", "data", "output"):
        if not getattr(FLAGS, name):
            raise DataError(f"--{name} is required")
    if not FLAGS.output.endswith(".keras"):
        raise DataError(f"--output {FLAGS.output!r}: the adapted model is a .keras file")
    if is_saved_model(FLAGS.model):
        raise ModelLoadError(f"{FLAGS.model!r} is an exported SavedModel: adapt the Keras "
                             "model (its run folder or .keras file), then export the result")
    model = load_tagger(FLAGS.model)
    mids, names = load_vocabulary(FLAGS.model, FLAGS.label_csv)
    if FLAGS.epochs and not is_single_label(model):
        raise ModelLoadError(f"{FLAGS.model}: --epochs (information maximisation) needs a "
                             "single-label tagger (trained with --loss=ce)")
    try:
        adapter = BatchNormAdapter(model, mids, names,
                                   keep_clips=MAX_IM_CLIPS if FLAGS.epochs else 0)
    except ValueError as e:
        raise ModelLoadError(f"{FLAGS.model}: {e}") from None
    # the adapter as a scorer: predict streams the shards / audio files through it (on an
    # error the process ends and the model in memory is dropped, nothing is written)
    preds = prediction.predict(adapter, FLAGS.data, FLAGS.batch_size, FLAGS.progress,
                               allow_cut_clips=FLAGS.allow_cut_clips, ignore_labels=True,
                               audio_dir=FLAGS.audio_dir, filename_pattern=FLAGS.filename_pattern)
    try:
        clips = adapter.finish(FLAGS.min_clips)
    except ValueError as e:
        raise DataError(f"--data {FLAGS.data}: {e}") from None
    if FLAGS.epochs:
        kept, losses = adapter.maximise_information(
            FLAGS.epochs, progress=FLAGS.progress,
            pseudo_label_weight=FLAGS.pseudo_label_weight, scope=FLAGS.scope,
            learning_rate=FLAGS.learning_rate, pseudo_labels=FLAGS.pseudo_labels)
        print(f"information maximisation ({FLAGS.scope}) on {kept} clips: loss {losses[0]:.4f} "
              f"→ {losses[-1]:.4f} over {FLAGS.epochs} epochs")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    os.makedirs(out_dir, exist_ok=True)
    with atomic.atomic_path(FLAGS.output, ".keras") as tmp:
        model.save(tmp)
    labels = os.path.join(out_dir, "labels.csv")
    if not os.path.exists(labels):
        write_label_csv(labels, mids, names)
    for clip_id, reason in preds.failures:
        print(f"skipped {clip_id}: {reason}", file=sys.stderr)
    what = "scale and offset" if FLAGS.scope == "batchnorm" else "encoder weights"
    im = f", {what} by {FLAGS.epochs} IM epochs" if FLAGS.epochs else ""
    print(f"wrote {FLAGS.output}: BatchNorm statistics of {clips} clips of {FLAGS.data}{im}"
          + (f"; {len(preds.failures)} clips skipped" if preds.failures else ""))


if __name__ == "__main__":
    main()
