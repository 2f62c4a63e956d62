"""tools/import_psla_checkpoint.py: the ``psla-import-checkpoint`` command (psla_tf/cli/import_checkpoint.py); both take the same
flags (``--help``)."""
from psla_tf.cli.import_checkpoint import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
