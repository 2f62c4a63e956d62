"""tools/evaluate.py: the ``psla-evaluate`` command (psla_tf/cli/evaluate.py); both take the same
flags (``--help``)."""
from psla_tf.cli.evaluate import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
