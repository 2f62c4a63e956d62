"""Per-group batches (``--group_batches``): every training batch from one prepared set.

* every block of ``batch_size`` draws holds one group's rows; without weights each row is
  used once or twice an epoch (its group's last block completed from a second permutation);
* with Algorithm 1's weights the draws keep P(i) = w_i / W: Pearson chi-square of the row
  counts over many epochs (p > 1e-3), zero-weight rows never drawn;
* through ``make_train_dataset`` on two prepared sets (two shard prefixes), every batch's ids
  come from one set, the same (seed, epoch) gives the same batches, and the config check
  refuses the stream order.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.config import TrainConfig
from psla_tf.data import pipeline
from psla_tf.errors import ConfigError
from psla_tf.training import plan

B = 16


def _groups(sizes, seed=0):
    g = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(seed).shuffle(g)
    return g


def _blocks(fn, epoch):
    return fn(tf.constant([epoch, 7], tf.int64)).numpy().reshape(-1, B)


def test_permuted_blocks_hold_one_group_each():
    sizes = [500, 500, 480, 520]
    g = _groups(sizes)
    steps = sum(sizes) // B
    fn = pipeline.group_batch_rows(g, steps, B)
    blocks = _blocks(fn, 0)
    assert blocks.shape == (steps, B)
    assert all(len(set(g[b])) == 1 for b in blocks)
    uses = np.bincount(blocks.ravel(), minlength=len(g))
    assert uses.max() <= 2
    # 127 blocks of which 125 kept: at most 2 * 16 rows unseen, the rest seen
    assert (uses == 0).sum() <= 2 * B
    # each group keeps its ceil(n / 16) blocks but for the two dropped
    per_group = np.bincount(g[blocks[:, 0]], minlength=4)
    assert np.all(np.abs(per_group - np.ceil(np.array(sizes) / B)) <= 2)
    assert not np.array_equal(blocks, _blocks(fn, 1))
    np.testing.assert_array_equal(blocks, _blocks(fn, 0))


def test_weighted_blocks_keep_algorithm_1_probabilities():
    sizes = [300, 200, 100]
    g = _groups(sizes, 1)
    rng = np.random.default_rng(2)
    w = rng.gamma(1.0, size=len(g))
    w[rng.choice(len(g), 20, replace=False)] = 0.0
    steps, epochs = 30, 120
    fn = pipeline.group_batch_rows(g, steps, B, w)
    counts = np.zeros(len(g))
    for e in range(epochs):
        blocks = _blocks(fn, e)
        assert all(len(set(g[b])) == 1 for b in blocks)
        counts += np.bincount(blocks.ravel(), minlength=len(g))
    assert counts[w == 0].sum() == 0
    # rows drawn in blocks of 16 are not independent: test per-group and within-group
    total = steps * epochs
    gw = np.array([w[g == k].sum() for k in range(3)])
    group_blocks = np.array([counts[g == k].sum() for k in range(3)]) / B
    assert stats.chisquare(group_blocks, gw / gw.sum() * total).pvalue > 1e-3
    for k in range(3):
        m = (g == k) & (w > 0)
        obs = counts[m]
        assert stats.chisquare(obs, w[m] / w[m].sum() * obs.sum()).pvalue > 1e-3


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    rng = np.random.default_rng(5)
    d = tmp_path_factory.mktemp("groups")
    globs = []
    for k, n in enumerate((70, 50)):
        ids = [f"set{k}_{i:03d}" for i in range(n)]
        globs.append(write_shards(str(d), random_waveforms(n, rng, 200, 400),
                                  random_labels(n, 4, rng), 4, num_shards=2,
                                  prefix=f"fold_{k}", ids=ids))
    return ",".join(globs)


@pytest.mark.parametrize("balanced", [False, True])
def test_train_batches_come_from_one_set(two_sets, balanced):
    kw = dict(batch_size=8, clip_samples=64, mixup=0.0, seed=3, with_ids=True,
              num_epochs=2, group_batches=True, balanced_sampling=balanced)
    batches = [x["id"].numpy() for x, _ in pipeline.make_train_dataset(two_sets, **kw)]
    assert len(batches) == 2 * (120 // 8)
    sets = [{i.decode().split("_")[0] for i in ids} for ids in batches]
    assert all(len(s) == 1 for s in sets)
    assert {next(iter(s)) for s in sets} == {"set0", "set1"}
    again = [x["id"].numpy() for x, _ in pipeline.make_train_dataset(two_sets, **kw)]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_stream_order_refused(two_sets):
    with pytest.raises(ValueError, match="group_batches"):
        pipeline.make_train_dataset(two_sets, batch_size=8, clip_samples=64,
                                    sampling_order="stream", group_batches=True)
    cfg = dataclasses.replace(TrainConfig(), group_batches=True, sampling_order="stream")
    with pytest.raises(ConfigError, match="--group_batches"):
        plan._check_input(cfg)
