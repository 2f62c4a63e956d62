"""Audio → TFRecord preparation (psla_tf/data/prepare.py, tools/make_tfrecords.py).

Truth: soundfile + soxr decoding done here independently, NumPy statistics over kaldi_fbank
frames, real FSDD / AudioSet audio, and a really killed subprocess for resumption.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import tensorflow as tf

from psla_tf.data import prepare, records, sources
from psla_tf.data.records import DataError
from psla_tf.features import kaldi_fbank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_tfrecords.py")
Q = 1.0 / 32768


def _reference(path: str, max_seconds: float = 10.0) -> np.ndarray:
    """Independent decode: whole file, mean of channels, soxr HQ to 16 kHz, cut."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != 16000:
        x = soxr.resample(x, sr, 16000, quality="HQ")
    return x[: int(round(max_seconds * 16000))]


def _tone(sr: float, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)
    if channels == 2:
        return np.stack([x, 0.5 * np.sin(2 * np.pi * 1000 * t)], axis=1).astype(np.float32)
    return x.astype(np.float32)


def _read_all(manifest: records.Manifest) -> dict[str, dict]:
    """Examples by id, parsed with records.parse_example (the training parser)."""
    out = {}
    for f in manifest.shard_paths():
        ds = tf.data.TFRecordDataset([f], compression_type=manifest.compression or None)
        for raw in ds:
            ex = records.parse_example(raw, manifest.num_classes)
            out[ex["id"].numpy().decode()] = {"waveform": ex["waveform"].numpy(),
                                              "labels": ex["labels"].numpy()}
    return out


def _run_tool(*args):
    """tools/make_tfrecords.py, in-process (helpers_cli.run_script)."""
    from helpers_cli import run_script
    return run_script(TOOL, "--noprogress", *args)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_rates_stereo_cut_and_stats(tmp_path):
    specs = [(8000, 0.9, 1), (22050, 0.7, 1), (32000, 0.6, 1), (44100, 0.65, 2), (48000, 1.3, 1)]
    lines = ["path,labels"]
    for i, (sr, sec, ch) in enumerate(specs):
        name = f"a{i}_{sr}.flac" if i == 1 else f"a{i}_{sr}.wav"
        sf.write(tmp_path / name, _tone(sr, sec, ch, seed=i), sr,
                 subtype=None if name.endswith("flac") else "PCM_16")
        lines.append(f'{name},"b{i % 2}, c"' if i != 2 else f"{name},")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    rows = sources.read_rows(str(tmp_path / "list.csv"))
    vocab = sources.build_vocabulary(rows)
    target_length = 60  # frames: shorter than the longer clips, so truncation is exercised
    m = prepare.prepare(rows, vocab, str(tmp_path / "out" / "set"), num_shards=2, workers=1,
                        max_seconds=1.0, compression="GZIP", target_length=target_length,
                        progress=False)
    assert os.path.exists(tmp_path / "out" / "set-00001-of-00002.tfrecord.gz")
    got = _read_all(records.read_manifest(str(tmp_path / "out" / "set.manifest.json")))
    assert m.num_examples == 5 == m.listed and not m.failures
    assert m.num_cut == 1 and m.extra["num_unlabelled"] == 1
    assert [s["num_examples"] for s in m.shards] == [3, 2]  # row i -> shard i % 2
    assert m.mids == ["b0", "b1", "c"] and m.class_counts == [2, 2, 4]
    total = 0.0
    for r in rows:
        ref = _reference(r.path, 1.0)
        w = got[r.id]["waveform"]
        assert w.shape == ref.shape, r.id
        assert np.max(np.abs(w - ref)) <= Q, r.id  # int16 quantisation
        total += len(ref) / 16000
        np.testing.assert_array_equal(got[r.id]["labels"],
                                      [float(mid in r.mids) for mid in m.mids])
    assert m.total_seconds == pytest.approx(total)
    # statistics = NumPy over the same frames (clip mean removed, first target_length frames)
    vals = []
    for r in rows:
        w = got[r.id]["waveform"]
        fb = kaldi_fbank(w - w.mean()).numpy()[:target_length].astype(np.float64)
        vals.append(fb.ravel())
    vals = np.concatenate(vals)
    assert m.fbank_frames * 128 == vals.size
    assert m.fbank_mean == pytest.approx(vals.mean(), abs=1e-5)
    assert m.fbank_std == pytest.approx(vals.std(), abs=1e-5)


def test_real_audio_fsdd_and_audioset_clip(tmp_path, shared):
    fsdd = shared("data", "fsdd", "recordings")
    clip = shared("data", "clips", "R9_ZSCveAHg_7s.wav")
    files = [str(fsdd / f) for f in ("0_george_0.wav", "7_jackson_12.wav", "3_theo_40.wav")]
    entries = [{"wav": f, "labels": os.path.basename(f)[0]} for f in files]
    entries.append({"wav": str(clip), "labels": "/m/09x0r"})
    (tmp_path / "d.json").write_text(json.dumps({"data": entries}))
    rows = sources.read_rows(str(tmp_path / "d.json"))
    m = prepare.prepare(rows, sources.build_vocabulary(rows), str(tmp_path / "real"),
                        num_shards=1, max_seconds=5.0, stats=False, progress=False)
    assert m.fbank_mean is None and m.num_cut == 1  # the 7-s clip
    got = _read_all(m)
    for e in entries:
        ref = _reference(e["wav"], 5.0)
        assert np.max(np.abs(got[e["wav"]]["waveform"] - ref)) <= Q
    assert len(got[str(clip)]["waveform"]) == 80000
    # decode_audio, the helper inference reuses, equals the same reference
    np.testing.assert_allclose(prepare.decode_audio(str(clip)), _reference(str(clip)), atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _bad_files(d):
    sf.write(d / "good.wav", _tone(16000, 0.5), 16000, subtype="PCM_16")
    (d / "garbage.wav").write_bytes(os.urandom(2000))
    (d / "zero_bytes.wav").write_bytes(b"")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "full.wav", _tone(16000, 0.5), 16000, subtype="PCM_16")
    b = (d / "full.wav").read_bytes()
    (d / "truncated.wav").write_bytes(b[: len(b) // 2])
    sf.write(d / "full.flac", _tone(16000, 0.5), 16000)
    b = (d / "full.flac").read_bytes()
    (d / "truncated.flac").write_bytes(b[: len(b) // 2])
    x = _tone(16000, 0.5)
    x[100] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    x[100] = np.inf
    sf.write(d / "inf.wav", x, 16000, subtype="FLOAT")
    return {"missing.wav": "missing", "garbage.wav": "unreadable", "zero_bytes.wav": "unreadable",
            "empty.wav": "empty", "truncated.wav": "truncated", "truncated.flac": "truncated",
            "nan.wav": "non-finite", "inf.wav": "non-finite"}


def test_bad_inputs_skipped_listed_and_strict_exit(tmp_path):
    expected = _bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(prepare.AudioError, match=reason):
            prepare.decode_audio(str(tmp_path / name))
    names = ["good.wav"] + list(expected)
    (tmp_path / "list.csv").write_text("path,labels\n" + "".join(f"{n},x\n" for n in names))
    out = tmp_path / "o" / "bad"
    r = _run_tool(f"--input={tmp_path / 'list.csv'}", f"--output_prefix={out}", "--num_shards=2",
                  "--strict", "--no_stats")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert f"written 1 / failed {len(expected)} / cut 0 / listed {len(names)}" in r.stdout
    with open(f"{out}.failures.csv") as f:
        fails = list(csv.DictReader(f))
    assert [x["id"] for x in fails] == list(expected)  # input order
    for x in fails:
        assert expected[x["id"]] in x["reason"]
    m = records.read_manifest(f"{out}.manifest.json")
    assert m.num_examples == 1 and len(m.failures) == len(expected) and m.listed == len(names)
    # library: without strict the same input returns the manifest, with strict it raises after
    # writing
    rows = sources.read_rows(str(tmp_path / "list.csv"))
    with pytest.raises(prepare.PreparationFailed) as e:
        prepare.prepare(rows, (["x"], ["x"]), str(tmp_path / "lib"), strict=True, stats=False,
                        progress=False)
    assert e.value.manifest.num_examples == 1
    assert prepare.nothing_prepared(e.value.manifest, "x") is None
    # every clip failed: one line naming the first failure; remove_set leaves other sets
    (tmp_path / "bad.csv").write_text("path,labels\n" + "".join(f"{n},x\n" for n in expected))
    m = prepare.prepare(sources.read_rows(str(tmp_path / "bad.csv")), (["x"], ["x"]),
                        str(tmp_path / "o" / "bad_only"), stats=False, progress=False)
    msg = prepare.nothing_prepared(m, "bad.csv")
    first = next(iter(expected))
    assert msg.startswith(f"bad.csv: none of the {len(expected)} clips could be prepared (first: ")
    assert first in msg and expected[first] in msg
    kept = sorted(os.listdir(tmp_path / "o"))
    prepare.remove_set(str(tmp_path / "o" / "bad_only"))
    assert sorted(os.listdir(tmp_path / "o")) == [f for f in kept if not f.startswith("bad_only")]
    assert any(f.startswith("bad-") for f in os.listdir(tmp_path / "o"))
    r = _run_tool(f"--input={tmp_path / 'bad.csv'}", f"--output_prefix={tmp_path}/o2/b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "none of the" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o2").exists() or not os.listdir(tmp_path / "o2")


def test_unknown_mid_stops_before_writing(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(16000, 0.3), 16000)
    (tmp_path / "d.json").write_text(json.dumps({"data": [
        {"wav": "a.wav", "labels": "/m/09x0r,/m/NOPE"}, {"wav": "a.wav", "labels": "/m/ALSO"},
        {"wav": "a.wav", "labels": "/m/NOPE"}]}))
    labels = tmp_path / "labels.csv"
    labels.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n')
    out = tmp_path / "o"
    r = _run_tool(f"--input={tmp_path / 'd.json'}", f"--label_csv={labels}",
                  f"--output_prefix={out}/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'/m/NOPE' on line(s) 1, 3" in r.stderr and "'/m/ALSO' on line(s) 2" in r.stderr
    assert not out.exists() or not os.listdir(out)


def test_audioset_csv_input_with_pattern(tmp_path):
    sf.write(tmp_path / "abc_30.wav", _tone(32000, 0.4), 32000)
    sf.write(tmp_path / "-xy_0.wav", _tone(44100, 0.4, 2), 44100)
    (tmp_path / "seg.csv").write_text(
        "# comment\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'abc, 30.000, 40.000, "/m/1,/m/2"\n-xy, 0.000, 10.000, "/m/2"\n')
    rows = sources.read_rows(str(tmp_path / "seg.csv"), audio_dir=str(tmp_path),
                             filename_pattern="{YTID}_{start:d}.wav")
    m = prepare.prepare(rows, (["/m/1", "/m/2"], ["one", "two"]), str(tmp_path / "as"),
                        stats=False, progress=False)
    got = _read_all(m)
    assert set(got) == {"abc_30.000", "-xy_0.000"} and m.class_counts == [1, 2]
    assert np.max(np.abs(got["-xy_0.000"]["waveform"] - _reference(str(tmp_path / "-xy_0.wav")))) <= Q


# ----------------------------------------------------------------------------- resumption
def test_resume_after_sigkill_equals_clean_run(tmp_path):
    n, shards = 240, 80
    lines = ["path,labels"]
    for i in range(n):
        sf.write(tmp_path / f"c{i}.wav", _tone(44100, 0.3, seed=i), 44100, subtype="PCM_16")
        lines.append(f"c{i}.wav,{'ab'[i % 2]}")
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run" / "set"
    args = [f"--input={tmp_path / 'l.csv'}", f"--output_prefix={out}", f"--num_shards={shards}",
            "--target_length=50"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, TOOL, "--noprogress", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    sidecars = []
    while time.time() < deadline and proc.poll() is None:
        sidecars = [p for p in os.listdir(out.parent) if p.endswith(".done.json")] \
            if out.parent.exists() else []
        if len(sidecars) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    finished = sorted(p[: -len(".done.json")] for p in os.listdir(out.parent)
                      if p.endswith(".done.json"))
    assert 3 <= len(finished) < shards and not os.path.exists(f"{out}.manifest.json")
    mtimes = {f: os.stat(out.parent / f).st_mtime_ns for f in finished}
    r = _run_tool(*args)
    assert r.returncode == 0, r.stderr
    assert {f: os.stat(out.parent / f).st_mtime_ns for f in finished} == mtimes  # not rewritten
    rows = sources.read_rows(str(tmp_path / "l.csv"))
    clean = prepare.prepare(rows, sources.build_vocabulary(rows), str(tmp_path / "clean" / "set"),
                            num_shards=shards, target_length=50, progress=False)
    resumed = records.read_manifest(f"{out}.manifest.json")
    a, b = resumed.to_json(), clean.to_json()
    assert a == b
    for fa, fb in zip(resumed.shard_paths(), clean.shard_paths()):
        ea, eb = list(records.iter_examples([fa])), list(records.iter_examples([fb]))
        assert [e["id"] for e in ea] == [e["id"] for e in eb] and ea
        for x, y in zip(ea, eb):
            np.testing.assert_array_equal(x["waveform_int16"], y["waveform_int16"])
            assert x["labels"] == y["labels"] and x["mids"] == y["mids"]
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


# ----------------------------------------------------------------------------- memory
_RSS = """
import resource, runpy, sys
sys.argv = ["make_tfrecords.py"] + sys.argv[1:]
try:
    runpy.run_path({tool!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
# VmHWM is this process image's own peak (ru_maxrss would include the pytest parent's peak:
# Linux carries the high-water mark across fork + exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("PEAK_RSS_KB", hwm)
"""


def _peak_rss_mb(tmp_path, n):
    d = tmp_path / f"m{n}"
    d.mkdir()
    x = _tone(22050, 0.25)
    lines = ["path,labels"]
    for i in range(n):
        sf.write(d / f"{i}.wav", x, 22050, subtype="PCM_16")
        lines.append(f"{i}.wav,a")
    (d / "l.csv").write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-c", _RSS.format(tool=TOOL), "--noprogress",
                        f"--input={d / 'l.csv'}", f"--output_prefix={d / 'o' / 'x'}",
                        "--num_shards=4", "--no_stats"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert f"written {n} / failed 0" in r.stdout
    return int(r.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024


def test_memory_bounded_2000_clips(tmp_path):
    small = _peak_rss_mb(tmp_path, 200)
    big = _peak_rss_mb(tmp_path, 2000)
    # The process holds TF (~0.5 GB) plus one clip at a time: the bound is absolute and the
    # growth from 200 to 2000 clips (10x) must stay below 40 MB (rows list + sidecars only).
    # (--no_stats keeps the test fast; statistics add three float64 scalars per shard.)
    assert big < 1500, big
    assert big - small < 40, (small, big)


def test_benchmark_helper_runs(tmp_path):
    res = prepare.benchmark_prepare(str(tmp_path), num_clips=2, seconds=1.0, workers_list=(1,))
    assert set(res) == {1} and res[1] > 0


def test_stats_equal_the_frames_the_model_sees_in_training(tmp_path, shared):
    """Manifest statistics = NumPy mean/std of the un-normalised fbank frames the model's
    AudioFrontend computes from the training pipeline's padded batches, counting only each
    clip's own frames (padding excluded), on real FSDD audio; some clips exceed
    target_length, so the cut is exercised too."""
    from psla_tf.data import pipeline
    from psla_tf.features import num_frames
    from psla_tf.models.frontend import AudioFrontend
    rec = shared("data", "fsdd", "recordings")
    names = ["0_george_0.wav", "5_lucas_3.wav", "7_theo_10.wav", "9_yweweler_2.wav",
             "2_nicolas_7.wav", "8_jackson_1.wav"]
    lines = ["path,labels"] + [f"{rec / n},{n[0]}" for n in names]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    rows = sources.read_rows(str(tmp_path / "l.csv"))
    tl = 40  # 0.415 s: shorter than most of these clips
    m = prepare.prepare(rows, sources.build_vocabulary(rows), str(tmp_path / "s"),
                        num_shards=2, target_length=tl, progress=False)
    spec = records.load_data_spec(str(tmp_path / "s-*.tfrecord"))
    clip = pipeline.clip_samples_for_frames(tl)
    ds = pipeline.make_eval_dataset(spec, batch_size=4, clip_samples=clip)
    front = AudioFrontend(tl, freqm=0, timem=0, dataset_mean=0.0, dataset_std=1.0)
    vals, cut = [], 0
    for x, _ in ds:
        fb = front(x["waveform"], x["num_samples"], training=False).numpy()
        for b, n in enumerate(x["num_samples"].numpy()):
            frames = min(num_frames(int(n)), tl)  # n: the pipeline's cut length
            vals.append(fb[b, :frames].astype(np.float64).ravel())
    vals = np.concatenate(vals)
    cut = sum(num_frames(2 * sf.info(str(rec / n)).frames) > tl for n in names)  # 8 → 16 kHz
    assert cut >= 2 and m.fbank_frames * 128 == vals.size
    assert m.fbank_mean == pytest.approx(vals.mean(), abs=2e-4)
    assert m.fbank_std == pytest.approx(vals.std(), abs=2e-4)
