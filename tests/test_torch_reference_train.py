"""The PyTorch reference-style trainer's TensorFlow-free parts (benchmarks/
torch_reference_train.py): its TFRecord / tf.train.Example reader against TensorFlow's own
serialisation, its flag parser against main.py's (same flagfile → same values), and the
reference's sampling weights (1000 / (c_k + 0.01) summed over a clip's labels)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from psla_tf.data import records
from psla_tf.training import flags as train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "torch_reference_train", os.path.join(ROOT, "benchmarks", "torch_reference_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reader_matches_tensorflow(tmp_path):
    mod = _module()
    rng = np.random.default_rng(0)
    mids = ["/m/a", "/m/b", "/m/c"]
    clips = [(f"clip{i}", rng.integers(-32768, 32767, 800 + 37 * i).astype("<i2"),
              sorted(rng.choice(3, 1 + i % 3, replace=False).tolist())) for i in range(7)]
    path = str(tmp_path / "x-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for cid, pcm, labels in clips:
            w.write(records.make_example(cid, pcm, labels, [mids[k] for k in labels]))
    with open(str(tmp_path / "x.manifest.json"), "w") as f:
        f.write('{"mids": ["/m/a", "/m/b", "/m/c"]}')
    got, manifest = mod.read_shards(str(tmp_path / "x-*.tfrecord"))
    assert manifest["mids"] == mids and len(got) == len(clips)
    for g, (cid, pcm, labels) in zip(got, clips):
        assert g["id"] == cid and g["labels"] == labels
        np.testing.assert_array_equal(g["waveform"], pcm.astype(np.float32) / 32768.0)


def test_flag_parser_agrees_with_main():
    mod = _module()
    flagfile = os.path.join(ROOT, "configs", "fsddmix.flags")
    ours = mod.parse_flags([f"--flagfile={flagfile}", "--seed=3", "--nowa"])
    fv = flags.FlagValues()
    train_flags.define_flags(fv)
    fv(["main", f"--flagfile={flagfile}", "--seed=3", "--nowa"])
    cfg = train_flags.config_from_flags(fv)
    for key in mod.DEFAULTS:
        if key in ("train_data", "eval_data", "exp_dir"):
            continue
        assert ours[key] == getattr(cfg, key), key


def test_reference_sampling_weights():
    mod = _module()
    clips = [{"labels": [0]}, {"labels": [0, 1]}, {"labels": [2]}, {"labels": [0]}]
    w = mod.sample_weights(clips, 3)
    c = np.array([3, 1, 1]) + 0.01
    np.testing.assert_allclose(w, [1000 / c[0], 1000 / c[0] + 1000 / c[1], 1000 / c[2],
                                   1000 / c[0]])
