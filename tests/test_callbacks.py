"""Weight averaging, checkpoint ensemble and per-epoch evaluation (Sec. VI) on a tiny model."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from psla_tf import metrics
from psla_tf.training import callbacks as cb
from psla_tf.training import optim


def _data(n=48, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, :c] + 0.5 * rng.normal(size=(n, c)) > 0.3).astype(np.float32)
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)  # moving statistics must be averaged too
    out = keras.layers.Dense(3, activation="sigmoid")(h)
    m = keras.Model(inp, out)
    m.compile(optimizer=optim.TorchAdam(1e-2), loss=optim.psla_bce)
    return m


def _run(tmp, epochs=3, initial_epoch=0, model=None, restore=False):
    x, y = _data()
    xe, ye = _data(20, seed=1)
    eval_ds = tf.data.Dataset.from_tensor_slices((xe, ye)).batch(7)
    model = model or _model()
    ev = cb.EpochEvaluation(eval_ds, predictions_dir=os.path.join(tmp, "pred"), verbose=0)
    ens = cb.CheckpointEnsemble(ev, state_path=os.path.join(tmp, "ens.npz"), verbose=0)
    wa = cb.WeightAveraging(2, 3, save_path=os.path.join(tmp, "wa.keras"),
                            state_path=os.path.join(tmp, "wa.npz"), evaluation=ev, verbose=0)
    if restore:
        assert ens.restore() and wa.restore()
    ckpt = keras.callbacks.ModelCheckpoint(os.path.join(tmp, "epoch_{epoch:03d}.weights.h5"),
                                           save_weights_only=True)
    hist = model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch,
                     shuffle=False, callbacks=[ev, ens, wa, ckpt], verbose=0)
    return model, ev, ens, wa, hist, ye


def test_weight_averaging_equals_mean_of_saved_weights(tmp_path):
    tmp = str(tmp_path)
    model, ev, ens, wa, hist, ye = _run(tmp)
    per_epoch = []
    for e in (2, 3):
        m = _model(seed=5)
        m.load_weights(os.path.join(tmp, f"epoch_{e:03d}.weights.h5"))
        per_epoch.append([v.numpy() for v in m.weights])
    want = [(a.astype(np.float64) + b) / 2 for a, b in zip(*per_epoch)]
    assert any("moving_mean" in v.path for v in model.weights)
    for got, w, v in zip(wa.averaged, want, model.weights):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7, err_msg=v.path)
    # the live model kept the last epoch's weights
    for v, last in zip(model.weights, per_epoch[1]):
        np.testing.assert_array_equal(v.numpy(), last)
    # the saved averaged model holds the average and its evaluation is of those weights
    saved = keras.models.load_model(os.path.join(tmp, "wa.keras"))
    for v, w in zip(saved.weights, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-6, atol=1e-7)
    xe = _data(20, seed=1)[0]
    direct = metrics.evaluate(ye, saved.predict(xe, verbose=0))
    assert wa.result["mAP"] == pytest.approx(direct["mAP"], abs=1e-6)
    assert wa.result["epochs"] == [2, 3]


def test_ensemble_and_evaluation_equal_saved_predictions(tmp_path):
    tmp = str(tmp_path)
    model, ev, ens, wa, hist, ye = _run(tmp)
    preds = [np.load(os.path.join(tmp, "pred", f"eval_epoch_{e:03d}.npy")) for e in (1, 2, 3)]
    np.testing.assert_array_equal(np.load(os.path.join(tmp, "pred", "eval_targets.npy")), ye)
    # last epoch's predictions are the live model's predictions
    xe = _data(20, seed=1)[0]
    np.testing.assert_allclose(preds[2], model.predict(xe, verbose=0), atol=1e-6)
    for e in range(3):
        want = metrics.evaluate(ye, np.mean(preds[:e + 1], axis=0))
        assert hist.history["ens_mAP"][e] == pytest.approx(want["mAP"], abs=1e-9)
        single = metrics.evaluate(ye, preds[e])
        assert hist.history["eval_mAP"][e] == pytest.approx(single["mAP"], abs=1e-9)
        assert hist.history["eval_d_prime"][e] == pytest.approx(single["d_prime"], abs=1e-9)
        assert hist.history["eval_loss"][e] == pytest.approx(metrics.bce(ye, preds[e]), rel=1e-6)
    np.testing.assert_allclose(ens.scores, np.mean(preds, axis=0), atol=1e-7)


def test_resume_from_saved_state_matches_uninterrupted_run(tmp_path):
    full = str(tmp_path / "full")
    part = str(tmp_path / "part")
    _, _, ens_a, wa_a, _, _ = _run(full)
    model, _, _, _, _, _ = _run(part, epochs=2)
    # "kill" after epoch 2; resume epoch 3 from the saved accumulator state
    _, _, ens_b, wa_b, _, _ = _run(part, epochs=3, initial_epoch=2, model=model, restore=True)
    assert ens_b.epochs == [1, 2, 3] and wa_b.epochs == [2, 3]
    np.testing.assert_allclose(ens_b.scores, ens_a.scores, atol=1e-6)
    for a, b in zip(wa_a.averaged, wa_b.averaged):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_weight_averaging_rejects_bad_window():
    with pytest.raises(ValueError, match="wa_start"):
        cb.WeightAveraging(5, 3)


def _dropout_model(seed=0):
    """Dense → BN → Dropout (a random seed variable) → Dense → BN → sigmoid."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    h = keras.layers.BatchNormalization(momentum=0.99, name="bn1")(h)
    h = keras.layers.Dropout(0.3, seed=3)(h)
    h = keras.layers.Dense(4)(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(h)
    return keras.Model(inp, keras.layers.Activation("sigmoid")(h))


def test_refresh_batchnorm_sets_the_mean_of_batch_statistics():
    """SWA's BN update: moving mean / variance = the equal mean over the batches of each
    batch's mean and (biased) variance of the layer's input, computed here with NumPy from
    the first BN's input; weights, momentum and the dropout's seed are left as they were."""
    model = _dropout_model()
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(40, 6)).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices((x, x[:, :3])).batch(8)  # 5 batches
    dense = keras.Model(model.input, model.layers[1].output)
    bn1, bn2 = cb.batchnorm_layers(model)
    assert (bn1.name, bn2.name) == ("bn1", "bn2")
    kernels = [v.numpy() for v in model.trainable_weights]
    weights = {id(v) for v in model.weights}
    seeds = [v.numpy() for v in model.variables if id(v) not in weights]
    assert seeds, "the dropout's seed state is a variable outside model.weights"

    assert cb.refresh_batchnorm(model, batches, 3) == 3        # the first 3 of 5 batches
    h = [dense(x[i:i + 8]).numpy().astype(np.float64) for i in (0, 8, 16)]
    np.testing.assert_allclose(bn1.moving_mean.numpy(), np.mean([b.mean(0) for b in h], 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn1.moving_variance.numpy(),
                               np.mean([b.var(0) for b in h], 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(bn2.moving_variance.numpy(), 1.0)   # the second one too
    assert (bn1.momentum, bn2.momentum) == (0.99, 0.9)
    for v, k in zip(model.trainable_weights, kernels):
        np.testing.assert_array_equal(v.numpy(), k)
    for got, want in zip([v.numpy() for v in model.variables if id(v) not in weights], seeds):
        np.testing.assert_array_equal(got, want)
    # the dropout draws come from ``seed``, not from the seed state training left behind
    first = bn2.moving_mean.numpy()
    model(x, training=True)                                    # advances the dropout's seed
    cb.refresh_batchnorm(model, batches, 3)
    np.testing.assert_allclose(bn2.moving_mean.numpy(), first, rtol=1e-6, atol=1e-7)
    cb.refresh_batchnorm(model, batches, 3, seed=7)
    assert not np.allclose(bn2.moving_mean.numpy(), first, rtol=1e-6, atol=1e-7)
    # fewer batches than asked: all of them; 0 batches: nothing changes
    assert cb.refresh_batchnorm(model, batches, 100) == 5
    before = bn1.moving_mean.numpy()
    assert cb.refresh_batchnorm(model, batches, 0) == 0
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), before)


def test_weight_averaging_refreshes_the_averaged_models_batchnorm(tmp_path):
    """With ``bn_refresh`` the saved averaged model has the averaged trainable weights and
    the refreshed moving statistics; the live model is unchanged."""
    tmp = str(tmp_path)
    x, y = _data()
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model = _model()
    wa = cb.WeightAveraging(2, 3, save_path=os.path.join(tmp, "wa.keras"), verbose=0,
                            bn_refresh=lambda m: cb.refresh_batchnorm(m, batches, 4))
    plain = cb.WeightAveraging(2, 3, verbose=0)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, callbacks=[plain, wa], verbose=0)
    assert wa.bn_batches == 4 and plain.bn_batches == 0
    saved = keras.models.load_model(os.path.join(tmp, "wa.keras"))
    moving = [i for i, v in enumerate(saved.weights) if "moving" in v.path]
    assert len(moving) == 2
    for i, (v, a) in enumerate(zip(saved.weights, plain.averaged)):
        if i in moving:
            assert not np.allclose(v.numpy(), a)
        else:
            np.testing.assert_allclose(v.numpy(), a, rtol=1e-6, atol=1e-7)
    fresh = keras.models.clone_model(saved)
    fresh.set_weights(plain.averaged)
    cb.refresh_batchnorm(fresh, batches, 4)
    for v, w in zip(saved.weights, fresh.weights):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-6, atol=1e-7)
