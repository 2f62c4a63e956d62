"""tools/infer.py and psla_tf.inference: windows and times, clip scores equal to the model on
the windows directly (real audio), frame-level attention, bounded memory on a 1-hour file,
errors."""
from __future__ import annotations

import json
import math
import os
import tracemalloc

import numpy as np
import pytest

from conftest import shared_path
from helpers_models import make_tagger, save_tagger, write_wav
from test_predict import run_tool

C = 5


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    model = make_tagger(C, seed=7)
    return model, save_tagger(model, str(d / "run"))


def test_window_starts():
    from psla_tf.inference import window_starts
    assert window_starts(0, 10, 5) == []
    assert window_starts(7, 10, 5) == [0]
    assert window_starts(10, 10, 5) == [0]
    assert window_starts(11, 10, 5) == [0, 5]
    assert window_starts(25, 10, 5) == [0, 5, 10, 15]
    assert window_starts(26, 10, 5) == [0, 5, 10, 15, 20]


def test_real_clip_equals_model_on_windows(tagger):
    """The 7-s AudioSet clip (32 kHz): 0.5-s windows every 0.3 s; clip scores (max and mean)
    equal the model applied to the windows cut from the decoded file directly."""
    from psla_tf.data.prepare import decode_audio
    from psla_tf.inference import KerasScorer, tag_file
    model, _ = tagger
    clip = str(shared_path("data", "clips", "R9_ZSCveAHg_7s.wav"))
    scorer = KerasScorer(model, [f"/m/c{k}" for k in range(C)], [str(k) for k in range(C)])
    res = tag_file(scorer, clip, window_seconds=0.5, hop_seconds=0.3, batch_size=4)
    audio = decode_audio(clip)                       # one-shot resampling, not streamed
    total = audio.size
    assert total == 7 * 16000 and res.duration == pytest.approx(7.0)
    count = math.ceil((total - 8000) / 4800) + 1
    assert len(res.windows) == count == 23
    for i, w in enumerate(res.windows):
        assert w.start == pytest.approx(0.3 * i)
        assert w.end == pytest.approx(min(0.3 * i + 0.5, 7.0))
    batch = np.zeros((count, 8000), np.float32)
    lengths = np.zeros(count, np.int32)
    for i in range(count):
        x = audio[4800 * i: 4800 * i + 8000]
        batch[i, : x.size] = x
        lengths[i] = x.size
    direct = model({"waveform": batch, "num_samples": lengths}, training=False).numpy()
    got = np.stack([w.scores for w in res.windows])
    np.testing.assert_allclose(got, direct, atol=1e-4)   # streamed vs one-shot resampling
    np.testing.assert_allclose(res.clip_scores, got.max(0), atol=0)
    mean = tag_file(scorer, clip, window_seconds=0.5, hop_seconds=0.3, pooling="mean")
    np.testing.assert_allclose(mean.clip_scores, got.mean(0), atol=1e-6)


def test_frame_level_reproduces_window_scores(tagger, tmp_path):
    """The frame-level file of the 7-s AudioSet clip (12 windows, streamed to disk in 3
    batches): attention sums to 1 over time and Σ_h w_h Σ_t attention·frame_scores = each
    window's score (Fig. 2); frame times tile each window's model input."""
    from psla_tf.inference import FrameLevelWriter, KerasScorer, tag_file
    model, _ = tagger
    clip = str(shared_path("data", "clips", "R9_ZSCveAHg_7s.wav"))
    scorer = KerasScorer(model, [f"/m/c{k}" for k in range(C)], [str(k) for k in range(C)])
    out = str(tmp_path / "f" / "clip.frames.npz")
    writer = FrameLevelWriter(scorer.frame_level, out, 0.64, scorer.mids, scorer.names)
    res = tag_file(scorer, clip, window_seconds=0.6, hop_seconds=0.6, batch_size=5,
                   frame_fn=writer)
    assert writer.finish(res.windows) == out
    assert os.listdir(tmp_path / "f") == ["clip.frames.npz"]       # temporary files gone
    z = np.load(out)
    att, cla = z["attention"], z["frame_scores"]                     # [W, H, T', C]
    assert att.shape[:2] == (12, 2) and att.shape == cla.shape
    np.testing.assert_allclose(att.sum(axis=2), 1.0, atol=1e-5)
    head_w = model.get_layer("classifier").get_layer("pooling").head_weight.numpy()
    recon = np.einsum("h,whc->wc", head_w, (att * cla).sum(axis=2))
    np.testing.assert_allclose(recon, np.stack([w.scores for w in res.windows]), atol=1e-5)
    t = att.shape[2]
    np.testing.assert_allclose(z["window_start"], 0.6 * np.arange(12), atol=1e-9)
    np.testing.assert_allclose(z["frame_start"][3], 1.8 + 0.64 / t * np.arange(t), atol=1e-9)
    np.testing.assert_allclose(z["frame_end"][:, -1], z["window_start"] + 0.64, atol=1e-9)


class _MeanAbs:
    """A stand-in scorer (NumPy): [mean |x|, max |x|, valid fraction] per window."""
    sample_rate = 16000

    def __call__(self, wav, n):
        valid = np.arange(wav.shape[1])[None] < n[:, None]
        a = np.abs(wav) * valid
        return np.stack([a.sum(1) / n, a.max(1), n / wav.shape[1]], 1).astype(np.float32)


def _long_wav(path, seconds, sr=8000):
    import soundfile as sf
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", sr, 1, "PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write((rng.normal(0, 0.1, 60 * sr)).astype(np.float32))


def test_one_hour_file_bounded_memory(tmp_path):
    """A 1-hour 8-kHz file streams through in bounded memory: peak traced allocations do not
    grow with length (1 h vs 6 min) and stay far below the decoded file (230 MB)."""
    from psla_tf.inference import tag_file
    peaks = {}
    for minutes in (6, 60):
        path = tmp_path / f"long{minutes}.wav"
        _long_wav(path, minutes * 60)
        tracemalloc.start()
        res = tag_file(_MeanAbs(), str(path), window_seconds=10, hop_seconds=5, batch_size=4)
        peaks[minutes] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        total = minutes * 60
        assert len(res.windows) == math.ceil((total - 10) / 5) + 1
        assert res.windows[-1].end == pytest.approx(total)
        assert res.duration == pytest.approx(total)
        path.unlink()
    assert peaks[60] < 23e6, peaks          # < 10 % of the decoded file
    assert peaks[60] < 1.3 * peaks[6] + 2e6, peaks


def test_cli_mixed_files_and_errors(tagger, tmp_path):
    """Stereo 44.1-kHz FLAC, an FSDD wav, a sub-frame clip and a non-audio file in one call:
    the good files are tagged (JSON), the bad ones reported, exit code 1; a window longer
    than the model's input and a vocabulary mismatch are one-line errors (exit 2)."""
    import soundfile as sf
    _, path = tagger
    rng = np.random.default_rng(1)
    flac = tmp_path / "stereo.flac"
    sf.write(str(flac), rng.normal(0, 0.1, (44100 * 2, 2)).astype(np.float32), 44100)
    short = write_wav(str(tmp_path / "short.wav"), np.zeros(300, np.float32), 16000)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    rec = str(shared_path("data", "fsdd", "recordings", "3_jackson_0.wav"))
    frames = tmp_path / "frames"
    r = run_tool("infer.py", f"--model={path}", "--window_seconds=0.6", "--hop_seconds=0.4",
                 "--top_k=2", "--json", "--frame_level", f"--frame_dir={frames}",
                 str(flac), rec, short, str(text))
    assert r.returncode == 1, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert [f["path"] for f in out["files"]] == [str(flac), rec]
    stereo = out["files"][0]
    assert stereo["duration"] == pytest.approx(2.0) and stereo["num_windows"] == 5
    assert [w["start"] for w in stereo["windows"]] == pytest.approx([0, 0.4, 0.8, 1.2, 1.6])
    assert len(stereo["clip"]) == 2 and {"mid", "name", "score"} <= set(stereo["clip"][0])
    fsdd = out["files"][1]                                 # 8 kHz, resampled while streamed
    seconds = sf.info(rec).frames / 8000
    assert fsdd["duration"] == pytest.approx(seconds, abs=1e-3)
    assert fsdd["num_windows"] == max(1, math.ceil((seconds - 0.6) / 0.4 - 1e-9) + 1)
    errs = {e["path"]: e["error"] for e in out["errors"]}
    assert "shorter than one" in errs[short] and "cannot read audio" in errs[str(text)]
    z = np.load(stereo["frame_level"])
    assert z["attention"].shape[:2] == (5, 2) and z["frame_start"].shape[0] == 5

    (tmp_path / "two.csv").write_text("index,mid,display_name\n0,/m/a,a\n1,/m/b,b\n")
    for args, msg in [(["--window_seconds=10"], "longer than the model's input"),
                      ([f"--label_csv={tmp_path / 'two.csv'}", "--window_seconds=0.5"],
                       "5 outputs but its vocabulary lists 2")]:
        r = run_tool("infer.py", f"--model={path}", *args, rec)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last, last
