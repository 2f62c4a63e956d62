"""psla_tf as a package: ``import psla_tf`` alone (in a fresh process, from another folder)
registers every custom Keras object, so ``keras.models.load_model`` opens a saved tagger and
gives the same scores as the model that was saved."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers_models import make_tagger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version():
    import psla_tf
    assert psla_tf.__version__.count(".") == 2


def test_keras_load_model_after_import_psla_tf(tmp_path):
    model = make_tagger(num_classes=3, seed=0, att_head=4)
    path = str(tmp_path / "m.keras")
    model.save(path)
    x = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32) * 0.1
    n = np.array([8000, 6000], np.int32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", model({"waveform": x, "num_samples": n}).numpy())
    code = ("import numpy as np, keras, psla_tf\n"
            f"m = keras.models.load_model({path!r})\n"
            f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
            "got = m({'waveform': x, 'num_samples': np.array([8000, 6000], np.int32)})\n"
            f"print(float(np.abs(np.asarray(got) - np.load({str(tmp_path / 'want.npy')!r}))"
            ".max()))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-6


def _requirement_lines(name: str) -> list[str]:
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f
                if line.split("#")[0].strip() and not line.startswith("-")]


def test_pyproject_pins_are_the_requirement_files():
    """pyproject.toml's dependencies + extras are requirements*.txt line for line (the files
    stay the dependency lists for environments that bring their own TensorFlow)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert project["dependencies"] + extras["test"] == _requirement_lines("requirements.txt")
    assert extras["import"] == _requirement_lines("requirements-import.txt")
    assert extras["deploy"] == _requirement_lines("requirements-deploy.txt")
    assert project["requires-python"] == ">=3.10"
