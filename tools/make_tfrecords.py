"""tools/make_tfrecords.py: the ``psla-prepare`` command (psla_tf/cli/prepare.py); both take the same
flags (``--help``)."""
from psla_tf.cli.prepare import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
