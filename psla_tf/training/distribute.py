"""Scale: tf.distribute strategies, mixed precision, XLA and deterministic ops (issue 7).

PSLA's reference trains with ``torch.nn.DataParallel`` on several GPUs; here the same job runs
under a ``tf.distribute`` strategy chosen by ``--strategy``:

* ``auto`` — TPUStrategy when ``--tpu`` is given, MultiWorkerMirroredStrategy when TF_CONFIG
  names more than one task, MirroredStrategy with more than one local GPU, else the default
  (single-device) strategy;
* ``mirrored`` — every local GPU (or the local CPU devices) of one machine;
* ``multi_worker`` — MultiWorkerMirroredStrategy, the cluster read from ``TF_CONFIG``;
* ``tpu`` — TPUStrategy on ``--tpu`` (a name, a ``grpc://`` address, or ``local`` on a TPU VM).

``--batch_size`` is the global batch. Every input pipeline (one per worker) draws its own
stream (:func:`psla_tf.data.pipeline.make_train_dataset` with the ``InputContext``), and
BatchNorm statistics are synchronised over the replicas (``--sync_batchnorm``), so a run's
result does not depend on how many devices share the batch.
"""
from __future__ import annotations

import json
import os
from typing import Any

from psla_tf import compat
from psla_tf.errors import StrategyError

STRATEGIES = ("auto", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")


def tf_config() -> dict[str, Any] | None:
    """The parsed ``TF_CONFIG`` environment variable (None when unset or empty)."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict):
        raise StrategyError("TF_CONFIG needs a 'cluster' object (and a 'task')")
    return cfg


def _cluster_size(cfg: dict[str, Any] | None) -> int:
    if not cfg:
        return 0
    return sum(len(v) for k, v in cfg["cluster"].items() if k in ("chief", "worker"))


def resolve_strategy_name(name: str, tpu: str | None = None) -> str:
    """The concrete strategy ``auto`` stands for here (no TF devices are initialised)."""
    if name not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if tpu and name not in ("auto", "tpu"):
        raise StrategyError(f"--tpu={tpu} contradicts --strategy={name}")
    if name != "auto":
        return name
    if tpu:
        return "tpu"
    if _cluster_size(tf_config()) > 1:
        return "multi_worker"
    import tensorflow as tf
    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"


def check_precision(precision: str, strategy_name: str) -> None:
    """Precision flags that contradict the hardware (before anything is built)."""
    if precision not in PRECISIONS:
        raise StrategyError(f"--mixed_precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {precision!r}")
    if precision == "mixed_float16" and strategy_name == "tpu":
        raise StrategyError("TPUs compute in bfloat16: use --mixed_precision=mixed_bfloat16")


def make_strategy(name: str = "auto", tpu: str | None = None):
    """A ``tf.distribute.Strategy`` for ``--strategy`` / ``--tpu`` (see the module doc).

    Must run before any other TensorFlow op for ``multi_worker`` and ``tpu``.
    """
    import tensorflow as tf
    concrete = resolve_strategy_name(name, tpu)
    if concrete == "default":
        return tf.distribute.get_strategy()
    if concrete == "mirrored":
        return tf.distribute.MirroredStrategy()
    if concrete == "multi_worker":
        cfg = tf_config()
        if _cluster_size(cfg) < 1 or "task" not in cfg:
            raise StrategyError("--strategy=multi_worker needs TF_CONFIG with the cluster "
                                "and this process's task (see docs/scale.md)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=None if tpu in (None, "", "local") else tpu)
    if tpu not in (None, "", "local"):
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        compat.in_multi_worker_mode(strategy)


def is_chief(strategy) -> bool:
    """Whether this process writes checkpoints, logs and summary.json (the chief, task 0)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def worker_id(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if is_multi_worker(strategy) else 0


def set_precision(precision: str) -> None:
    """Keras global dtype policy: float32 or mixed float16/bfloat16 (Keras then wraps the
    optimizer in a LossScaleOptimizer for float16). The front end, attention pooling, the
    outputs and the loss compute in float32 whatever the policy (their layers pin it)."""
    import keras
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)


def set_deterministic(on: bool) -> None:
    """``tf.config.experimental.enable_op_determinism`` (bitwise-repeatable kernels), or its
    undoing: the setting is process-wide, and a second run in the same process (tools,
    tests) must not inherit it (under it Keras also turns XLA off)."""
    import tensorflow as tf
    if on:
        tf.config.experimental.enable_op_determinism()
    else:
        compat.disable_op_determinism()


def synchronise_batchnorm(model) -> int:
    """Make every BatchNormalization layer of ``model`` (nested models too) use the batch
    statistics of the global batch under a multi-replica strategy; returns how many."""
    import keras
    compat.patch_keras_sync_moments()
    n = 0
    for layer in compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            n += 1
    return n

