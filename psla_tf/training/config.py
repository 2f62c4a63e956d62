"""The training run's settings: :class:`TrainConfig` (TensorFlow-free, so that the flag
definitions and ``--help`` load no TensorFlow). ``psla_tf.training.flags`` maps main.py's flags
onto it; ``psla_tf.training.trainer`` runs it.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

from psla_tf import params


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; defaults = the paper's full-AudioSet recipe."""
    train_data: str | None = None
    eval_data: str | None = None
    val_data: str | None = None
    exp_dir: str | None = None
    n_epochs: int = 30
    batch_size: int = 100
    eval_batch_size: int = 100
    lr: float = 1e-4
    warmup_steps: int = 1000
    warmup_every: int = 50
    lrscheduler_start: int = 10
    lrscheduler_step: int = 5
    lrscheduler_decay: float = 0.5
    wa: bool = True
    wa_start: int = 16
    wa_end: int = 30
    balanced_sampling: bool = True
    sampling_order: str = "iid"
    mixup: float = params.MIXUP
    mixup_alpha: float = params.MIXUP_ALPHA
    random_gain_db: float = 0.0
    random_speed: float = 0.0
    freqm: int = params.FREQM
    timem: int = params.TIMEM
    target_length: int = params.TARGET_LENGTH
    clip_samples: int | None = None
    allow_cut_clips: bool = False
    dataset_mean: float | None = None
    dataset_std: float | None = None
    model: str = "efficientnet"
    eff_b: int = 2
    att_head: int = 4
    pretrained: str = "imagenet"
    stem_init: str = "random"
    backbone_init: str = "auto"
    bn_momentum: float = 0.99
    loss: str = "bce"
    metric: str = "map"
    init_from: str | None = None
    freeze_backbone_epochs: int = 0
    teacher_scores: str | None = None
    kd_lambda: float = 0.5
    kd_temperature: float = 1.0
    append_classes: bool = False
    retain_eval_data: str | None = None
    shuffle_buffer: int = 1000
    seed: int = 0
    strategy: str = "auto"
    tpu: str | None = None
    mixed_precision: str = "none"
    jit_compile: bool = False
    fbank_dft: str = "auto"
    clip_norm: str = "none"
    sync_batchnorm: bool = True
    deterministic: bool = False
    skip_corrupt_records: bool = False
    save_predictions: bool = True
    resume: bool = True
    dry_run: bool = False
    demo: bool = False
    demo_dir: str = "demo_data"
    verbose: int | None = None   # None: fit_verbosity() chooses


def fit_verbosity(verbose: int | None, stream: TextIO | None = None) -> int:
    """Keras ``fit`` verbosity: ``verbose`` when given, else 1 (the progress bar) when
    ``stream`` (default stdout) is a terminal and 2 (one line per epoch) when it is redirected
    to a file or a pipe, where the bar's carriage returns and escape codes would fill the log."""
    if verbose is not None:
        return verbose
    stream = sys.stdout if stream is None else stream
    try:
        return 1 if stream.isatty() else 2
    except (AttributeError, ValueError):  # no isatty / a closed stream
        return 2
