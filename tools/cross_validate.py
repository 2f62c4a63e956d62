"""tools/cross_validate.py: the ``psla-cross-validate`` command (psla_tf/cli/cross_validate.py); both take the same
flags (``--help``)."""
from psla_tf.cli.cross_validate import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
