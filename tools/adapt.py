"""tools/adapt.py: the ``psla-adapt`` command (psla_tf/cli/adapt.py); both take the same flags
(``--help``)."""
from psla_tf.cli.adapt import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
