"""Private TensorFlow / Keras / LiteRT APIs: the one module that touches them.

Each use is one small function below, with what it works around (an upstream bug, or no public
API for the job) and the versions it was written and tested against: TensorFlow 2.21,
Keras 3.15, ai-edge-litert 2.3 (:data:`TESTED`). Outside those versions a function warns
once (:class:`UntestedVersionWarning`, one line) and carries on; when a private name it needs
is gone it raises :class:`CompatError` rather than continue with a patch that no longer fits.
``tests/test_compat.py`` checks every workaround, and that each upstream bug still exists
(that test fails the day upstream fixes it: the workaround can then go).

TensorFlow, Keras and LiteRT are imported inside the functions: importing this module costs
nothing, and it imports nothing of psla_tf above :mod:`psla_tf.errors`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import re
import warnings
from typing import Any, Callable, Iterator

from psla_tf.errors import PslaError

__all__ = ["TESTED", "CompatError", "UntestedVersionWarning", "check_version",
           "disable_op_determinism", "in_multi_worker_mode", "flatten_layers",
           "clear_distribute_strategy", "patch_keras_multi_worker_reduce",
           "warm_keras_saving_skipsets", "patch_keras_sync_moments",
           "independent_of_global_seed", "bounded_interleave", "in_xla_context",
           "freeze_function", "prune_graph_def", "tflite_schema", "read_tflite_model",
           "write_tflite_model", "tflite_ops"]

# library → (lowest, highest) (major, minor) this module was tested with
TESTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tensorflow": ((2, 21), (2, 21)),
    "keras": ((3, 15), (3, 15)),
    "ai_edge_litert": ((2, 3), (2, 3)),
}
_WARNED: set[str] = set()


class CompatError(PslaError, RuntimeError):
    """A private API psla_tf relies on is missing from the installed TensorFlow / Keras."""


class UntestedVersionWarning(UserWarning):
    """A workaround runs on a library version it was not tested with."""


@functools.lru_cache(maxsize=None)
def installed_version(library: str) -> str:
    """``library.__version__`` ("" when it has none)."""
    return str(getattr(importlib.import_module(library), "__version__", ""))


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None


def _tested(library: str) -> str:
    (a, b), (c, d) = TESTED[library]
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b}-{c}.{d}"


def check_version(api: str, library: str) -> None:
    """Warn once per ``api`` when the installed ``library`` is outside :data:`TESTED`."""
    if api in _WARNED:
        return
    found = _major_minor(installed_version(library))
    low, high = TESTED[library]
    if found is not None and low <= found <= high:
        return
    _WARNED.add(api)
    warnings.warn(f"psla_tf.compat.{api} works around a private {library} API tested with "
                  f"{library} {_tested(library)}, found {installed_version(library) or '?'}; "
                  "run tests/test_compat.py", UntestedVersionWarning, stacklevel=3)


def _missing(api: str, library: str, what: str) -> CompatError:
    return CompatError(f"psla_tf.compat.{api}: {library} {installed_version(library)} has no "
                       f"{what} (tested with {library} {_tested(library)}: install that "
                       "version, or update psla_tf/compat.py)")


def _private(api: str, library: str, module: str, *names: str) -> Any:
    """``module`` (a private module of ``library``) after the version check; CompatError when
    it or one of ``names`` is gone."""
    check_version(api, library)
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise _missing(api, library, module) from None
    for name in names:
        if not hasattr(mod, name):
            raise _missing(api, library, f"{module}.{name}")
    return mod


# ----------------------------------------------------------------------------- TensorFlow
def disable_op_determinism() -> None:
    """Undo ``tf.config.experimental.enable_op_determinism`` (a no-op when it is off).

    No public API: TF 2.21 exports ``enable_op_determinism`` only. The setting is process-wide,
    and a second run in the same process (tools, tests) must not inherit it.
    Uses ``tensorflow.python.framework.config``; tested with TF 2.21."""
    config = _private("disable_op_determinism", "tensorflow", "tensorflow.python.framework.config",
                      "is_op_determinism_enabled", "disable_op_determinism")
    if config.is_op_determinism_enabled():
        config.disable_op_determinism()


def in_multi_worker_mode(strategy) -> bool:
    """Whether a MultiWorkerMirroredStrategy spans more than one worker.

    No public API (Keras itself reads the same private method). Uses
    ``strategy.extended._in_multi_worker_mode()``; tested with TF 2.21."""
    check_version("in_multi_worker_mode", "tensorflow")
    method = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if method is None:
        raise _missing("in_multi_worker_mode", "tensorflow",
                       f"{type(strategy.extended).__name__}._in_multi_worker_mode")
    return bool(method())


@contextlib.contextmanager
def independent_of_global_seed() -> Iterator[None]:
    """Within the block, ops are built as if no global TF seed were set; restored after.

    Works around TF 2.21's ``random_seed.get_seed``: under a global seed of 0 it compares a
    tensor-valued op seed with 0 in Python (``OperatorNotAllowedInGraphError`` while tracing).
    No public API clears and restores the global seed without resetting the op-seed counter:
    uses ``tensorflow.python.eager.context.context()._seed``; tested with TF 2.21."""
    context = _private("independent_of_global_seed", "tensorflow",
                       "tensorflow.python.eager.context", "context")
    ctx = context.context()
    if not hasattr(ctx, "_seed"):
        raise _missing("independent_of_global_seed", "tensorflow", "Context._seed")
    saved = ctx._seed  # noqa: SLF001
    ctx._seed = None
    try:
        yield
    finally:
        ctx._seed = saved


def bounded_interleave(files, map_func: Callable, cycle_length: int, block_length: int,
                       num_parallel_calls: int, buffer_output_elements: int,
                       prefetch_input_elements: int, deterministic: bool = True):
    """``files.interleave(map_func, ...)`` with the buffers set explicitly.

    ``Dataset.interleave`` has no ``buffer_output_elements`` / ``prefetch_input_elements``
    (TF 2.21 leaves them to autotuning: memory grows with the number of shards). Uses
    ``tensorflow.python.data.ops.interleave_op._ParallelInterleaveDataset``; tested with
    TF 2.21."""
    op = _private("bounded_interleave", "tensorflow", "tensorflow.python.data.ops.interleave_op",
                  "_ParallelInterleaveDataset")
    return op._ParallelInterleaveDataset(  # noqa: SLF001
        files, map_func, cycle_length, block_length, num_parallel_calls,
        buffer_output_elements=buffer_output_elements,
        prefetch_input_elements=prefetch_input_elements, deterministic=deterministic)


def in_xla_context() -> bool:
    """True while tracing for XLA (``jit_compile=True``), False otherwise.

    No public API. Uses ``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``
    on ``tf.compat.v1.get_default_graph()``; tested with TF 2.21. When the private function is
    gone it warns once and answers False (the caller's non-XLA path is correct everywhere,
    only slower under XLA)."""
    import tensorflow as tf
    check_version("in_xla_context", "tensorflow")
    try:
        cfu = _private("in_xla_context", "tensorflow", "tensorflow.python.ops.control_flow_util",
                       "GraphOrParentsInXlaContext")
        return bool(cfu.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception as e:  # noqa: BLE001 - private API moved: assume no XLA
        if "in_xla_context:missing" not in _WARNED:
            _WARNED.add("in_xla_context:missing")
            warnings.warn(f"{e}; assuming no XLA", UntestedVersionWarning, stacklevel=2)
        return False


def freeze_function(concrete):
    """``concrete`` (a ``ConcreteFunction``) with its variables turned into constants.

    Converted with the trackable object instead, TF 2.21's TFLite converter leaves Keras 3
    variables as resource variables without an initialiser (the model computes garbage); the
    TFLite graph surgery also needs constant kernels. No public API: uses
    ``tensorflow.python.framework.convert_to_constants.convert_variables_to_constants_v2``;
    tested with TF 2.21."""
    mod = _private("freeze_function", "tensorflow",
                   "tensorflow.python.framework.convert_to_constants",
                   "convert_variables_to_constants_v2")
    return mod.convert_variables_to_constants_v2(concrete)


def prune_graph_def(graph_def, input_name: str, output_names: list[str]):
    """A callable ``ConcreteFunction``-like object computing ``output_names`` of ``graph_def``
    (a ``GraphDef``) from its ``input_name`` tensor.

    TF 2 has no public way to call an edited ``GraphDef``: uses the TF 1 compatibility API
    ``tf.compat.v1.wrap_function`` and its ``prune``; tested with TF 2.21."""
    import tensorflow as tf
    check_version("prune_graph_def", "tensorflow")
    v1 = getattr(getattr(tf, "compat", None), "v1", None)
    if v1 is None or not hasattr(v1, "wrap_function"):
        raise _missing("prune_graph_def", "tensorflow", "tf.compat.v1.wrap_function")
    wrapped = v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    graph = wrapped.graph
    return wrapped.prune(graph.get_tensor_by_name(input_name),
                         [graph.get_tensor_by_name(o) for o in output_names])


# ----------------------------------------------------------------------------- TFLite
_SCHEMA_NAMES = ("BuiltinOperator", "TensorType", "BufferT", "MetadataT", "Model")


def tflite_schema():
    """The TFLite flatbuffer schema (generated Python: ``BuiltinOperator``, ``TensorType``,
    ``BufferT``, ``MetadataT``, ``Model``, ...).

    No public API: ``tensorflow.lite.python.schema_py_generated``; tested with TF 2.21."""
    return _private("tflite_schema", "tensorflow", "tensorflow.lite.python.schema_py_generated",
                    *_SCHEMA_NAMES)


def _flatbuffer_utils():
    return _private("tflite_flatbuffer_utils", "tensorflow",
                    "tensorflow.lite.tools.flatbuffer_utils",
                    "read_model_from_bytearray", "convert_object_to_bytearray")


def read_tflite_model(flat: bytes):
    """The ``.tflite`` flatbuffer ``flat`` as the schema's mutable object tree (``ModelT``).

    No public API: ``tensorflow.lite.tools.flatbuffer_utils``; tested with TF 2.21."""
    return _flatbuffer_utils().read_model_from_bytearray(bytearray(flat))


def write_tflite_model(model) -> bytearray:
    """``model`` (a ``ModelT``) serialised to ``.tflite`` bytes.

    No public API: ``tensorflow.lite.tools.flatbuffer_utils``; tested with TF 2.21."""
    return _flatbuffer_utils().convert_object_to_bytearray(model)


def tflite_ops(interpreter) -> Iterator[tuple[str, list[str]]]:
    """(op name, names of its output tensors) of every op of a LiteRT ``Interpreter``, in
    execution order (lazily: the names are looked up as the iteration reaches the op).

    No public op listing in ai-edge-litert 2.3: uses ``Interpreter._get_ops_details`` and
    ``_get_tensor_details``."""
    check_version("tflite_ops", "ai_edge_litert")
    for name in ("_get_ops_details", "_get_tensor_details"):
        if not hasattr(interpreter, name):
            raise _missing("tflite_ops", "ai_edge_litert", f"Interpreter.{name}")
    return ((op["op_name"],
             [interpreter._get_tensor_details(i, 0)["name"] for i in op["outputs"]])  # noqa: SLF001
            for op in interpreter._get_ops_details())  # noqa: SLF001


# ----------------------------------------------------------------------------- Keras
def flatten_layers(model) -> list:
    """Every layer inside ``model``, nested models' layers included (``model`` itself not).

    No public API (``model.layers`` is one level): uses ``Layer._flatten_layers``; tested
    with Keras 3.15."""
    check_version("flatten_layers", "keras")
    if not hasattr(model, "_flatten_layers"):
        raise _missing("flatten_layers", "keras", "Layer._flatten_layers")
    return list(model._flatten_layers(include_self=False, recursive=True))  # noqa: SLF001


def clear_distribute_strategy(model) -> None:
    """Make ``model.fit`` take its strategy from the enclosing ``strategy.scope()``.

    Works around Keras 3.15's ``TensorFlowTrainer._maybe_symbolic_build``: a model created in
    a strategy scope reduces the first batch (a dict of PerReplica values) across replicas
    with ``strategy.reduce`` to build itself symbolically, which MultiWorkerMirroredStrategy
    cannot do. The model must be built already. Sets ``model._distribute_strategy = None``
    (Keras then falls back to ``tf.distribute.get_strategy()``); tested with Keras 3.15."""
    check_version("clear_distribute_strategy", "keras")
    if not hasattr(model, "_distribute_strategy"):
        raise _missing("clear_distribute_strategy", "keras",
                       "TensorFlowTrainer._distribute_strategy")
    model._distribute_strategy = None  # noqa: SLF001


def patch_keras_multi_worker_reduce() -> None:
    """Work around Keras 3.15's ``reduce_per_replica`` under MultiWorkerMirroredStrategy.

    Keras reduces the train step's logs (scalars: the loss, metric results) with
    ``strategy.reduce("MEAN", v, axis=0)`` in multi-worker mode, which fails for a scalar
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are reduced with
    ``axis=None`` instead (the mean over replicas, what ``axis=0`` does for batched values);
    everything else goes to Keras' own function unchanged. Also runs
    :func:`warm_keras_saving_skipsets` (the other gap every multi-worker run meets).
    Replaces ``keras.src.backend.tensorflow.trainer.reduce_per_replica``; tested with
    Keras 3.15. Idempotent."""
    warm_keras_saving_skipsets()
    trainer = _private("patch_keras_multi_worker_reduce", "keras",
                       "keras.src.backend.tensorflow.trainer", "reduce_per_replica")
    original = trainer.reduce_per_replica
    if getattr(original, "_psla_patched", False):
        return
    import tensorflow as tf

    def reduce_per_replica(values, strategy, reduction):
        if (reduction in ("auto", "mean")
                and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                and in_multi_worker_mode(strategy)):
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
    reduce_per_replica._psla_original = original
    trainer.reduce_per_replica = reduce_per_replica


_SKIPSET_TYPES = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss")


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
    outside ``strategy.scope()``. Uses ``keras.src.saving.saving_lib`` and
    ``keras.src.backend.common.global_state``; tested with Keras 3.15. Idempotent."""
    import tensorflow as tf
    global_state = _private("warm_keras_saving_skipsets", "keras",
                            "keras.src.backend.common.global_state",
                            "get_global_attribute", "set_global_attribute")
    saving_lib = _private("warm_keras_saving_skipsets", "keras", "keras.src.saving.saving_lib",
                          "get_attr_skipset")
    if tf.distribute.has_strategy():
        raise RuntimeError("warm_keras_saving_skipsets must run outside strategy.scope()")
    for obj_type in _SKIPSET_TYPES:
        key = f"saving_attr_skiplist_{obj_type}"
        if global_state.get_global_attribute(key, None) is None:
            global_state.set_global_attribute(key, saving_lib.get_attr_skipset(obj_type))


def patch_keras_sync_moments() -> None:
    """Two-pass synchronised BatchNorm moments.

    Keras 3.15 computes the variance as E[x²] − E[x]², which loses it to cancellation when
    |mean| ≫ std (e.g. on the constant padded frames of short clips). Mean = all-reduced
    sum / count, then variance = all-reduced Σ(x − mean)² / count: the single-device numbers
    up to summation order. Replaces ``keras.src.backend.tensorflow.nn._compute_moments_sync``
    (the original is kept as ``_psla_original``); tested with Keras 3.15. Idempotent."""
    nn = _private("patch_keras_sync_moments", "keras", "keras.src.backend.tensorflow.nn",
                  "_compute_moments_sync", "moments")
    original = nn._compute_moments_sync  # noqa: SLF001
    if getattr(original, "_psla_patched", False):
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
    _compute_moments_sync._psla_original = original
    nn._compute_moments_sync = _compute_moments_sync  # noqa: SLF001
