"""LR schedule, Adam with coupled L2 and the losses (Sec. II-B) against hand-written values and
NumPy re-implementations of the reference's PyTorch behaviour."""
import numpy as np
import pytest
import keras
import tensorflow as tf

from psla_tf.training import optim, schedule


def test_epoch_learning_rates_balanced_recipe():
    # lr 1e-3, 60 epochs, halved after epoch 35 and every 5 epochs after (DESIGN.md)
    want = [1e-3] * 35 + [5e-4] * 5 + [2.5e-4] * 5 + [1.25e-4] * 5 + [6.25e-5] * 5 + [3.125e-5] * 5
    got = schedule.epoch_learning_rates(1e-3, 60, 35, 0.5, 5)
    assert len(got) == 60
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[35] == pytest.approx(5e-4) and got[40] == pytest.approx(2.5e-4)  # epochs 36, 41


def test_epoch_learning_rates_full_recipe():
    want = [1e-4] * 10 + [5e-5] * 5 + [2.5e-5] * 5 + [1.25e-5] * 5 + [6.25e-6] * 5
    np.testing.assert_allclose(schedule.epoch_learning_rates(1e-4, 30, 10, 0.5, 5), want,
                               rtol=1e-12)


def _reference_lrs(total_steps, spe, base, start, n_epochs, decay=0.5, step=5, warm=1000,
                   every=50):
    """The reference's training loop, literally: warm-up assignment then MultiStepLR."""
    lr, out = base, []
    ms = set(range(start, 1000, step))
    epoch = 1
    for s in range(total_steps):
        if s <= warm and s % every == 0:
            lr = s / warm * base
        out.append(lr)
        if (s + 1) % spe == 0:  # epoch end: scheduler.step()
            if epoch in ms:
                lr *= decay
            epoch += 1
    return out


@pytest.mark.parametrize("spe,start", [(300, 35), (100, 2), (110, 1), (1700, 10)])
def test_schedule_matches_reference_loop(spe, start):
    n_epochs = 12 if spe < 1000 else 13
    total = spe * n_epochs
    sched = schedule.PSLASchedule(1e-3, spe, 60, start, 0.5, 5, 1000, 50)
    steps = np.arange(total)
    got = sched(tf.constant(steps)).numpy()
    want = np.asarray(_reference_lrs(total, spe, 1e-3, start, 60))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # float32 lr
    py = [schedule.learning_rate_at(int(s), base_lr=1e-3, steps_per_epoch=spe, n_epochs=60,
                                    start=start, decay=0.5) for s in steps[::7]]
    np.testing.assert_allclose(py, want[::7], rtol=1e-9)


def test_warmup_staircase_values():
    sched = schedule.PSLASchedule(1e-3, 10_000, 30, 10)
    lr = lambda s: float(sched(s))
    assert lr(0) == 0.0 and lr(49) == 0.0          # reference: lr = 0/1000 · base at step 0
    assert lr(50) == pytest.approx(5e-5) and lr(99) == pytest.approx(5e-5)
    assert lr(999) == pytest.approx(9.5e-4) and lr(1000) == pytest.approx(1e-3)
    assert lr(9_999) == pytest.approx(1e-3)
    assert lr(10 * 10_000) == pytest.approx(5e-4)  # first update of epoch 11
    no_warm = schedule.PSLASchedule(1e-3, 100, 30, 10, warmup_steps=0)
    assert float(no_warm(0)) == pytest.approx(1e-3)


def test_milestone_inside_warmup_is_overridden():
    # epoch 1 (110 steps) ends inside the warm-up: halved for steps 110-149, reset at 150
    sched = schedule.PSLASchedule(1e-3, 110, 30, 1)
    assert float(sched(109)) == pytest.approx(1e-4)
    assert float(sched(110)) == pytest.approx(0.5e-4)
    assert float(sched(150)) == pytest.approx(1.5e-4)
    # milestone 6 (step 660) is also overridden; 11, 16, 21, 26 (≤ 30 epochs) count after
    assert float(sched(5000)) == pytest.approx(1e-3 * 0.5 ** 4)


def test_schedule_serialises():
    s = schedule.PSLASchedule(5e-4, 1700, 40, 10, 0.5, 5, 1000, 50)
    s2 = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert s2.get_config() == s.get_config()
    assert float(s2(20_000)) == float(s(20_000))


def _torch_adam(w, grads, lr, b1=0.95, b2=0.999, eps=1e-8, wd=5e-7):
    """torch.optim.Adam (weight_decay, no amsgrad) in float64 NumPy."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
        w = w - lr / (1 - b1 ** t) * m / denom
    return w


@pytest.mark.parametrize("scale,wd", [(1.0, 0.1), (1e-8, 0.0)])
def test_torch_adam_matches_numpy(scale, wd):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [scale * rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3)]
    var = keras.Variable(w0)
    opt = optim.TorchAdam(learning_rate=1e-2, l2_weight_decay=wd)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    want = _torch_adam(w0, grads, 1e-2, wd=wd)
    np.testing.assert_allclose(var.numpy(), want, rtol=2e-5, atol=2e-7)
    if scale < 1:
        # where gradients are tiny, eps placement matters: stock Keras Adam differs visibly
        var2 = keras.Variable(w0)
        stock = keras.optimizers.Adam(1e-2, beta_1=0.95, beta_2=0.999, epsilon=1e-8)
        for g in grads:
            stock.apply_gradients([(tf.constant(g), var2)])
        assert np.max(np.abs(var2.numpy() - want)) > 100 * np.max(np.abs(var.numpy() - want))


def test_torch_adam_fused_kernel_equals_the_op_by_op_update():
    """The fused ResourceApplyAdam path (ε·sqrt(1 − β2ᵗ), optim.torch_adam_epsilon) and the
    op-by-op update give the same weights and moments, traced (one tf.function, both
    variables) and eagerly; and the same as torch's update in NumPy."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * s for s in (1.0, 1e-7, 0.3, 1e-9)]
    for traced in (False, True):
        fused, plain = keras.Variable(w0), keras.Variable(w0)
        a = optim.TorchAdam(learning_rate=1e-2, l2_weight_decay=0.1)
        b = optim.TorchAdam(learning_rate=1e-2, l2_weight_decay=0.1, fused=False)
        step_a = lambda g: a.apply_gradients([(g, fused)])  # noqa: E731
        step_b = lambda g: b.apply_gradients([(g, plain)])  # noqa: E731
        if traced:
            step_a, step_b = tf.function(step_a), tf.function(step_b)
        for g in grads:
            step_a(tf.constant(g))
            step_b(tf.constant(g))
        # float32 rounding of four lr-1e-2 steps on weights of order 1 (ulp 1.2e-7)
        np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-6, atol=5e-7)
        # the kernel forms 1 − β2 in float32 (0.99998713e-3, torch and the op-by-op form
        # 1e-3): the second moment differs by 1.3e-5 relative
        for x, y in zip(a.variables, b.variables):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-12)
        want = _torch_adam(w0, grads, 1e-2, wd=0.1)
        np.testing.assert_allclose(fused.numpy(), want, rtol=2e-5, atol=2e-7)


def test_torch_adam_default_hyperparameters_and_config():
    opt = optim.TorchAdam()
    assert (opt.beta_1, opt.beta_2, opt.epsilon, opt.l2_weight_decay) == (0.95, 0.999, 1e-8, 5e-7)
    again = optim.TorchAdam.from_config(opt.get_config())
    assert again.l2_weight_decay == 5e-7 and again.weight_decay is None and again.fused
    assert not optim.TorchAdam.from_config(optim.TorchAdam(fused=False).get_config()).fused


def test_bce_and_ce_against_numpy():
    rng = np.random.default_rng(0)
    y = (rng.random((6, 5)) < 0.3).astype(np.float32)
    p = rng.random((6, 5)).astype(np.float32)
    p[0, 0], p[1, 1] = 0.0, 1.0  # clamped, finite
    # clamp in float32 as the model (and torch) do: 1 - 1e-7 rounds to 0.99999988
    pc = np.clip(p, np.float32(1e-7), np.float32(1 - 1e-7)).astype(np.float64)
    want = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    loss = optim.make_loss("bce")
    assert float(np.mean(loss(y, p))) == pytest.approx(want, rel=1e-5)
    onehot = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
    q = p / p.sum(axis=1, keepdims=True)  # the single-label model outputs probabilities
    ce = -np.mean(np.log(np.clip(q[np.arange(6), [0, 1, 2, 3, 4, 0]], 1e-7, 1)))
    ce_loss = optim.make_loss("ce")
    assert float(np.mean(ce_loss(onehot, q))) == pytest.approx(ce, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        optim.make_loss("hinge")


def test_label_smoothing_against_numpy_and_saved_with_the_model():
    """--label_smoothing ε: ce against (1 − ε)·onehot(argmax y) + ε/C (mixed labels too),
    bce against (1 − ε)·y + ε/2, with the same clamps; ε = 0 is the plain loss; the loss
    round-trips through Keras serialisation; ε outside [0, 1) is refused."""
    import keras
    rng = np.random.default_rng(1)
    y = rng.dirichlet(np.ones(5), size=6).astype(np.float32)        # mixup's soft labels
    p = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    p[0, y[0].argmax()] = 0.0                                        # clamped, finite
    q = np.eye(5)[y.argmax(1)] * 0.9 + 0.1 / 5
    want = np.mean(-(q * np.log(np.clip(p.astype(np.float64), 1e-7, 1))).sum(1))
    ce = optim.make_loss("ce", 0.1)
    assert float(ce(y, p)) == pytest.approx(want, rel=1e-5)
    yb = (rng.random((6, 5)) < 0.3).astype(np.float32)
    pb = rng.uniform(0.01, 0.99, (6, 5)).astype(np.float32)
    qb = yb * 0.8 + 0.1
    want = np.mean(-(qb * np.log(pb) + (1 - qb) * np.log(1 - pb)).mean(1))
    assert float(optim.make_loss("bce", 0.2)(yb, pb)) == pytest.approx(want, rel=1e-5)
    assert optim.make_loss("ce", 0.0) is optim.psla_ce
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ce))
    assert isinstance(again, optim.SmoothedLoss) and again.label_smoothing == 0.1
    assert float(again(y, p)) == pytest.approx(float(ce(y, p)), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        optim.make_loss("ce", 1.0)


def test_weight_decay_flag_reaches_the_optimizer():
    """``--weight_decay`` (default the paper's 5e-7) is the optimizer's coupled L2."""
    from psla_tf.config import TrainConfig
    from psla_tf.training import trainer
    assert trainer.make_optimizer(TrainConfig(), 10).l2_weight_decay == 5e-7
    opt = trainer.make_optimizer(TrainConfig(weight_decay=1e-4), 10)
    assert opt.l2_weight_decay == 1e-4
