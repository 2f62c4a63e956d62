"""``main.py --demo``: generate the synthetic demo dataset and its shards once (cached)."""
from __future__ import annotations

import dataclasses
import os

from psla_tf.training.trainer import TrainConfig


def prepare_demo(cfg: TrainConfig) -> TrainConfig:
    """Create (if absent) ``demo_dir/{audio,shards}`` and point the config at the shards."""
    from psla_tf import demo
    from psla_tf.data import prepare, records, sources
    root = os.path.abspath(cfg.demo_dir)
    audio = os.path.join(root, "audio")
    shards = os.path.join(root, "shards")
    if not os.path.exists(os.path.join(audio, "eval.json")):
        demo.generate_demo_dataset(audio, seed=0)
    vocab = records.read_label_csv(os.path.join(audio, "labels.csv"))
    for split in ("train", "eval"):
        prefix = os.path.join(shards, split)
        if not os.path.exists(records.manifest_path(prefix)):
            rows = sources.read_datafile(os.path.join(audio, f"{split}.json"))
            prepare.prepare(rows, vocab, prefix, num_shards=2, workers=1,
                            max_seconds=cfg.clip_samples / 16000 if cfg.clip_samples else 10.0,
                            target_length=cfg.target_length, progress=False)
    return dataclasses.replace(
        cfg, train_data=os.path.join(shards, "train-*.tfrecord"),
        eval_data=os.path.join(shards, "eval-*.tfrecord"),
        exp_dir=cfg.exp_dir or os.path.join(root, "exp"))
