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
        strategy.extended._in_multi_worker_mode()  # noqa: SLF001


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
    from tensorflow.python.framework import config  # no public disable
    if on:
        tf.config.experimental.enable_op_determinism()
    elif config.is_op_determinism_enabled():
        config.disable_op_determinism()


def synchronise_batchnorm(model) -> int:
    """Make every BatchNormalization layer of ``model`` (nested models too) use the batch
    statistics of the global batch under a multi-replica strategy; returns how many."""
    import keras
    patch_keras_sync_moments()
    n = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            n += 1
    return n


def patch_keras_multi_worker_reduce() -> None:
    """Work around Keras 3.15's ``reduce_per_replica`` under MultiWorkerMirroredStrategy.

    Keras reduces the train step's logs (scalars: the loss, metric results) with
    ``strategy.reduce("MEAN", v, axis=0)`` in multi-worker mode, which fails for a scalar
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are reduced with
    ``axis=None`` instead (the mean over replicas, what ``axis=0`` does for batched values);
    everything else goes to Keras' own function unchanged. Idempotent.
    """
    warm_keras_saving_skipsets()  # the other gap met by every multi-worker run (see there)
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer
    original = keras_tf_trainer.reduce_per_replica
    if getattr(original, "_psla_patched", False):
        return
    import tensorflow as tf

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            def _reduce(v):
                # one local replica: strategy.run returns plain tensors, not PerReplica
                parts = (strategy.experimental_local_results(v)
                         if isinstance(v, tf.distribute.DistributedValues) else [v])
                if all(getattr(t, "shape", None) is not None and t.shape.rank == 0
                       for t in parts):
                    return strategy.reduce("MEAN", v, axis=None)
                return original(v, strategy, reduction)
            return tf.nest.map_structure(_reduce, values)
        return original(values, strategy, reduction)

    reduce_per_replica._psla_patched = True
    keras_tf_trainer.reduce_per_replica = reduce_per_replica


def warm_keras_saving_skipsets() -> None:
    """Let ``model.save`` run on the chief alone under MultiWorkerMirroredStrategy.

    Keras 3.15's ``saving_lib.get_attr_skipset`` builds reference objects (an
    ``Optimizer(1.0)``, whose constructor creates variables) on every save: it caches the
    result under ``saving_attr_skipset_*`` but looks it up under ``saving_attr_skiplist_*``.
    Inside a MultiWorkerMirroredStrategy scope a new variable's initial value is broadcast
    from the chief (a collective), so a save made by the chief only — the weight-averaged
    model, the final model — waits for the other workers forever (or until they exit: the
    run dies with "CollectiveBcastSend ... tasks have crashed"). The sets are computed here,
    outside any strategy scope, and stored under the key the lookup uses. Must be called
    outside ``strategy.scope()``. Idempotent."""
    import tensorflow as tf
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib
    if tf.distribute.has_strategy():
        raise RuntimeError("warm_keras_saving_skipsets must run outside strategy.scope()")
    for obj_type in ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer",
                     "Loss"):
        key = f"saving_attr_skiplist_{obj_type}"
        if global_state.get_global_attribute(key, None) is None:
            global_state.set_global_attribute(key, saving_lib.get_attr_skipset(obj_type))


def patch_keras_sync_moments() -> None:
    """Two-pass synchronised BatchNorm moments (Keras 3.15 computes E[x²] − E[x]², which
    loses the variance to cancellation when |mean| ≫ std, e.g. on the constant padded frames
    of short clips). Mean = all-reduced sum / count, then variance = all-reduced
    Σ(x − mean)² / count: the single-device numbers up to summation order. Idempotent."""
    from keras.src.backend.tensorflow import nn as keras_tf_nn
    if getattr(keras_tf_nn._compute_moments_sync, "_psla_patched", False):  # noqa: SLF001
        return
    import tensorflow as tf

    def _compute_moments_sync(x, axes, keepdims):
        ctx = tf.distribute.get_replica_context()
        if not ctx:
            return tf.nn.moments(x, axes, keepdims=keepdims)
        count = tf.reduce_sum(tf.ones_like(x), axis=axes, keepdims=True)
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                      [tf.reduce_sum(x, axis=axes, keepdims=True), count])
        mean = tf.math.divide_no_nan(total, count)
        sq = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                            tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True))
        variance = tf.math.divide_no_nan(sq, count)
        if not keepdims:
            mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        return mean, variance

    _compute_moments_sync._psla_patched = True
    keras_tf_nn._compute_moments_sync = _compute_moments_sync  # noqa: SLF001
