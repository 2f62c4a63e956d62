"""tools/make_fsdd_mixtures.py: the ``psla-make-fsdd-mixtures`` command (psla_tf/cli/make_fsdd_mixtures.py); both take the same
flags (``--help``)."""
from psla_tf.cli.make_fsdd_mixtures import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
