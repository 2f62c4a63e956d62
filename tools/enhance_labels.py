"""tools/enhance_labels.py: the ``psla-enhance-labels`` command (psla_tf/cli/enhance_labels.py); both take the same
flags (``--help``)."""
from psla_tf.cli.enhance_labels import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
