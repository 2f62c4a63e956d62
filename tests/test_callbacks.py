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
