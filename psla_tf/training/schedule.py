"""PSLA's learning-rate schedule (Sec. II-B): linear warm-up, then halving every few epochs.

The reference (PyTorch) does two independent things:

* warm-up, at the start of every iteration with 0-based global step ``s``::

      if s <= 1000 and s % 50 == 0: lr = s / 1000 * base_lr

  so the lr is a staircase: 0 for steps 0-49 (the very first updates only move Adam's
  moment estimates), 0.05·base for 50-99, …, base from step 1000 on. It *sets* the lr,
  overriding whatever the epoch scheduler did before.
* ``MultiStepLR(milestones=[start, start+step, …], gamma=decay)`` stepped once at the end of
  every epoch (epochs counted from 1). Being chainable, it multiplies the *current* lr by
  ``decay`` when the epoch just finished is a milestone: with start 35 the lr is halved from
  epoch 36 on, quartered from 41; with start 10, halved from 11, quartered from 16.

:class:`PSLASchedule` reproduces both as a function of the Keras global step (the optimizer's
``iterations``, which is the reference's ``global_step`` for the same update), including
their interaction: a milestone that falls inside the warm-up is overridden by the next
warm-up assignment, exactly as in the reference.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf


def milestones(n_epochs: int, start: int, step_size: int = 5) -> list[int]:
    """Epochs after whose end the lr is multiplied by the decay: start, start+step, … ≤ n."""
    if step_size < 1:
        raise ValueError("lrscheduler_step must be ≥ 1")
    return list(range(int(start), int(n_epochs) + 1, int(step_size))) if start >= 1 else []


def epoch_learning_rates(base_lr: float, n_epochs: int, start: int, decay: float,
                         step_size: int = 5) -> list[float]:
    """The lr of every epoch 1..n_epochs after warm-up (for ``--dry_run`` and tests)."""
    ms = milestones(n_epochs, start, step_size)
    return [float(base_lr * decay ** sum(1 for m in ms if m <= e - 1))
            for e in range(1, n_epochs + 1)]


def learning_rate_at(step: int, *, base_lr: float, steps_per_epoch: int, n_epochs: int,
                     start: int, decay: float, step_size: int = 5, warmup_steps: int = 1000,
                     warmup_every: int = 50) -> float:
    """The lr the reference uses for 0-based update ``step`` (pure Python, for checking)."""
    lr = base_lr
    if warmup_steps > 0:
        last = min(step, warmup_steps) // warmup_every * warmup_every
        lr = last / warmup_steps * base_lr
    else:
        last = -1
    for m in milestones(n_epochs, start, step_size):
        if last < m * steps_per_epoch <= step:
            lr *= decay
    return float(lr)


@keras.saving.register_keras_serializable(package="psla_tf")
class PSLASchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warm-up staircase + MultiStepLR of the global step (Sec. II-B); see the module doc.

    Args:
      base_lr: the initial lr (1e-3 balanced AudioSet, 1e-4 full, 5e-4 FSD50K).
      steps_per_epoch: optimizer updates per epoch (N // batch_size).
      n_epochs: epochs of the run (milestones past it never take effect).
      start: first milestone epoch (``--lrscheduler_start``).
      decay: the factor at each milestone (``--lrscheduler_decay``, 0.5).
      step_size: epochs between milestones (``--lrscheduler_step``, 5).
      warmup_steps: warm-up length in updates (1000; 0 disables warm-up).
      warmup_every: the warm-up updates the lr every this many steps (50).
    """

    def __init__(self, base_lr: float, steps_per_epoch: int, n_epochs: int, start: int,
                 decay: float = 0.5, step_size: int = 5, warmup_steps: int = 1000,
                 warmup_every: int = 50):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be ≥ 1")
        if warmup_steps < 0 or warmup_every < 1:
            raise ValueError("warmup_steps must be ≥ 0 and warmup_every ≥ 1")
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.n_epochs = int(n_epochs)
        self.start = int(start)
        self.decay = float(decay)
        self.step_size = int(step_size)
        self.warmup_steps = int(warmup_steps)
        self.warmup_every = int(warmup_every)
        self._milestone_steps = np.asarray(
            [m * self.steps_per_epoch for m in milestones(self.n_epochs, self.start,
                                                          self.step_size)], np.int64)

    def __call__(self, step):
        s = tf.cast(step, tf.int64)
        if self.warmup_steps > 0:
            w = tf.constant(self.warmup_steps, tf.int64)
            k = tf.constant(self.warmup_every, tf.int64)
            last = tf.minimum(s, w) // k * k
            lr = tf.cast(last, tf.float64) / float(self.warmup_steps) * self.base_lr
        else:
            last = tf.fill(tf.shape(s), tf.constant(-1, tf.int64))
            lr = tf.fill(tf.shape(s), tf.constant(self.base_lr, tf.float64))
        if self._milestone_steps.size:
            ms = tf.constant(self._milestone_steps)  # broadcast: step may be a vector
            crossed = tf.logical_and(ms > last[..., None], ms <= s[..., None])
            n = tf.reduce_sum(tf.cast(crossed, tf.float64), axis=-1)
            lr = lr * tf.pow(tf.constant(self.decay, tf.float64), n)
        return tf.cast(lr, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "n_epochs": self.n_epochs, "start": self.start, "decay": self.decay,
                "step_size": self.step_size, "warmup_steps": self.warmup_steps,
                "warmup_every": self.warmup_every}
