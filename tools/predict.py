"""tools/predict.py: the ``psla-predict`` command (psla_tf/cli/predict.py); both take the same
flags (``--help``)."""
from psla_tf.cli.predict import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
