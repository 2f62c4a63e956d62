"""tools/add_teacher_scores.py: the ``psla-add-teacher-scores`` command (psla_tf/cli/add_teacher_scores.py); both take the same
flags (``--help``)."""
from psla_tf.cli.add_teacher_scores import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
