"""Train a PSLA audio tagger (paper Sec. II-B, VI): flags → psla_tf.training.trainer.run.

The ``psla-train`` command; ``python main.py`` is the same.

  python main.py --flagfile=configs/balanced.flags --train_data='data/bal-*.tfrecord' \\
      --eval_data='data/eval-*.tfrecord' --exp_dir=exp/balanced
  python main.py --flagfile=configs/demo.flags          # synthetic demo, CPU, minutes
  python main.py --flagfile=configs/full.flags ... --dry_run   # show the plan and exit

Exit status: 0 trained; 2 a user error (bad flags or data, one ``error:`` line, nothing
trained); 1 the run failed while training (e.g. the loss became NaN: the last good
checkpoint stays, ``--resume`` continues after a fix).
"""
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import TRAINING
from psla_tf.training import flags as train_flags

train_flags.define_flags()
FLAGS = flags.FLAGS
PATHS = TRAINING


def main(argv: list[str] | None = None):
    """psla-train (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    from psla_tf.models.backbones import PretrainedWeightsError
    from psla_tf.training import trainer
    cfg = train_flags.config_from_flags(FLAGS)
    if cfg.demo:
        from psla_tf.training.demo_data import prepare_demo
        cfg = prepare_demo(cfg)
    try:
        trainer.run(cfg)
    except PretrainedWeightsError as e:  # e.g. no network for ImageNet weights: one line
        raise PretrainedWeightsError(f"--pretrained={FLAGS.pretrained}: {e}") from e
    return 0


if __name__ == "__main__":
    main()
