"""tools/ensemble.py: the ``psla-ensemble`` command (psla_tf/cli/ensemble.py); both take the same
flags (``--help``)."""
from psla_tf.cli.ensemble import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
