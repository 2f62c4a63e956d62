"""tools/average_weights.py: the ``psla-average-weights`` command (psla_tf/cli/average_weights.py); both take the same
flags (``--help``)."""
from psla_tf.cli.average_weights import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
