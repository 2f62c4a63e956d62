"""Store a teacher's scores in training shards (knowledge distillation at scale, issue 19).

    python tools/add_teacher_scores.py --data='data/bal_train-*.tfrecord' \
        --teacher_scores=scores/ens_train.npz --output=data/bal_train_kd
    python main.py --flagfile=configs/mobile_b0.flags --train_data='data/bal_train_kd-*.tfrecord' \
        --teacher_scores=stored ...

Copies every shard of ``--data`` to ``{output}-i-of-n`` with one feature added per record,
``teacher`` (float list: the raw teacher values of the clip, averaged over the score files
that list its id; absent when none does), every other feature byte-identical and the records
in the same order; then writes the record index and, last, the manifest with a ``teacher``
entry (kind, classes, sources with SHA-256, clips with / without a score). Each shard and the
manifest are written atomically, so a killed run leaves no partial output a reader would take
(run it again). Training then reads the targets with the records: no lookup per step, for any
set size (AudioSet: 2 M clips x 527 classes add ~2 kB per 320-kB clip).
"""
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import OUT_PREFIX, SCORES, SHARDS, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Training shards (glob; the manifest beside them).")
flags.DEFINE_string("teacher_scores", None, "Teacher score files FILE[,FILE...] (.npz of "
                    "tools/predict.py / tools/ensemble.py: ids + scores, or ids + logits); "
                    "several are averaged per clip.")
flags.DEFINE_string("output", None, "Output shard prefix (new shards + manifest + index).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
PATHS = {"data": PathFlag(SHARDS, many=True),
         "teacher_scores": PathFlag(SCORES, many=True, what="teacher scores"),
         "output": PathFlag(OUT_PREFIX)}


def main(argv: list[str] | None = None):
    """psla-add-teacher-scores (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    from psla_tf.data.records import DataError
    from psla_tf.data.teacher_shards import add_teacher_scores
    for name in ("data", "teacher_scores", "output"):
        if not getattr(FLAGS, name):
            raise DataError(f"--{name} is required")
    man = add_teacher_scores(FLAGS.data, FLAGS.teacher_scores.split(","), FLAGS.output,
                             progress=FLAGS.progress)
    t = man.extra["teacher"]
    n = t["with_teacher"] + t["without_teacher"]
    print(f"wrote {man.path}: {len(man.shards)} shards, teacher scores ({t['kind']}, "
          f"{t['classes']} classes) for {t['with_teacher']} of {n} clips"
          + (f"; {t['without_teacher']} without (they train on labels only)"
             if t["without_teacher"] else ""))
    return 0


if __name__ == "__main__":
    main()
