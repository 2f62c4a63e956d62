"""psla_tf's top-level API (README "Python API"): the README example runs as written in a fresh
process on a small model laid out like the demo run; ``import psla_tf`` alone (before Keras)
lets ``keras.models.load_model`` open a compiled .keras file as the trainer saves it; the
import loads no TensorFlow; ``tag`` agrees with scoring the windows by hand."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers_models import CLIP_SAMPLES, make_tagger, save_tagger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(code: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_is_light_and_the_api_is_lazy(tmp_path):
    out = _run("import sys, psla_tf\n"
               "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
               "print(sorted(psla_tf.__all__))\n"
               "f = psla_tf.kaldi_fbank\n"
               "print('tensorflow' in sys.modules)\n", tmp_path)
    lines = out.splitlines()
    assert lines[0] == "False False"
    assert {"load_tagger", "tag", "kaldi_fbank", "KaldiFbank", "export_saved_model",
            "export_tflite_model", "PslaError", "__version__"} <= set(eval(lines[1]))
    assert lines[2] == "True"


def test_readme_example_runs(tmp_path):
    """The README's Python API block, unchanged, on a small 3-class model saved as a demo run
    (demo_data/exp/wa_model.keras + labels.csv) and a 3-s wav at the demo's path."""
    import soundfile as sf
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    save_tagger(make_tagger(num_classes=3, seed=0), str(tmp_path / "demo_data" / "exp"),
                name="wa_model.keras")
    wav = tmp_path / "demo_data" / "audio" / "audio" / "eval" / "eval_00000.wav"
    wav.parent.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sf.write(str(wav), (0.1 * rng.standard_normal(48000)).astype(np.float32), 16000)
    out = _run(code, tmp_path).splitlines()
    for line in out[:2]:   # the two tag() results: three (name, score) pairs, best first
        pairs = eval(line)
        assert [type(n) for n, _ in pairs] == [str] * 3
        assert [s for _, s in pairs] == sorted((s for _, s in pairs), reverse=True)
    assert os.path.exists(tmp_path / "serving" / "demo" / "1" / "saved_model.pb")


def test_load_model_after_import_psla_tf_first(tmp_path):
    """A tagger compiled as the trainer compiles it (TorchAdam with PSLASchedule; psla_bce or
    the distillation loss), saved; a fresh process imports psla_tf *before* keras (the
    registration then happens when Keras loads) and loads it, optimizer and loss included."""
    import keras
    from psla_tf.training import distill
    from psla_tf.training.optim import TorchAdam, psla_bce
    from psla_tf.training.schedule import PSLASchedule
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 8000))).astype(np.float32)
    n = np.array([8000, 6000], np.int32)
    np.save(tmp_path / "x.npy", x)
    for name, loss in (("plain", psla_bce),
                       ("kd", distill.DistillationLoss(np.array([0.5, 1.0, 0.0], np.float32),
                                                       "bce"))):
        model = make_tagger(num_classes=3, seed=0)
        model.compile(optimizer=TorchAdam(PSLASchedule(1e-3, 10, 5, 2, 0.5, 1, 5, 1)),
                      loss=loss)
        model.save(str(tmp_path / f"{name}.keras"))
        np.save(tmp_path / f"{name}.npy", model({"waveform": x, "num_samples": n}).numpy())
    keras.backend.clear_session()
    out = _run("import numpy as np\n"
               "import psla_tf\n"
               "import keras\n"
               "x = np.load('x.npy')\n"
               "for name in ('plain', 'kd'):\n"
               "    m = keras.models.load_model(name + '.keras')\n"
               "    got = m({'waveform': x, 'num_samples': np.array([8000, 6000], np.int32)})\n"
               "    err = float(np.abs(np.asarray(got) - np.load(name + '.npy')).max())\n"
               "    lr = m.optimizer.get_config()['learning_rate']['class_name']\n"
               "    loss = getattr(m.loss, '__name__', type(m.loss).__name__)\n"
               "    print(name, type(m.optimizer).__name__, lr, loss, err)\n", tmp_path)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["plain"][:3] == ["TorchAdam", "PSLASchedule", "psla_bce"], rows
    assert rows["kd"][:3] == ["TorchAdam", "PSLASchedule", "DistillationLoss"], rows
    assert float(rows["plain"][-1]) <= 1e-6 and float(rows["kd"][-1]) <= 1e-6


def test_tag_pools_windows_of_the_model_input(tmp_path):
    """``tag`` on a waveform longer than the model's input = max over windows of the input
    length every half window, scored one by one; a file gives the same as its samples."""
    import soundfile as sf
    import psla_tf
    folder = tmp_path / "run"
    save_tagger(make_tagger(num_classes=3, seed=2), str(folder), name="wa_model.keras")
    tagger = psla_tf.load_tagger(folder)
    rng = np.random.default_rng(3)
    wave = (0.1 * rng.standard_normal(2 * CLIP_SAMPLES + 1000)).astype(np.float32)
    hop = CLIP_SAMPLES // 2
    starts = list(range(0, wave.size - CLIP_SAMPLES + hop, hop))
    windows = np.zeros((len(starts), CLIP_SAMPLES), np.float32)   # zero-padded, as tag_file
    for i, s in enumerate(starts):
        windows[i, :wave[s:s + CLIP_SAMPLES].size] = wave[s:s + CLIP_SAMPLES]
    lengths = np.array([min(CLIP_SAMPLES, wave.size - s) for s in starts], np.int32)
    want = tagger(windows, lengths).max(axis=0)
    got = dict(psla_tf.tag(tagger, wave, top_k=3))
    np.testing.assert_allclose([got[n] for n in tagger.names], want, rtol=1e-5, atol=1e-6)
    sf.write(str(tmp_path / "a.wav"), wave, 16000, subtype="FLOAT")
    from_file = dict(psla_tf.tag(tagger, str(tmp_path / "a.wav"), top_k=3))
    np.testing.assert_allclose([from_file[n] for n in tagger.names], want, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(psla_tf.PslaError, match="NaN"):
        psla_tf.tag(tagger, np.full(4000, np.nan, np.float32))


def test_public_names_do_not_shadow_submodules():
    """A public name equal to a submodule's (e.g. export_tflite) would be rebound to the
    module on import, or rebind ``from psla_tf import <module>`` to the function."""
    import pkgutil
    import psla_tf
    submodules = {m.name for m in pkgutil.iter_modules(psla_tf.__path__)}
    assert not submodules & set(psla_tf._API)
    import psla_tf.export_tflite as module
    assert callable(psla_tf.export_tflite_model) and hasattr(module, "read_embedded_labels")
    from psla_tf import export_tflite
    assert export_tflite is module
