"""Kaldi fbank parity with torchaudio's reference vectors (DESIGN.md "Features")."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from psla_tf import features, params
from tests.conftest import shared_path

MEAN_TOL = 1e-3
P999_TOL = 2e-2


def _reference_files():
    d = shared_path("fbank_reference")
    files = sorted(d.glob("*.npz"))
    if not files:
        pytest.skip(f"no reference vectors in {d}")
    return [dict(np.load(f)) | {"file": f.name} for f in files]


def _check(out: np.ndarray, ref: np.ndarray, name: str) -> None:
    assert out.shape == ref.shape, f"{name}: frames {out.shape} vs reference {ref.shape}"
    if ref.size == 0:
        return
    diff = np.abs(out - ref)
    assert diff.mean() <= MEAN_TOL, f"{name}: mean |d| {diff.mean()}"
    assert np.percentile(diff, 99.9) <= P999_TOL, f"{name}: p99.9 {np.percentile(diff, 99.9)}"


@pytest.mark.parametrize("dft", ["matmul", "rfft"])
def test_matches_torchaudio_reference_per_clip(dft):
    for ref in _reference_files():
        out = features.kaldi_fbank(ref["waveform"], dft=dft).numpy()
        _check(out, ref["fbank"], f"{ref['file']} ({dft})")


@pytest.mark.parametrize("dft", ["matmul", "rfft"])
def test_matches_reference_batched_and_padded(dft):
    """Clips padded to one length and batched: each clip's valid frames equal its reference."""
    refs = _reference_files()
    longest = max(r["waveform"].shape[0] for r in refs)
    batch = np.zeros((len(refs), longest), np.float32)
    for i, r in enumerate(refs):
        batch[i, : r["waveform"].shape[0]] = r["waveform"]
    out = features.kaldi_fbank(batch, dft=dft).numpy()
    assert out.shape == (len(refs), features.num_frames(longest), params.NUM_MEL_BINS)
    for i, r in enumerate(refs):
        n = r["fbank"].shape[0]
        _check(out[i, :n], r["fbank"], f"batched {r['file']} ({dft})")


def test_frame_count_rule():
    for n, expected in [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (160000, 998)]:
        assert features.num_frames(n) == expected
        out = features.kaldi_fbank(np.zeros(n, np.float32))
        assert out.shape == (expected, 128)


def test_empty_filter_is_log_eps():
    """At 128 bins filter 3 covers no FFT bin: log(float32 eps) = -15.9424 in every frame."""
    banks = features.kaldi_mel_banks()
    assert banks.shape == (257, 128)
    assert np.all(banks[:, 3] == 0)
    rng = np.random.default_rng(0)
    out = features.kaldi_fbank(rng.uniform(-0.5, 0.5, 16000).astype(np.float32)).numpy()
    np.testing.assert_allclose(out[:, 3], np.log(np.float32(params.LOG_FLOOR)), rtol=0, atol=1e-5)
    assert np.log(params.LOG_FLOOR) == pytest.approx(-15.9424, abs=1e-4)


def test_numpy_reimplementation_independent():
    """An independent float64 NumPy Kaldi pipeline (step by step, numpy FFT) agrees."""
    rng = np.random.default_rng(1)
    w = (0.3 * rng.standard_normal(5000)).astype(np.float32)
    n_frames = 1 + (len(w) - 400) // 160
    frames = np.stack([w[i * 160: i * 160 + 400] for i in range(n_frames)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * prev
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    bins = mel(np.arange(256) * 16000 / 512)
    fb = np.zeros((128, 257))
    for m in range(128):
        l, c, r = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        fb[m, :256] = np.maximum(0, np.minimum((bins - l) / (c - l), (r - bins) / (r - c)))
    expected = np.log(np.maximum(power @ fb.T, np.finfo(np.float32).eps))
    for dft in ("matmul", "rfft"):
        out = features.kaldi_fbank(w, dft=dft).numpy()
        assert np.abs(out - expected).mean() < 1e-4
        assert np.abs(out - expected).max() < 5e-2


def test_power_scale_is_the_same_function():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, 4000).astype(np.float32)
    a = features.kaldi_fbank(w).numpy()
    b = features.kaldi_fbank(w, power_scale=64.0).numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_layer_tf_function_xla_and_serialisation(tmp_path):
    import keras
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 4000)).astype(np.float32)
    eager = features.kaldi_fbank(x).numpy()
    jitted = tf.function(features.kaldi_fbank, jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(eager, jitted, atol=2e-3)
    inp = keras.Input((4000,))
    model = keras.Model(inp, features.KaldiFbank()(inp))
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, atol=1e-5)
    path = tmp_path / "fbank.keras"
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), eager, atol=1e-5)
    assert again.layers[-1].get_config()["num_mel_bins"] == 128


def test_inside_tf_data():
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((3, 1000), np.float32))
    ds = ds.map(features.kaldi_fbank).batch(3)
    out = next(iter(ds)).numpy()
    assert out.shape == (3, features.num_frames(1000), 128)


def _numpy_fbank(w: np.ndarray, frame_length: int, frame_shift: int, fft_length: int,
                 num_mel_bins: int, sample_rate: int = 16000) -> np.ndarray:
    """Kaldi fbank step by step in float64 NumPy (frames by a Python loop, np.fft.rfft, the
    mel triangles from their definition), for any frame / FFT sizes."""
    n_frames = 1 + (len(w) - frame_length) // frame_shift
    frames = np.stack([w[i * frame_shift: i * frame_shift + frame_length]
                       for i in range(n_frames)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / (frame_length - 1))
    power = np.abs(np.fft.rfft(frames, n=fft_length)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(sample_rate / 2)
    delta = (hi - lo) / (num_mel_bins + 1)
    bins = mel(np.arange(fft_length // 2) * sample_rate / fft_length)
    fb = np.zeros((num_mel_bins, fft_length // 2 + 1))
    for m in range(num_mel_bins):
        l, c, r = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        fb[m, :-1] = np.maximum(0, np.minimum((bins - l) / (c - l), (r - bins) / (r - c)))
    return np.log(np.maximum(power @ fb.T, np.finfo(np.float32).eps))


@pytest.mark.parametrize("frame_length,frame_shift,fft_length,bins", [
    (320, 160, 512, 128),    # frame = whole rows of the shift
    (100, 160, 128, 40),     # frame shorter than the shift
    (400, 100, 1024, 128),   # four whole rows, a 1024-point FFT
    (512, 256, 512, 64),     # no zero padding before the FFT
])
def test_other_frame_and_fft_sizes_match_numpy(frame_length, frame_shift, fft_length, bins):
    """Both DFT paths (the rfft path cuts frames from rows of the shift, q rows + r samples)
    agree with the float64 NumPy pipeline for frame / shift / FFT sizes other than PSLA's."""
    rng = np.random.default_rng(4)
    w = (0.3 * rng.standard_normal((2, 7777))).astype(np.float32)
    expected = np.stack([_numpy_fbank(c, frame_length, frame_shift, fft_length, bins)
                         for c in w])
    for dft in ("matmul", "rfft"):
        out = features.kaldi_fbank(w, num_mel_bins=bins, frame_length=frame_length,
                                   frame_shift=frame_shift, fft_length=fft_length,
                                   dft=dft).numpy()
        assert out.shape == expected.shape
        d = np.abs(out - expected)
        assert d.mean() < 1e-4 and d.max() < 5e-2, (dft, d.mean(), d.max())


def test_rfft_loop_steps_do_not_change_the_result():
    """The CPU loop over clips (any number of clips per step, a last step with fewer clips)
    gives the same features as the whole batch at once (chunk_samples=0), clip by clip."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.5, 0.5, (5, 16000)).astype(np.float32)
    whole = features.kaldi_fbank(x, dft="rfft", chunk_samples=0).numpy()
    for chunk in (None, 1, 32000, 48000, 10 ** 7):     # 1, 2, 3 and all 5 clips per step
        out = features.kaldi_fbank(x, dft="rfft", chunk_samples=chunk).numpy()
        np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)
    for i in range(len(x)):
        np.testing.assert_allclose(features.kaldi_fbank(x[i], dft="rfft").numpy(), whole[i],
                                   rtol=0, atol=1e-5)


def test_rfft_shapes_empty_batch_leading_dims_and_dynamic_lengths():
    assert features.kaldi_fbank(np.zeros((0, 4000), np.float32)).shape == (0, 23, 128)
    rng = np.random.default_rng(6)
    x = rng.uniform(-0.5, 0.5, (2, 3, 4000)).astype(np.float32)
    out = features.kaldi_fbank(x, dft="rfft").numpy()
    assert out.shape == (2, 3, 23, 128)
    np.testing.assert_allclose(out[1, 2], features.kaldi_fbank(x[1, 2], dft="matmul").numpy(),
                               rtol=0, atol=2e-3)
    fn = tf.function(lambda w: features.kaldi_fbank(w, dft="rfft"),
                     input_signature=[tf.TensorSpec([None, None], tf.float32)])
    for n in (399, 400, 3000):
        got = fn(tf.constant(x[0, :, :n])).numpy()
        assert got.shape == (3, features.num_frames(n), 128)
        np.testing.assert_allclose(got, features.kaldi_fbank(x[0, :, :n], dft="matmul").numpy(),
                                   rtol=0, atol=2e-3)
    static = tf.function(lambda w: features.kaldi_fbank(w, dft="rfft"))
    assert static.get_concrete_function(
        tf.TensorSpec([4, 16000])).structured_outputs.shape == (4, 98, 128)


def test_rfft_static_single_clip_runs_without_the_loop():
    """A clip whose leading size is statically 1 (tf.data's per-clip map) is computed in one
    step, without the CPU loop's while op; the features equal the looped path's."""
    x = np.random.default_rng(8).uniform(-0.5, 0.5, (1, 16000)).astype(np.float32)
    specs = {"single": tf.TensorSpec([1, None]), "dynamic": tf.TensorSpec([None, None])}
    fns = {k: tf.function(lambda w: features.kaldi_fbank(w, dft="rfft")).get_concrete_function(s)
           for k, s in specs.items()}
    loops = {k: sum(op.type in ("While", "StatelessWhile") for op in f.graph.get_operations())
             for k, f in fns.items()}
    assert loops == {"single": 0, "dynamic": 1}, loops
    np.testing.assert_allclose(fns["single"](tf.constant(x)).numpy(),
                               fns["dynamic"](tf.constant(x)).numpy(), rtol=0, atol=1e-5)


def test_rfft_under_xla_matches_matmul():
    """Under jit_compile the rfft path runs without the loop and the complex bitcast."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 8000)).astype(np.float32)
    jitted = tf.function(lambda w: features.kaldi_fbank(w, dft="rfft"), jit_compile=True)
    np.testing.assert_allclose(jitted(tf.constant(x)).numpy(),
                               features.kaldi_fbank(x, dft="matmul").numpy(), atol=2e-3)


def test_auto_dft_resolution():
    assert features.resolve_dft("auto") == "rfft"                      # this CPU machine
    assert features.resolve_dft("auto", "/job:worker/replica:0/task:0/device:TPU:0") == "matmul"
    assert features.resolve_dft("matmul") == "matmul"
    assert features.resolve_dft("rfft", "/device:TPU:0") == "rfft"    # explicit choice kept
    with pytest.raises(ValueError, match="dft must be one of"):
        features.resolve_dft("fft")
    with pytest.raises(ValueError, match="dft must be one of"):
        features.KaldiFbank(dft="fft")


def test_mel_blocks_hold_every_nonzero_weight():
    """The banded mel sum's blocks, put back in place, are Kaldi's mel matrix exactly."""
    banks = features.kaldi_mel_banks()
    for groups in (1, 3, 6, 20):
        rebuilt = np.zeros_like(banks)
        col = 0
        for lo, hi, block in features._mel_groups(128, 16000, 512, 20.0, 0.0, groups, False):
            rebuilt[lo:hi, col:col + block.shape[1]] = block
            col += block.shape[1]
        assert col == 128
        np.testing.assert_array_equal(rebuilt, banks)
    blocks = features._mel_groups(128, 16000, 512, 20.0, 0.0, features.MEL_GROUPS, False)
    assert sum(b.size for _, _, b in blocks) < 0.2 * banks.size      # banded: < 20 % dense


def _op_types(concrete) -> set[str]:
    """Op types of a concrete function's graph and of every function it calls (loop bodies)."""
    graph_def = concrete.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def test_front_end_dft_choice_and_exports_trace_the_matmul_form():
    """The model front end's default ("auto") traces the rfft path on this CPU; an explicit
    "matmul" and anything traced under forced_dft("matmul") (what the exports do) has no FFT;
    all give the same features."""
    from psla_tf import export
    from psla_tf.models.frontend import AudioFrontend
    from tests.helpers_models import CLIP_SAMPLES, make_tagger
    rng = np.random.default_rng(8)
    w = tf.constant(rng.uniform(-0.5, 0.5, (2, CLIP_SAMPLES)).astype(np.float32))
    n = tf.constant([CLIP_SAMPLES, 5000], tf.int32)
    spec = (tf.TensorSpec([None, CLIP_SAMPLES]), tf.TensorSpec([None], tf.int32))
    auto = AudioFrontend(64, freqm=0, timem=0)
    assert auto.dft == "auto" and auto.get_config()["dft"] == "auto"
    with pytest.raises(ValueError, match="dft must be one of"):
        AudioFrontend(64, dft="fft")
    traced = tf.function(lambda a, b: auto(a, b)).get_concrete_function(*spec)
    assert "RFFT" in _op_types(traced)
    with features.forced_dft("matmul"):
        forced = tf.function(lambda a, b: auto(a, b)).get_concrete_function(*spec)
    assert "RFFT" not in _op_types(forced)
    matmul = AudioFrontend(64, freqm=0, timem=0, dft="matmul")
    np.testing.assert_allclose(traced(w, n).numpy(), matmul(w, n).numpy(), atol=2e-3)
    np.testing.assert_allclose(forced(w, n).numpy(), matmul(w, n).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="forced_dft needs"):
        with features.forced_dft("auto"):
            pass
    scorer = export.ScoringModel(make_tagger(num_classes=3))
    exported = tf.function(lambda a, b: scorer(a, b)).get_concrete_function(*spec)
    assert "RFFT" not in _op_types(exported) and "BatchMatMulV2" in _op_types(exported)


def test_trainer_flag_sets_the_front_end_dft_and_is_recorded():
    """--fbank_dft reaches the model's front end and the run's flags.txt text; a run may be
    resumed with another value (same features)."""
    from absl import flags as absl_flags
    from psla_tf import config
    from psla_tf.training import flags as train_flags, trainer
    fv = absl_flags.FlagValues()
    train_flags.define_flags(fv)
    fv(["main.py"])
    assert train_flags.config_from_flags(fv).fbank_dft == "auto"
    fv(["main.py", "--fbank_dft=rfft", "--eff_b=0", "--target_length=64", "--att_head=1",
        "--pretrained=none",
        "--dataset_mean=-4.0", "--dataset_std=4.0"])
    cfg = train_flags.config_from_flags(fv)
    assert "--fbank_dft=rfft" in config.flagfile_text(cfg).splitlines()
    assert trainer.build_model(cfg, 3).get_layer("frontend").dft == "rfft"
    assert "fbank_dft" in trainer._RESUME_FREE_FLAGS
    with pytest.raises(absl_flags.IllegalFlagValueError):
        fv(["main.py", "--fbank_dft=fft"])
