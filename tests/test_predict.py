"""tools/predict.py and psla_tf.prediction: scores of every model form over TFRecords and
audio listings, checked against the model applied directly to the padded waveforms."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from conftest import shared_path
from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf import params
from helpers_models import CLIP_SAMPLES, SMALL_MODEL, make_tagger, save_tagger

C = 5


def run_tool(name, *args):
    """``tools/NAME *args``, in-process (helpers_cli.run_script): returncode, stdout, stderr."""
    from helpers_cli import run_script
    return run_script(name, *args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    model = make_tagger(C, seed=3)
    path = save_tagger(model, str(d / "run"))
    rng = np.random.default_rng(0)
    # lengths around the model's input (10480 samples): some padded, some cut
    waves = random_waveforms(12, rng, 3000, 16000)
    labels = random_labels(12, C, rng)
    glob = write_shards(str(d), waves, labels, C, num_shards=2, prefix="eval",
                        ids=[f"clips/x{i}.wav" for i in range(12)])
    return {"dir": d, "model": model, "path": path, "waves": waves, "labels": labels,
            "glob": glob}


def direct_scores(model, waves_float):
    """The model on each clip cut / zero-padded to its input length (as in evaluation)."""
    w = np.zeros((len(waves_float), CLIP_SAMPLES), np.float32)
    n = np.zeros(len(waves_float), np.int32)
    for i, x in enumerate(waves_float):
        x = x[:CLIP_SAMPLES]
        w[i, : x.size] = x
        n[i] = x.size
    return model({"waveform": w, "num_samples": n}, training=False).numpy()


def test_records_match_direct_application(setup):
    from psla_tf import prediction
    from psla_tf.scoring import load_scorer
    scorer = load_scorer(setup["path"])
    p = prediction.predict(scorer, setup["glob"], batch_size=5, progress=False)
    assert p.ids == [f"clips/x{i}.wav" for i in range(12)]
    waves = [w.astype(np.float32) / 32768.0 for w in setup["waves"]]
    np.testing.assert_allclose(p.scores, direct_scores(setup["model"], waves), atol=2e-6)
    hot = np.zeros((12, C), np.float32)
    for i, labs in enumerate(setup["labels"]):
        hot[i, labs] = 1
    np.testing.assert_array_equal(p.targets, hot)
    assert p.mids == [f"/m/c{k}" for k in range(C)]
    out = str(setup["dir"] / "s.npz")
    prediction.save_scores(out, p)
    q = prediction.load_scores(out)
    assert q.ids == p.ids and q.names == p.names
    np.testing.assert_array_equal(q.scores, p.scores)
    # label enhancement reads the teacher through this same reader (targets included)
    np.testing.assert_array_equal(q.targets, p.targets)


def test_listing_of_real_audio_with_a_bad_file(setup):
    """A plain CSV of FSDD recordings (8 kHz) plus an unreadable file: the good clips are
    scored exactly as the model on the decoded clip; the bad one is reported, not dropped
    silently."""
    from psla_tf import prediction
    from psla_tf.data.prepare import decode_audio
    from psla_tf.scoring import load_scorer
    rec = shared_path("data", "fsdd", "recordings")
    files = sorted(os.listdir(rec))[:5]
    bad = setup["dir"] / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    listing = setup["dir"] / "list.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        for i, name in enumerate(files):
            w.writerow([str(rec / name), f"/m/c{i % C}"])
        w.writerow([str(bad), "/m/c0"])
    scorer = load_scorer(setup["path"])
    p = prediction.predict(scorer, str(listing), batch_size=2, progress=False)
    assert p.ids == [str(rec / n) for n in files]
    assert [f[0] for f in p.failures] == [str(bad)]
    waves = [decode_audio(str(rec / n)) for n in files]
    np.testing.assert_allclose(p.scores, direct_scores(setup["model"], waves), atol=2e-6)
    assert p.targets.argmax(1).tolist() == [i % C for i in range(5)]


def test_cli_checkpoint_savedmodel_and_errors(setup, tmp_path):
    """The tool on an epoch checkpoint of a run and on an exported SavedModel gives the
    Keras model's scores; bad inputs give one-line errors with exit code 2."""
    import dataclasses
    from psla_tf.data.records import write_label_csv
    from psla_tf.config import TrainConfig, flagfile_text
    from psla_tf.models.tagger import build_model
    from psla_tf import prediction
    bad_vocab = tmp_path / "bad"
    bad_vocab.mkdir()
    write_label_csv(str(bad_vocab / "labels.csv"), ["/m/a", "/m/b"], ["a", "b"])
    cases = [
        ([f"--model={tmp_path / 'nope.keras'}", f"--data={setup['glob']}", "--output=x.npz"],
         "does not exist"),
        ([f"--model={setup['path']}", f"--data={tmp_path / 'none-*.tfrecord'}",
          "--output=x.npz"], "no TFRecord shards"),
        ([f"--model={setup['path']}", f"--data={setup['glob']}", "--output=x.npz",
          f"--label_csv={bad_vocab / 'labels.csv'}"], "5 outputs but its vocabulary lists 2"),
    ]
    cfg = TrainConfig(**SMALL_MODEL, att_head=2, target_length=64, freqm=0,
                      timem=0, dataset_mean=params.DATASET_MEAN,
                      dataset_std=params.DATASET_STD, pretrained="none")
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "flags.txt").write_text(flagfile_text(cfg))
    write_label_csv(str(exp / "labels.csv"), [f"/m/c{k}" for k in range(C)],
                    [f"class {k}" for k in range(C)])
    m = build_model(dataclasses.replace(cfg), C)
    m.set_weights(setup["model"].get_weights())
    ckpt = exp / "checkpoints" / "epoch_002.weights.h5"
    m.save_weights(str(ckpt))
    out = tmp_path / "ckpt.npz"
    r = run_tool("predict.py", f"--model={ckpt}", f"--data={setup['glob']}",
                 f"--output={out}", "--batch_size=6", "--noprogress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 clips x 5 classes (with targets)" in r.stdout and "mAP" in r.stdout
    from psla_tf.scoring import load_scorer
    ref = prediction.predict(load_scorer(setup["path"]), setup["glob"], progress=False)
    np.testing.assert_allclose(prediction.load_scores(str(out)).scores, ref.scores, atol=2e-6)

    try:
        from psla_tf.export import export_saved_model
    except ImportError:
        export_saved_model = None
    if export_saved_model is not None:
        sm = tmp_path / "serving"
        export_saved_model(setup["model"], str(sm), [f"/m/c{k}" for k in range(C)],
                           [f"class {k}" for k in range(C)])
        scorer = load_scorer(str(sm))
        assert scorer.kind == "saved_model" and scorer.clip_samples == CLIP_SAMPLES
        p = prediction.predict(scorer, setup["glob"], batch_size=4, progress=False)
        np.testing.assert_allclose(p.scores, ref.scores, atol=1e-5)

    for args, msg in cases:
        r = run_tool("predict.py", *args, "--noprogress")
        assert r.returncode == 2, (args, r.stderr[-1500:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last, last
        assert "Traceback" not in r.stderr
