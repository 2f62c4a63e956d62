"""Provenance (psla_tf/provenance.py): every run writes the resolved flagfile, library
versions, manifest hashes and the git commit; the flagfile reproduces the run.

Truth: hashlib over the manifest bytes, ``git rev-parse HEAD``, importlib.metadata, and a
second run started from nothing but the first run's flags.txt.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from psla_tf import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_set(prefix, n, seed):
    import tensorflow as tf
    from psla_tf.data import records
    mids = ["/m/a", "/m/b", "/m/c"]
    rng = np.random.default_rng(seed)
    t = np.arange(6400) / 16000.0
    shard = records.shard_name(prefix, 0, 1)
    counts = np.zeros(3, int)
    with tf.io.TFRecordWriter(shard) as wr:
        for i in range(n):
            k = i % 3
            counts[k] += 1
            w = 0.05 * rng.normal(size=t.size) + 0.3 * np.sin(2 * np.pi * 400 * (k + 1) * t)
            wr.write(records.make_example(f"c{i}.wav", records.float_to_int16(w), [k],
                                          [mids[k]]))
    records.Manifest(num_examples=n, shards=[{"file": os.path.basename(shard),
                                              "num_examples": n}],
                     mids=mids, names=mids, class_counts=counts.tolist(), max_seconds=0.4,
                     fbank_mean=-6.0, fbank_std=4.0, fbank_frames=38 * n,
                     listed=n).write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


def test_write_provenance_records_everything(tmp_path):
    tr = _write_set(str(tmp_path / "train"), 6, 0)
    ev = _write_set(str(tmp_path / "eval"), 3, 1)
    exp = tmp_path / "exp"
    rec = provenance.write_provenance(str(exp), "--lr=0.5\n", [("train", tr), ("eval", ev),
                                                                ("val", None)])
    assert (exp / "flags.txt").read_text() == "--lr=0.5\n"
    on_disk = json.loads((exp / "provenance.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert on_disk["git"]["commit"] == head and isinstance(on_disk["git"]["dirty"], bool)
    for lib in ("keras", "numpy"):
        assert on_disk["versions"][lib] == metadata.version(lib)
    assert on_disk["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    by_role = {m["role"]: m for m in on_disk["manifests"]}
    assert set(by_role) == {"train", "eval"}
    for role, prefix in (("train", "train"), ("eval", "eval")):
        path = tmp_path / f"{prefix}.manifest.json"
        assert by_role[role]["path"] == str(path)
        assert by_role[role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert by_role["train"]["num_examples"] == 6
    assert provenance.check_provenance(str(exp)) == []
    # a changed manifest is reported
    m = json.loads((tmp_path / "train.manifest.json").read_text())
    m["fbank_mean"] = -7.0
    (tmp_path / "train.manifest.json").write_text(json.dumps(m))
    problems = provenance.check_provenance(str(exp))
    assert len(problems) == 1 and "train manifest" in problems[0] and "changed" in problems[0]


def test_git_state_outside_a_repository(tmp_path):
    assert provenance.git_state(str(tmp_path)) == {"commit": None, "dirty": None,
                                                   "dirty_files": []}


def test_flagfile_reproduces_a_tiny_run(tmp_path):
    from helpers_cli import run_script
    tr = _write_set(str(tmp_path / "train"), 12, 0)
    ev = _write_set(str(tmp_path / "eval"), 6, 1)
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_script("main.py", "--n_epochs=1", "--batch_size=4", "--eval_batch_size=6",
                   "--lr=1e-3", "--warmup_steps=2", "--warmup_every=1", "--nowa",
                   "--model=cnn", "--cnn_width=0.25", "--target_length=40", "--freqm=8",
                   "--timem=8",
                   "--shuffle_buffer=12", "--mixup=0.5", "--seed=3", "--verbose=2",
                   "--pretrained=none", f"--train_data={tr}", f"--eval_data={ev}",
                   f"--exp_dir={a}")
    assert r.returncode == 0, r.stderr[-3000:]
    prov = json.loads((a / "provenance.json").read_text())
    assert {m["role"] for m in prov["manifests"]} == {"train", "eval"}
    # nothing but the recorded flagfile (exp_dir overridden after it)
    r2 = run_script("main.py", f"--flagfile={a / 'flags.txt'}", f"--exp_dir={b}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    pa = np.load(a / "predictions" / "eval_epoch_001.npy")
    pb = np.load(b / "predictions" / "eval_epoch_001.npy")
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    assert sb["single"]["mAP"] == pytest.approx(sa["single"]["mAP"], abs=1e-6)
    flags_a = [x for x in (a / "flags.txt").read_text().splitlines() if "exp_dir" not in x]
    flags_b = [x for x in (b / "flags.txt").read_text().splitlines() if "exp_dir" not in x]
    assert flags_a == flags_b
