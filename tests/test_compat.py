"""psla_tf.compat: every workaround for a private TensorFlow / Keras / LiteRT API does its job,
and every upstream bug it works around is still there.

The ``*_still_*`` tests run the unpatched upstream path and assert it still misbehaves: when one
fails, upstream has fixed the bug (or changed the code the workaround replaces) and the
workaround in psla_tf/compat.py can go (or must be rechecked). Where there is no bug but no
public API, a test checks that the public API is still missing, or that the private names
psla_tf uses are still there. Tests that need more than one replica use a one-worker
MultiWorkerMirroredStrategy (its batches are PerReplica values even with one replica) and,
for the multi-worker code paths, a faked ``_in_multi_worker_mode``; the real two-worker run is
``tests/test_distribute.py::test_multi_worker_identical_weights_chief_writes`` (slow).
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

from psla_tf import compat
from psla_tf.errors import PslaError


@pytest.fixture(scope="module")
def mwms():
    """A one-worker MultiWorkerMirroredStrategy (no TF_CONFIG: local mode, one replica)."""
    return tf.distribute.MultiWorkerMirroredStrategy()


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(compat, "_WARNED", set())


# ----------------------------------------------------------------------------- version checks
def test_installed_versions_are_the_tested_ones():
    """The environment the tests run in is the one compat.TESTED names (after an upgrade:
    run this file, then widen TESTED)."""
    for library, (low, high) in compat.TESTED.items():
        found = compat._major_minor(compat.installed_version(library))
        assert found is not None and low <= found <= high, (library, found)


def test_untested_version_warns_once(monkeypatch, fresh_warnings):
    monkeypatch.setattr(compat, "installed_version", lambda lib: "9.1.0")
    with pytest.warns(compat.UntestedVersionWarning,
                      match=r"compat.flatten_layers .* tested with keras 3.15, found 9.1.0"):
        compat.check_version("flatten_layers", "keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("flatten_layers", "keras")          # once per workaround
    with pytest.warns(compat.UntestedVersionWarning, match="in_xla_context"):
        compat.check_version("in_xla_context", "tensorflow")    # each workaround once


def test_tested_version_is_silent(monkeypatch, fresh_warnings):
    monkeypatch.setattr(compat, "installed_version",
                        {"tensorflow": "2.21.7", "keras": "3.15.0rc1"}.get)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("a", "tensorflow")
        compat.check_version("b", "keras")


def test_missing_private_api_is_one_clear_error(monkeypatch):
    from keras.src.backend.tensorflow import nn
    monkeypatch.delattr(nn, "_compute_moments_sync")
    with pytest.raises(compat.CompatError) as e:
        compat.patch_keras_sync_moments()
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, PslaError) and e.value.exit_code == 2
    assert "keras.src.backend.tensorflow.nn._compute_moments_sync" in msg
    assert "tested with keras 3.15" in msg


# ----------------------------------------------------------------------------- TensorFlow
def test_disable_op_determinism_undoes_enable():
    from tensorflow.python.framework import config
    try:
        tf.config.experimental.enable_op_determinism()
        assert config.is_op_determinism_enabled()
        compat.disable_op_determinism()
        assert not config.is_op_determinism_enabled()
        compat.disable_op_determinism()                  # off already: a no-op
        assert not config.is_op_determinism_enabled()
    finally:
        config.disable_op_determinism()


def test_tf_still_has_no_public_disable_op_determinism():
    assert hasattr(tf.config.experimental, "enable_op_determinism")
    assert not hasattr(tf.config.experimental, "disable_op_determinism")
    assert not hasattr(tf.config, "disable_op_determinism")


def test_in_multi_worker_mode(mwms, monkeypatch):
    assert compat.in_multi_worker_mode(mwms) is False         # one worker
    monkeypatch.setattr(mwms.extended, "_in_multi_worker_mode", lambda: True)
    assert compat.in_multi_worker_mode(mwms) is True


@pytest.fixture
def global_seed_restored():
    """The test may set a global seed: TF's global seed state is put back afterwards."""
    from tensorflow.python.eager import context
    ctx = context.context()
    saved = ctx._seed, getattr(ctx, "_rng", None)
    yield
    ctx._seed, ctx._rng = saved


def _shuffled(seed: int) -> list[int]:
    """A dataset shuffled with a tensor-valued seed (how the pipeline seeds its shuffles)."""
    return list(tf.data.Dataset.from_tensors(tf.constant(seed, tf.int64)).flat_map(
        lambda s: tf.data.Dataset.range(8).shuffle(8, seed=s)).as_numpy_iterator())


def test_tf_global_seed_zero_still_breaks_tensor_op_seeds(global_seed_restored):
    tf.random.set_seed(0)
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
        _shuffled(5)


def test_independent_of_global_seed(global_seed_restored):
    with compat.independent_of_global_seed():
        want = _shuffled(5)
    assert sorted(want) == list(range(8)) and want != list(range(8))
    for global_seed in (0, 1, 1234):
        tf.random.set_seed(global_seed)
        with compat.independent_of_global_seed():
            assert _shuffled(5) == want, global_seed
    tf.random.set_seed(0)
    with compat.independent_of_global_seed():
        pass
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):  # the seed 0 is back
        _shuffled(5)


def test_tf_interleave_still_has_no_buffer_arguments():
    params = inspect.signature(tf.data.Dataset.interleave).parameters
    assert "buffer_output_elements" not in params
    assert "prefetch_input_elements" not in params


def test_bounded_interleave_order():
    files = tf.data.Dataset.range(3)
    ds = compat.bounded_interleave(files,
                                   lambda i: tf.data.Dataset.range(3).map(lambda j: j + 10 * i),
                                   cycle_length=2, block_length=1,
                                   num_parallel_calls=tf.data.AUTOTUNE,
                                   buffer_output_elements=1, prefetch_input_elements=0)
    # two files open at a time, one element each in turn; the third file when one is done
    assert list(ds.as_numpy_iterator()) == [0, 10, 1, 11, 2, 12, 20, 21, 22]


def test_in_xla_context():
    seen = []

    def probe(x):
        seen.append(compat.in_xla_context())
        return x + 1

    assert compat.in_xla_context() is False                          # eager
    tf.function(probe)(tf.constant(1.0))
    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    assert seen == [False, True]


def test_in_xla_context_without_the_private_api_warns_and_says_no(monkeypatch,
                                                                 fresh_warnings):
    from tensorflow.python.ops import control_flow_util
    monkeypatch.delattr(control_flow_util, "GraphOrParentsInXlaContext")
    with pytest.warns(compat.UntestedVersionWarning, match="GraphOrParentsInXlaContext"):
        assert compat.in_xla_context() is False


# ----------------------------------------------------------------------------- TFLite
@pytest.fixture(scope="module")
def dense():
    """A tiny Keras model, its scores function and an input."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")],
                 autograph=False)
    def infer(x):
        return {"y": model(x)}

    x = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
    return model, infer.get_concrete_function(), x, model(x).numpy()


def _run_tflite(flat: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=bytes(flat))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def test_tflite_converter_still_garbles_keras_variables_given_the_trackable(dense):
    model, concrete, x, want = dense
    flat = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model).convert()
    assert not np.allclose(_run_tflite(flat, x), want, atol=1e-3)


def test_freeze_function(dense):
    _, concrete, x, want = dense
    frozen = compat.freeze_function(concrete)
    assert not frozen.graph.variables and not frozen.captured_inputs
    np.testing.assert_allclose(tf.nest.flatten(frozen(tf.constant(x)))[0], want, rtol=1e-6)
    flat = tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()
    np.testing.assert_allclose(_run_tflite(flat, x), want, rtol=1e-5, atol=1e-6)


def test_prune_graph_def(dense):
    _, concrete, x, want = dense
    frozen = compat.freeze_function(concrete)
    gd = frozen.graph.as_graph_def()
    fn = compat.prune_graph_def(gd, "x:0", [t.name for t in frozen.outputs])
    out = fn(tf.constant(x))
    np.testing.assert_allclose(np.asarray(out[0] if isinstance(out, list) else out), want,
                               rtol=1e-6)


@pytest.fixture(scope="module")
def dense_tflite(dense):
    _, concrete, x, want = dense
    flat = tf.lite.TFLiteConverter.from_concrete_functions(
        [compat.freeze_function(concrete)]).convert()
    return flat, x, want


def test_tflite_schema_has_what_psla_tf_uses(dense_tflite):
    fb = compat.tflite_schema()
    for name in ("BITCAST", "ADD", "CAST", "TRANSPOSE", "RESHAPE", "FULLY_CONNECTED"):
        assert isinstance(getattr(fb.BuiltinOperator, name), int), name
    for name in ("INT32", "INT64", "FLOAT32"):
        assert isinstance(getattr(fb.TensorType, name), int), name
    flat, _, _ = dense_tflite
    model = compat.read_tflite_model(flat)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    assert codes == [fb.BuiltinOperator.FULLY_CONNECTED]
    (sg,) = model.subgraphs
    assert sg.tensors[sg.inputs[0]].type == fb.TensorType.FLOAT32
    assert list(sg.tensors[sg.inputs[0]].shape) == [1, 4]
    assert fb.Model.GetRootAs(bytearray(flat), 0).SubgraphsLength() == 1
    assert hasattr(fb.BufferT(), "data") and hasattr(fb.MetadataT(), "buffer")


def test_tflite_model_round_trip(dense_tflite):
    flat, x, want = dense_tflite
    model = compat.read_tflite_model(flat)
    fb = compat.tflite_schema()
    buf = fb.BufferT()                                   # an edit survives the round trip
    buf.data = np.frombuffer(b"psla", np.uint8).copy()
    model.buffers.append(buf)
    again = compat.read_tflite_model(compat.write_tflite_model(model))
    assert bytes(np.asarray(again.buffers[-1].data, np.uint8)) == b"psla"
    np.testing.assert_allclose(_run_tflite(compat.write_tflite_model(model), x), want,
                               rtol=1e-5, atol=1e-6)


def test_litert_still_has_no_public_op_listing():
    from ai_edge_litert.interpreter import Interpreter
    public = [n for n in dir(Interpreter) if not n.startswith("_") and "op" in n.lower()
              and "detail" in n.lower()]
    assert public == []


def test_tflite_ops(dense_tflite):
    from ai_edge_litert.interpreter import Interpreter
    flat, _, _ = dense_tflite
    it = Interpreter(model_content=flat)
    ops = list(compat.tflite_ops(it))
    assert [name for name, _ in ops] == ["FULLY_CONNECTED"]
    assert ops[0][1] == [it.get_output_details()[0]["name"]]


# ----------------------------------------------------------------------------- Keras
def test_flatten_layers_reaches_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization()], name="inner")
    x = keras.Input((4,))
    outer = keras.Model(x, keras.layers.BatchNormalization()(inner(x)))

    def walk(layer):                     # independent truth: recurse through .layers
        for sub in getattr(layer, "layers", []):
            yield sub
            yield from walk(sub)
    def found(layers):                   # (a nested Sequential's .layers omits its InputLayer)
        return {id(l) for l in layers if not isinstance(l, keras.layers.InputLayer)}
    assert found(compat.flatten_layers(outer)) == found(walk(outer))
    bns = [l for l in compat.flatten_layers(outer)
           if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 2
    assert inner.layers[1] not in outer.layers          # .layers alone is one level deep


def _fit_builds(model, strategy, monkeypatch) -> int:
    """How often Keras built ``model`` symbolically from a first batch while ``model.fit``
    ran one step in ``strategy.scope()``."""
    from keras.src.backend.tensorflow import trainer
    builds = []
    real = trainer.TensorFlowTrainer._symbolic_build

    def symbolic_build(self, *args, **kwargs):
        builds.append(kwargs.get("data_batch"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(trainer.TensorFlowTrainer, "_symbolic_build", symbolic_build)
    ds = tf.data.Dataset.from_tensors(({"a": tf.ones([2, 4])}, tf.zeros([2, 3]))).repeat()
    with strategy.scope():
        model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    monkeypatch.undo()
    return len(builds)


def _scope_model(strategy):
    with strategy.scope():
        x = keras.Input((4,), name="a")
        model = keras.Model({"a": x}, keras.layers.Dense(3)(x))
        model.compile(optimizer="sgd", loss="mse")
    return model


def test_keras_fit_still_builds_a_scope_model_from_its_first_batch(mwms, monkeypatch):
    """A model made in a strategy scope keeps the strategy, and Keras 3.15's fit builds it
    symbolically from the first batch, which it first reduces across the replicas with
    ``strategy.reduce`` (a structure of PerReplica values: what a multi-worker strategy
    cannot reduce; with this one-replica strategy the batch is plain tensors and the reduce
    is skipped, so the failure itself shows in the two-worker test of test_distribute.py)."""
    model = _scope_model(mwms)
    assert model.distribute_strategy is mwms and model._distribute_strategy is mwms
    assert _fit_builds(model, mwms, monkeypatch) == 1


def test_clear_distribute_strategy(mwms, monkeypatch):
    model = _scope_model(mwms)
    compat.clear_distribute_strategy(model)
    assert _fit_builds(model, mwms, monkeypatch) == 0
    with mwms.scope():
        assert model.distribute_strategy is mwms          # from the scope
    assert np.isfinite(model.get_weights()[0]).all()


def _upstream(module, name):
    fn = getattr(module, name)
    return getattr(fn, "_psla_original", fn)


def test_keras_reduce_per_replica_still_fails_on_scalars_in_multi_worker_mode(mwms,
                                                                              monkeypatch):
    from keras.src.backend.tensorflow import trainer
    monkeypatch.setattr(mwms.extended, "_in_multi_worker_mode", lambda: True)
    with pytest.raises(ValueError, match="Invalid reduction dimension 0"):
        _upstream(trainer, "reduce_per_replica")({"loss": tf.constant(2.0)}, mwms, "auto")


def test_patch_keras_multi_worker_reduce(mwms, monkeypatch):
    from keras.src.backend.tensorflow import trainer
    compat.patch_keras_multi_worker_reduce()
    compat.patch_keras_multi_worker_reduce()                # idempotent
    patched = trainer.reduce_per_replica
    assert patched._psla_patched and not getattr(patched._psla_original, "_psla_patched", 0)
    monkeypatch.setattr(mwms.extended, "_in_multi_worker_mode", lambda: True)
    out = patched({"loss": tf.constant(2.0), "v": tf.constant([1.0, 3.0])}, mwms, "auto")
    assert float(out["loss"]) == 2.0                        # scalar: mean over the replicas
    assert float(out["v"]) == 2.0                           # batched: Keras' axis=0 mean


@pytest.fixture
def skipset_cache_cleared():
    """Keras' skipset cache emptied for the test, put back afterwards."""
    from keras.src.backend.common import global_state
    keys = [f"saving_attr_{kind}_{t}" for kind in ("skiplist", "skipset")
            for t in compat._SKIPSET_TYPES]
    saved = {k: global_state.get_global_attribute(k, None) for k in keys}
    for k in keys:
        global_state.set_global_attribute(k, None)
    yield global_state
    for k, v in saved.items():
        global_state.set_global_attribute(k, v)


def _count_inits(monkeypatch, cls) -> list:
    made = []
    init = cls.__init__

    def counting_init(self, *args, **kwargs):
        made.append(type(self).__name__)
        init(self, *args, **kwargs)
    monkeypatch.setattr(cls, "__init__", counting_init)
    return made


def test_keras_get_attr_skipset_still_misses_its_cache(skipset_cache_cleared, monkeypatch):
    from keras.src.optimizers.optimizer import Optimizer
    from keras.src.saving import saving_lib
    made = _count_inits(monkeypatch, Optimizer)
    first = saving_lib.get_attr_skipset("Optimizer")
    second = saving_lib.get_attr_skipset("Optimizer")
    assert first == second
    assert len(made) == 2                 # rebuilt (variables created) on every call
    g = skipset_cache_cleared
    assert g.get_global_attribute("saving_attr_skipset_Optimizer", None) is not None
    assert g.get_global_attribute("saving_attr_skiplist_Optimizer", None) is None


def test_warm_keras_saving_skipsets(skipset_cache_cleared, monkeypatch, mwms):
    from keras.src.optimizers.optimizer import Optimizer
    from keras.src.saving import saving_lib
    compat.warm_keras_saving_skipsets()
    made = _count_inits(monkeypatch, Optimizer)
    for t in compat._SKIPSET_TYPES:
        assert "_self_unconditional_dependency_names" in saving_lib.get_attr_skipset(t)
    assert made == []                                      # served from the cache
    with mwms.scope(), pytest.raises(RuntimeError, match="outside strategy.scope"):
        compat.warm_keras_saving_skipsets()


def _replica_moments(strategy, fn, x):
    mean, var = strategy.run(lambda: fn(tf.constant(x), [0], False))
    return (np.asarray(strategy.experimental_local_results(mean)[0]),
            np.asarray(strategy.experimental_local_results(var)[0]))


@pytest.fixture(scope="module")
def offset_batch():
    """|mean| ≫ std: 1000 + 0.01·N(0, 1), float32 [1024, 4]."""
    rng = np.random.default_rng(0)
    return (1000.0 + 0.01 * rng.standard_normal((1024, 4))).astype(np.float32)


def test_keras_sync_moments_still_cancel(mwms, offset_batch):
    from keras.src.backend.tensorflow import nn
    _, var = _replica_moments(mwms, _upstream(nn, "_compute_moments_sync"), offset_batch)
    truth = offset_batch.astype(np.float64).var(axis=0)     # ≈ 1e-4
    assert np.all(np.abs(var - truth) > 0.5 * truth), (var, truth)  # the variance is lost


def test_patch_keras_sync_moments(mwms, offset_batch):
    compat.patch_keras_sync_moments()
    compat.patch_keras_sync_moments()                       # idempotent
    x = offset_batch.astype(np.float64)

    def keras_moments(x, axes, keepdims):                   # what BatchNormalization calls
        return keras.ops.moments(x, axes, keepdims=keepdims, synchronized=True)
    mean, var = _replica_moments(mwms, keras_moments, offset_batch)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-3)
