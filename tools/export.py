"""tools/export.py: the ``psla-export`` command (psla_tf/cli/export.py); both take the same
flags (``--help``)."""
from psla_tf.cli.export import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
