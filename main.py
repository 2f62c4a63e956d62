"""main.py: the ``psla-train`` command (psla_tf/cli/train.py): train a PSLA audio tagger.

  python main.py --flagfile=configs/demo.flags          # synthetic demo, CPU, minutes
  python main.py --help                                  # the training flags
"""
from psla_tf.cli.train import FLAGS, main  # noqa: F401

if __name__ == "__main__":
    main()
