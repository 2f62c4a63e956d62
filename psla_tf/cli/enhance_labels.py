"""Ontology-based label enhancement of a training set (paper Sec. V, Algorithm 2).

    python tools/enhance_labels.py --train_data=train.json --label_csv=labels.csv \
        --scores=teacher_scores.npz --ontology=ontology.json \
        --threshold=mean --fix=both --output=train_le.json

``--train_data``: a listing as tools/make_tfrecords.py reads it (a PSLA datafile JSON, an
AudioSet segment CSV, a plain CSV with a path column and a labels column, e.g. ESC-50's
``filename,fold,target,category,…``; written back with only the labels changed) or a TFRecord
glob (then ``--output`` is the new shard prefix). ``--scores``: an .npz with ``ids``,
``scores`` [N, C] and optionally ``targets``, matched to the clips by id.
"""

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import DATA, JSON, LABEL_CSV, OUT_FILE, SCORES, PathFlag
from psla_tf import label_enhancement as le
from psla_tf.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("train_data", None, "Datafile (.json / .csv) or TFRecord shard glob.")
flags.DEFINE_string("scores", None, "Teacher scores .npz (ids, scores, optional targets).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name (needed for "
                    "datafiles; checked against the manifest for TFRecords).")
flags.DEFINE_string("ontology", None, "AudioSet-format ontology.json.")
flags.DEFINE_enum("threshold", "mean", list(le.THRESHOLD_MODES),
                  "Per-class threshold: mean, median or the 25th/10th/5th percentile of the "
                  "teacher's scores on the clips originally labelled with the class.")
flags.DEFINE_enum("fix", "both", list(le.FIX_TYPES),
                  "type1: add children, type2: add ancestors, both: the union.")
flags.DEFINE_string("output", None, "Enhanced datafile (same format) or TFRecord prefix.")
flags.DEFINE_string("report", None, "Report path without extension (default {output}.report); "
                    ".json and .md are written.")
flags.DEFINE_integer("top", 20, "How many top (source → added) pairs to report.", lower_bound=0)
flags.mark_flags_as_required(["train_data", "scores", "ontology", "output"])
PATHS = {"train_data": PathFlag(DATA, folder_ok=False), "scores": PathFlag(SCORES),
         "label_csv": PathFlag(LABEL_CSV), "ontology": PathFlag(JSON, what="ontology"),
         "output": PathFlag(OUT_FILE), "report": PathFlag(OUT_FILE)}


def main(argv: list[str] | None = None):
    """psla-enhance-labels (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    try:
        report = le.run_enhancement(FLAGS.train_data, FLAGS.scores, FLAGS.ontology,
                                    FLAGS.output, label_csv=FLAGS.label_csv,
                                    threshold=FLAGS.threshold, fix=FLAGS.fix,
                                    report_path=FLAGS.report, top=FLAGS.top)
    except (DataError, ValueError) as e:
        cli.fail(e)
        return 2
    print(le.report_markdown(report))
    print(f"wrote {report['output']} and {', '.join(report['report_files'])}")
    return 0


if __name__ == "__main__":
    main()
