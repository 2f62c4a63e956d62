"""Per-clip normalisation of the front end (``AudioFrontend(clip_norm=...)``, ``--clip_norm``).

Truth: per-clip, per-bin mean / variance over the valid frames computed with NumPy in float64;
the level invariance a gain must give (a gain g adds 2 ln g to every log-mel value); exported
SavedModel / TFLite scores against the Keras model that carries the option.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 48                                      # frames of the small front ends
CLIP = (T - 1) * 160 + 400                  # 7920 samples


def _np_clip_norm(fb, n, mode, std=1.0, floor=1e-2):
    out = np.zeros_like(fb, np.float64)
    for b in range(fb.shape[0]):
        k = int(n[b])
        if k == 0:
            continue
        x = fb[b, :k].astype(np.float64)
        x = x - x.mean(0)
        out[b, :k] = x / std if mode == "cmn" else x / np.sqrt((x ** 2).mean(0) + floor)
    return out


def _speechlike(n, seed, gain=1.0):
    """Harmonics with a moving pitch plus noise (every bin well above the log floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    f0 = 120 + 60 * t / t[-1]
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000.0) / k for k in range(1, 20))
    x = 0.2 * x + 0.02 * rng.standard_normal(n)
    return (gain * x).astype(np.float32)


def test_clip_normalise_matches_numpy():
    from psla_tf.models.frontend import clip_normalise
    rng = np.random.default_rng(0)
    fb = rng.normal(-8.0, 3.0, (4, 20, 8)).astype(np.float32)
    n = np.array([20, 7, 0, 1], np.int32)
    fb[1, 7:] = 0.0                         # the front end's padding is 0 before normalising
    for mode, std in (("cmn", 2.5), ("cmvn", 1.0)):
        got = clip_normalise(fb, n, mode, std).numpy()
        np.testing.assert_allclose(got, _np_clip_norm(fb, n, mode, std), atol=2e-5)
        assert np.all(got[1, 7:] == 0) and np.all(got[2] == 0)
        if mode == "cmvn":   # unit variance per bin where the variance is far above the floor
            np.testing.assert_allclose(got[0].var(0), 3.0 ** 2 / (3.0 ** 2 + 1e-2), rtol=0.05)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_normalise(fb, n, "global")


def test_frontend_clip_norm_removes_level_and_matches_numpy():
    """A -20 dB copy of a clip: the paper's front end moves by 2 ln(0.1) / std everywhere,
    cmn/cmvn give the same output (within 1e-4); both equal the NumPy normalisation of the
    layer's own fbank over its valid frames; padding frames are 0."""
    from psla_tf.models.frontend import AudioFrontend
    lengths = [CLIP, 5000, 300]             # whole input, 30 frames, no frame at all
    w = np.zeros((3, CLIP), np.float32)
    for i, n in enumerate(lengths):
        w[i, :n] = _speechlike(n, i)
    n = np.array(lengths, np.int32)
    frames = np.array([T, 1 + (5000 - 400) // 160, 0])
    quiet = 0.1 * w
    plain = AudioFrontend(T, freqm=0, timem=0, dataset_mean=-5.0, dataset_std=4.0)
    d = plain(quiet, n).numpy() - plain(w, n).numpy()
    # the level stays in (except in the lowest mel bins, whose energy is at the log floor)
    live = plain.fbank(quiet, n).numpy()[0] > np.log(np.finfo(np.float32).eps) + 2
    assert live.mean() > 0.9
    np.testing.assert_allclose(d[0][live], 2 * np.log(0.1) / 4.0, atol=1e-4)
    # bins above the log floor in every valid frame of the quiet clip: there a gain is exactly
    # a per-bin constant, which the clip normalisation removes
    fq = plain.fbank(quiet, n).numpy()
    floor = np.log(np.finfo(np.float32).eps) + 2
    bins = [np.all(fq[b, :frames[b]] > floor, axis=0) for b in (0, 1)]
    assert all(m.mean() > 0.9 for m in bins)
    for mode in ("cmn", "cmvn"):
        front = AudioFrontend(T, freqm=0, timem=0, dataset_mean=-5.0, dataset_std=4.0,
                              clip_norm=mode)
        loud, soft = front(w, n).numpy(), front(quiet, n).numpy()
        for b in (0, 1):
            np.testing.assert_allclose(soft[b][:, bins[b]], loud[b][:, bins[b]], atol=1e-4,
                                       err_msg=mode)
        want = _np_clip_norm(front.fbank(w, n).numpy(), frames, mode, 4.0)
        np.testing.assert_allclose(loud, want, atol=1e-4, err_msg=mode)
        assert np.all(loud[1, frames[1]:] == 0) and np.all(loud[2] == 0)
        np.testing.assert_array_equal(front.valid_frames(w, n).numpy(), frames)
        assert AudioFrontend.from_config(front.get_config()).clip_norm == mode
    with pytest.raises(ValueError, match="clip_norm"):
        AudioFrontend(T, clip_norm="per_speaker")


def test_masks_come_after_clip_norm():
    """In training the masks zero whole bins / frames of the normalised clip (= its mean);
    everything else equals the inference output."""
    from psla_tf.models.frontend import AudioFrontend
    w = np.stack([_speechlike(CLIP, s) for s in range(4)])
    n = np.full([4], CLIP, np.int32)
    front = AudioFrontend(T, freqm=30, timem=20, seed=5, clip_norm="cmvn")
    ref = front(w, n, training=False).numpy()
    got = front(w, n, training=True).numpy()
    masked = got != ref
    assert masked.any()
    assert np.all(got[masked] == 0)
    for b in range(4):   # the masked entries are whole mel bins or whole frames
        rows, cols = np.nonzero(masked[b])
        full_bins = {c for c in set(cols) if masked[b][:, c].sum() >= T - 1}
        full_frames = {r for r in set(rows) if masked[b][r].sum() >= 128 - 1}
        assert all(c in full_bins or r in full_frames for r, c in zip(rows, cols))


@pytest.mark.parametrize("flag,parsed,bad,value", [
    ("clip_norm", "cmvn", "global", "cmn"),
    ("num_ceps", 20, "200", 13),
    ("high_freq", 4000.0, "9000", -400.0),
    ("num_mel_bins", 64, "2", 40)])
def test_frontend_options_reach_the_model_and_flagfile(tmp_path, flag, parsed, bad, value):
    """Each front-end option (--clip_norm, --num_ceps, --high_freq, --num_mel_bins): flag →
    TrainConfig → the model's AudioFrontend → flags.txt → TrainConfig; out-of-range values
    are refused."""
    from absl import flags as absl_flags
    from psla_tf import config
    from psla_tf.training import trainer
    from psla_tf.training.flags import define_flags
    fv = absl_flags.FlagValues()
    define_flags(fv)
    fv(["prog", f"--{flag}={parsed}"])
    assert fv[flag].value == parsed
    with pytest.raises(absl_flags.IllegalFlagValueError):
        fv(["prog", f"--{flag}={bad}"])
    cfg = trainer.TrainConfig(model="cnn", cnn_width=0.25, att_head=2, target_length=T,
                              freqm=0, timem=0, pretrained="none", dataset_mean=-5.0,
                              dataset_std=4.0, **{flag: value})
    assert getattr(trainer.build_model(cfg, 3).get_layer("frontend"), flag) == value
    (tmp_path / "flags.txt").write_text(config.flagfile_text(cfg))
    assert getattr(config.config_from_flagfile(str(tmp_path / "flags.txt")), flag) == value


def test_exports_carry_clip_norm(tmp_path):
    """A cmvn tagger with cepstral smoothing (``num_ceps``), 64 mel banks (``num_mel_bins``)
    ending at 4 kHz (``high_freq``) and leading-silence removal (``trim_onset_db``; one clip
    opens with 0.1 s at -60 dB): the .keras file, the SavedModel
    and the float32 TFLite model give the Keras scores (1e-4), and a -20 dB copy of each clip
    scores the same in every form."""
    import keras
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf import export, export_tflite
    from psla_tf.models.tagger import build_tagger
    keras.utils.set_random_seed(0)
    # the quarter-width cnn: the backbone that exports fastest (the front end is checked)
    model = build_tagger(3, model="cnn", cnn_width=0.25, target_length=T, freqm=0, timem=0,
                         dataset_mean=-5.0, dataset_std=4.0, clip_norm="cmvn", num_ceps=13,
                         high_freq=4000.0, trim_onset_db=30.0, num_mel_bins=64)
    mids, names = ["/m/a", "/m/b", "/m/c"], ["a", "b", "c"]
    waves = np.stack([_speechlike(CLIP, s) for s in range(3)])
    waves[0, :1600] *= 1e-3
    n = np.array([CLIP, 6000, 3000], np.int32)
    for i, k in enumerate(n):
        waves[i, k:] = 0.0
    ref = model({"waveform": waves, "num_samples": n}, training=False).numpy()
    quiet = model({"waveform": 0.1 * waves, "num_samples": n}, training=False).numpy()
    np.testing.assert_allclose(quiet, ref, atol=1e-4)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("frontend").clip_norm == "cmvn"
    assert loaded.get_layer("frontend").num_ceps == 13
    assert loaded.get_layer("frontend").high_freq == 4000.0
    assert loaded.get_layer("frontend").trim_onset_db == 30.0
    assert loaded.get_layer("frontend").num_mel_bins == 64
    np.testing.assert_allclose(loaded({"waveform": waves, "num_samples": n},
                                      training=False).numpy(), ref, atol=1e-5)
    st = export.load_saved_model(export.export_saved_model(
        model, str(tmp_path / "sm"), mids, names, clip_samples=CLIP))
    np.testing.assert_allclose(st(waves, n)["scores"], ref, atol=1e-4)
    np.testing.assert_allclose(st(0.1 * waves, n)["scores"], ref, atol=1e-4)
    # TFLite: a fixed-length input, every sample counts as audio (as the deployed model sees)
    path = str(tmp_path / "m.tflite")
    export_tflite.export_tflite(model, path, mids, names, quantize="none",
                                seconds=CLIP / 16000.0)
    full = model({"waveform": waves, "num_samples": np.full([3], CLIP, np.int32)},
                 training=False).numpy()
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    assert list(i["shape"]) == [1, CLIP]
    for gain in (1.0, 0.1):
        for b in range(3):
            it.set_tensor(i["index"], (gain * waves[b])[None].astype(np.float32))
            it.invoke()
            np.testing.assert_allclose(it.get_tensor(o["index"])[0], full[b], atol=1e-4)


def test_float16_tflite_keeps_the_lifter_float32(tmp_path):
    """The float16 TFLite export stores the cepstral smoothing matrix (``num_ceps``) as float32
    bit patterns like the mel matrices (``features.runtime_constant``): no ``[128, 128]``
    float16 constant, and the matrix the model multiplies by is the float32 one exactly."""
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf import export_tflite
    from psla_tf.features import cepstral_lifter_matrix
    from psla_tf.models.tagger import build_tagger
    model = build_tagger(2, model="cnn", cnn_width=0.25, target_length=T, freqm=0, timem=0,
                         num_ceps=13)
    path = str(tmp_path / "f16.tflite")
    export_tflite.export_tflite(model, path, ["/m/a", "/m/b"], ["a", "b"], quantize="float16",
                                seconds=CLIP / 16000.0)
    it = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    tensors = it.get_tensor_details()
    assert any(t["dtype"] == np.float16 for t in tensors)          # it is a float16 model
    square = [t for t in tensors if tuple(t["shape"]) == (128, 128)]
    assert square and all(t["dtype"] != np.float16 for t in square), square
    i = it.get_input_details()[0]
    it.set_tensor(i["index"], np.zeros(i["shape"], np.float32))
    it.invoke()
    lifter = cepstral_lifter_matrix(128, 13)
    assert any(np.array_equal(it.get_tensor(t["index"]), lifter)
               for t in square if t["dtype"] == np.float32)


def _np_pcen(fb, n, s, alpha=0.98, delta=2.0, r=0.5, eps=1e-6):
    """PCEN by scipy's IIR filter (M[-1] = E[0]) and the formula, float64; then cmvn."""
    from scipy.signal import lfilter
    out = np.zeros_like(fb, np.float64)
    for b in range(fb.shape[0]):
        k = int(n[b])
        if k == 0:
            continue
        e = np.exp(fb[b, :k].astype(np.float64))
        m = lfilter([s], [1.0, s - 1.0], e, axis=0, zi=((1.0 - s) * e[:1]))[0]
        out[b, :k] = (e / (eps + m) ** alpha + delta) ** r - delta ** r
    return out


def test_pcen_matches_scipy_and_librosa_smoother():
    """``pcen`` against scipy's lfilter recursion; its smoother coefficient is librosa's for
    a 0.4-s time constant at a 10-ms hop (0.02469); ``clip_norm="pcen"`` = cmvn of it."""
    from psla_tf.models.frontend import clip_normalise, pcen, pcen_smoothing
    s = pcen_smoothing()
    assert s == pytest.approx((np.sqrt(1 + 4 * 40.0 ** 2) - 1) / (2 * 40.0 ** 2), rel=1e-12)
    assert s == pytest.approx(0.024690, abs=1e-6)
    rng = np.random.default_rng(3)
    fb = rng.normal(14.0, 3.0, (3, 40, 6)).astype(np.float32)
    n = np.array([40, 9, 0], np.int32)
    fb[1, 9:] = 0.0
    got = pcen(fb, n).numpy()
    want = _np_pcen(fb, n, s)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert np.all(got[1, 9:] == 0) and np.all(got[2] == 0)
    np.testing.assert_allclose(clip_normalise(fb, n, "pcen").numpy(),
                               _np_clip_norm(want.astype(np.float32), n, "cmvn"), atol=1e-4)


def test_pcen_frontend_matches_numpy():
    """A clip of steady noise with a 0.1-s tone burst: the front end equals NumPy's PCEN +
    cmvn of its own fbank, the same with the TFLite export's ``power_scale`` (16), and the
    layer round-trips through its config."""
    from psla_tf.models.frontend import AudioFrontend
    rng = np.random.default_rng(1)
    w = 0.01 * rng.standard_normal(CLIP).astype(np.float32)
    t = np.arange(1600) / 16000.0
    w[3200:4800] += 0.3 * np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    w = w[None]
    n = np.array([CLIP], np.int32)
    front = AudioFrontend(T, freqm=0, timem=0, clip_norm="pcen")
    out = front(w, n).numpy()
    want = _np_clip_norm(_np_pcen(front.fbank(w, n).numpy(), [T], front_s()), [T], "cmvn")
    np.testing.assert_allclose(out, want, atol=2e-4)
    scaled = AudioFrontend(T, freqm=0, timem=0, clip_norm="pcen", power_scale=16.0)
    np.testing.assert_allclose(scaled(w, n).numpy(), out, atol=2e-4)
    assert AudioFrontend.from_config(front.get_config()).clip_norm == "pcen"


def front_s():
    from psla_tf.models.frontend import pcen_smoothing
    return pcen_smoothing()


def test_exports_carry_pcen(tmp_path):
    """A ``clip_norm="pcen"`` tagger: the SavedModel and the float32 TFLite model give the
    Keras scores (1e-4)."""
    import keras
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf import export, export_tflite
    from psla_tf.models.tagger import build_tagger
    keras.utils.set_random_seed(1)
    model = build_tagger(2, model="cnn", cnn_width=0.25, target_length=T, freqm=0, timem=0,
                         clip_norm="pcen", num_mel_bins=64, high_freq=4000.0)
    mids, names = ["/m/a", "/m/b"], ["a", "b"]
    waves = np.stack([_speechlike(CLIP, s) for s in range(2)])
    n = np.full([2], CLIP, np.int32)
    ref = model({"waveform": waves, "num_samples": n}, training=False).numpy()
    st = export.load_saved_model(export.export_saved_model(
        model, str(tmp_path / "sm"), mids, names, clip_samples=CLIP))
    np.testing.assert_allclose(st(waves, n)["scores"], ref, atol=1e-4)
    path = str(tmp_path / "m.tflite")
    export_tflite.export_tflite(model, path, mids, names, quantize="none",
                                seconds=CLIP / 16000.0)
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    for b in range(2):
        it.set_tensor(i["index"], waves[b][None].astype(np.float32))
        it.invoke()
        np.testing.assert_allclose(it.get_tensor(o["index"])[0], ref[b], atol=1e-4)
