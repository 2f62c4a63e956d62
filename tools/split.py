"""tools/split.py: the ``psla-split`` command (psla_tf/cli/split.py); both take the same
flags (``--help``)."""
from psla_tf.cli.split import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
