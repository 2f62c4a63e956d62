"""tools/infer.py: the ``psla-infer`` command (psla_tf/cli/infer.py); both take the same
flags (``--help``)."""
from psla_tf.cli.infer import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
