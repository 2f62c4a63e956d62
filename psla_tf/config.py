"""The training run's settings and the one flagfile reader (TensorFlow-free, so that the flag
definitions and ``--help`` load no TensorFlow).

* :class:`TrainConfig` — every setting of a run; ``psla_tf.training.flags`` maps main.py's
  flags onto it and ``psla_tf.training.trainer`` runs it;
* :func:`flagfile_text` / :func:`read_flagfile` / :func:`config_from_flagfile` — a run's
  ``flags.txt`` (``python main.py --flagfile=EXP/flags.txt`` reruns it) written and read back
  with every value typed as its field (``int | None`` flags come back as ints, not strings);
* :func:`fit_verbosity` — Keras ``fit``'s verbosity for a terminal or a log file.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, TextIO

from psla_tf import params
from psla_tf.errors import ConfigError

__all__ = ["TrainConfig", "fit_verbosity", "flagfile_text", "parse_flag_lines",
           "read_flagfile", "config_from_flags", "config_from_flagfile"]

# flags that describe how the run was started, not the run: not written to flags.txt
_UNRECORDED = ("dry_run", "demo", "demo_dir")


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
    weight_decay: float = params.WEIGHT_DECAY
    wa: bool = True
    wa_start: int = 16
    wa_end: int = 30
    wa_bn_batches: int = 100
    label_smoothing: float = 0.0
    adapt_batchnorm: bool = False
    adapt_epochs: int = 0
    adapt_pseudo_label_weight: float = params.PSEUDO_LABEL_WEIGHT
    adapt_pseudo_labels: str = params.PSEUDO_LABELS[0]
    self_train_epochs: int = 0
    self_train_lr: float = params.SELF_TRAIN_LR
    self_train_neighbours: int = 0
    self_train_alpha: float = params.SELF_TRAIN_ALPHA
    balanced_sampling: bool = True
    sampling_order: str = "iid"
    group_batches: bool = False
    records_in_memory_mb: int = params.RECORDS_IN_MEMORY_MB
    mixup: float = params.MIXUP
    mixup_alpha: float = params.MIXUP_ALPHA
    random_gain_db: float = 0.0
    random_speed: float = 0.0
    noise_prob: float = 0.0
    noise_snr_min_db: float = params.NOISE_SNR_MIN_DB
    noise_snr_max_db: float = params.NOISE_SNR_MAX_DB
    noise_decay_min_db: float = 0.0
    noise_decay_max_db: float = 0.0
    freqm: int = params.FREQM
    timem: int = params.TIMEM
    time_shift: int = 0
    trim_onset_db: float = 0.0
    vtlp: float = 0.0
    target_length: int = params.TARGET_LENGTH
    clip_samples: int | None = None
    allow_cut_clips: bool = False
    dataset_mean: float | None = None
    dataset_std: float | None = None
    model: str = "efficientnet"
    eff_b: int = 2
    cnn_width: float = 1.0
    att_head: int = 4
    pretrained: str = "imagenet"
    stem_init: str = "random"
    backbone_init: str = "auto"
    zero_init_residual: bool = True
    head_bias_init: str = "reference"
    bn_momentum: float = 0.99
    fused_batchnorm: bool = True
    pointwise_matmul: bool = True
    swish_saved_sigmoid: bool = True
    loss: str = "bce"
    metric: str = "map"
    init_from: str | None = None
    freeze_backbone_epochs: int = 0
    teacher_scores: str | None = None
    kd_lambda: float = 0.5
    kd_temperature: float = 1.0
    labelled_fraction: float = 1.0
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
    num_ceps: int = 0
    high_freq: float = 0.0
    num_mel_bins: int = params.NUM_MEL_BINS
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


# ----------------------------------------------------------------------------- flagfiles
def flagfile_text(cfg: TrainConfig) -> str:
    """A flagfile that reproduces the run (resolved values; None values left out)."""
    lines = ["# resolved flags of this run: python main.py --flagfile=flags.txt"]
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in _UNRECORDED or v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"--{f.name}" if v else f"--no{f.name}")
        else:
            lines.append(f"--{f.name}={v}")
    return "\n".join(lines) + "\n"


def parse_flag_lines(text: str) -> dict[str, str | bool]:
    """``--name=value`` / ``--name`` / ``--noname`` lines of an absl flagfile (comments and
    other lines skipped) → {name: value string, or True / False for the bare forms}. A bare
    ``--noX`` is ``X: False`` only when ``X`` is not itself a TrainConfig field named ``no…``."""
    out: dict[str, str | bool] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, eq, value = line[2:].partition("=")
        if eq:
            out[name] = value
        elif name.startswith("no") and name not in _FIELDS:
            out[name[2:]] = False
        else:
            out[name] = True
    return out


def read_flagfile(path: str) -> dict[str, str | bool]:
    """:func:`parse_flag_lines` of a file."""
    with open(path, encoding="utf-8") as f:
        return parse_flag_lines(f.read())


def _coerce(name: str, raw: str | bool, kind: Any) -> Any:
    """One flag value as its field's type (``int``, ``float``, ``bool``, ``str`` or
    ``X | None``)."""
    args = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    if args:
        if raw in ("None", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{name} is a boolean, got {raw!r}")
    if isinstance(raw, bool):
        raise ConfigError(f"--{name} needs a value (--{name}=…)")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--{name} must be {kind.__name__}, got {raw!r}") from None


def config_from_flags(values: dict[str, str | bool], source: str = "flags") -> TrainConfig:
    """A TrainConfig from flag strings (defaults for the rest); an unknown name or a value of
    the wrong type is a :class:`ConfigError` naming ``source``."""
    out = {}
    for k, raw in values.items():
        if k not in _FIELDS:
            raise ConfigError(f"{source}: unknown flag --{k}")
        try:
            out[k] = _coerce(k, raw, _TYPES[k])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return TrainConfig(**out)


def config_from_flagfile(path: str) -> TrainConfig:
    """The TrainConfig of a run's ``flags.txt`` (or any flagfile of TrainConfig's flags)."""
    return config_from_flags(read_flagfile(path), path)


_TYPES = typing.get_type_hints(TrainConfig)
_FIELDS = frozenset(_TYPES)
