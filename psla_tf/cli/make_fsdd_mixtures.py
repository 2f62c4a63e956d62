"""Build the real-audio multi-label set (FSDD digit mixtures) and prepare its TFRecords.

  python tools/make_fsdd_mixtures.py --fsdd_dir=../shared/data/fsdd/recordings --out=data/fsddmix

writes ``OUT/audio`` (wavs, datafiles, labels.csv) and ``OUT/shards/{train,eval}-*.tfrecord``
with manifests (see psla_tf/data/fsdd_mixtures.py for the set's definition).

With ``--val_speakers`` a validation split of its own speakers is made too
(``OUT/shards/val-*``): train, validation and test (eval) speakers are disjoint, so a model
chosen on validation has heard none of the test speakers, e.g.

  python tools/make_fsdd_mixtures.py --fsdd_dir=../shared/data/fsdd/recordings \\
      --out=data/fsddmix3 --train_speakers=george,jackson,lucas --val_speakers=nicolas \\
      --num_train=1500 --num_val=400
"""
import os

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import FOLDER, OUT_DIR, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("fsdd_dir", None, "FSDD recordings folder ({digit}_{speaker}_{n}.wav).")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("num_train", 2000, "Training clips.", lower_bound=1)
flags.DEFINE_integer("num_eval", 600, "Evaluation clips.", lower_bound=1)
flags.DEFINE_list("train_speakers", ["george", "jackson", "lucas", "nicolas"],
                  "Speakers of the training clips.")
flags.DEFINE_list("eval_speakers", ["theo", "yweweler"], "Speakers of the evaluation clips.")
flags.DEFINE_list("val_speakers", [], "Speakers of a validation split (none by default); "
                  "disjoint from the train and eval speakers.")
flags.DEFINE_integer("num_val", 400, "Validation clips (with --val_speakers).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the set.")
flags.DEFINE_float("clip_seconds", 3.0, "Clip length.")
flags.DEFINE_integer("max_digits", 3, "Digits per clip: 1..max_digits (2: an easier set, class "
                     "prior ~0.15 instead of ~0.20).", lower_bound=1, upper_bound=10)
flags.DEFINE_integer("target_length", 298, "Frames the fbank statistics cover.", lower_bound=1)
flags.DEFINE_integer("workers", 2, "Preparation worker processes.", lower_bound=1)
PATHS = {"fsdd_dir": PathFlag(FOLDER), "out": PathFlag(OUT_DIR, overwrite="resume")}


def main(argv: list[str] | None = None):
    """psla-make-fsdd-mixtures (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf.data import fsdd_mixtures, prepare, records, sources
    from psla_tf.errors import DataError
    if not FLAGS.fsdd_dir or not FLAGS.out:
        raise DataError("--fsdd_dir and --out are required")
    counts = {"train": FLAGS.num_train, "eval": FLAGS.num_eval}
    speakers = {"train": FLAGS.train_speakers, "eval": FLAGS.eval_speakers}
    if FLAGS.val_speakers:
        counts["val"], speakers["val"] = FLAGS.num_val, FLAGS.val_speakers
    if min(counts.values()) < 1 or FLAGS.clip_seconds <= 0 or FLAGS.workers < 1:
        raise DataError("--num_train, --num_eval, --num_val and --workers must be >= 1, "
                        "--clip_seconds > 0")
    # shards of another speaker split or clip count in OUT would be stale: refuse them
    import json
    spec_path = os.path.join(FLAGS.out, "shards", "splits.json")
    spec = {"counts": counts, "speakers": speakers, "seed": FLAGS.seed,
            "clip_seconds": FLAGS.clip_seconds}
    if FLAGS.max_digits != fsdd_mixtures.MAX_DIGITS:
        spec["max_digits"] = FLAGS.max_digits
    if os.path.exists(spec_path):
        try:
            with open(spec_path) as f:
                same = json.load(f) == json.loads(json.dumps(spec))
        except ValueError:
            same = False
        if not same:
            raise DataError(f"{FLAGS.out}/shards holds shards of another split "
                            f"({spec_path}): use a new --out")
    elif FLAGS.val_speakers and any(
            os.path.exists(records.manifest_path(os.path.join(FLAGS.out, "shards", s)))
            for s in ("train", "eval")):  # shards of the tool's train/eval-only versions
        raise DataError(f"{FLAGS.out}/shards holds train/eval shards made without "
                        "--val_speakers: use a new --out")
    try:
        paths = fsdd_mixtures.generate(
            os.path.join(FLAGS.out, "audio"), FLAGS.fsdd_dir, counts=counts, splits=speakers,
            seed=FLAGS.seed, clip_seconds=FLAGS.clip_seconds, max_digits=FLAGS.max_digits)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"--fsdd_dir {FLAGS.fsdd_dir}: {e}") from None
    os.makedirs(os.path.dirname(spec_path), exist_ok=True)
    from psla_tf import atomic
    atomic.write_json(spec_path, spec, indent=1)
    vocab = records.read_label_csv(paths["label_csv"])
    for split in counts:
        prefix = os.path.join(FLAGS.out, "shards", split)
        if not os.path.exists(records.manifest_path(prefix)):
            rows = sources.read_datafile(paths[split])
            prepare.prepare(rows, vocab, prefix, num_shards=2, workers=FLAGS.workers,
                            max_seconds=FLAGS.clip_seconds,
                            target_length=FLAGS.target_length, progress=True)
        print(f"{split}: {prefix}-*.tfrecord")


if __name__ == "__main__":
    main()
