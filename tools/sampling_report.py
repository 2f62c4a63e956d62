"""tools/sampling_report.py: the ``psla-sampling-report`` command (psla_tf/cli/sampling_report.py); both take the same
flags (``--help``)."""
from psla_tf.cli.sampling_report import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
