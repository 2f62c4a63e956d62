"""The console commands (pyproject.toml ``[project.scripts]``): every one is installed, resolves
to an importable ``main``, and answers ``--help`` (exit 0) with its documented flags without
loading TensorFlow; main.py and tools/*.py are thin entry points over the same modules; no
file edits ``sys.path``. The ~30 help runs are one batch of subprocesses started together
(each ~0.2 s: absl and psla_tf's flag modules only)."""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs a script as __main__ and reports, at exit, whether TensorFlow was imported
_WRAPPER = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('TENSORFLOW_LOADED', 'tensorflow' in sys.modules, "
            "file=sys.stderr))\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _declared() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_command_is_declared_installed_and_importable():
    scripts = _declared()
    assert {"psla-train", "psla-prepare", "psla-predict", "psla-evaluate", "psla-export",
            "psla-infer", "psla-ensemble", "psla-average-weights", "psla-enhance-labels",
            "psla-split", "psla-cross-validate", "psla-sampling-report",
            "psla-import-checkpoint", "psla-add-teacher-scores",
            "psla-make-fsdd-mixtures", "psla-adapt"} <= set(scripts), sorted(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert re.fullmatch(r"psla-[a-z-]+", name) and attr == "main", target
        assert module.startswith("psla_tf.cli."), target
        assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"), target
    installed = {ep.name: ep.value
                 for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("psla-")}
    assert installed == scripts, "the installed commands differ: pip install -e ."


def test_shims_name_a_command_module():
    """main.py and every tools/*.py only import a command module's main and run it."""
    modules = {t.partition(":")[0] for t in _declared().values()}
    shims = [os.path.join(ROOT, "main.py")] + sorted(glob.glob(os.path.join(ROOT, "tools",
                                                                            "*.py")))
    for path in shims:
        text = open(path).read()
        m = re.search(r"^from (psla_tf\.cli\.\w+) import FLAGS, main", text, re.M)
        assert m and m.group(1) in modules, path
        code = [line for line in text.split('"""')[-1].splitlines() if line.strip()]
        assert len(code) <= 3, (path, code)  # import, if __name__ == "__main__":, main()


def test_help_exits_0_lists_flags_and_loads_no_tensorflow(tmp_path):
    scripts = _declared()
    bindir = sysconfig.get_path("scripts")
    runs = {name: [os.path.join(bindir, name), "--help"] for name in scripts}
    runs.update({os.path.relpath(p, ROOT): [p, "--help"]
                 for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))})
    runs["main.py --helpfull"] = [os.path.join(ROOT, "main.py"), "--helpfull"]
    runs["psla-train --helpfull"] = [os.path.join(bindir, "psla-train"), "--helpfull"]
    for name, argv in runs.items():
        assert os.path.exists(argv[0]), f"{argv[0]} missing: pip install -e ."
    procs = {name: subprocess.Popen([sys.executable, "-c", _WRAPPER, *argv], cwd=str(tmp_path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
             for name, argv in runs.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (name, err[-2000:])
        assert "TENSORFLOW_LOADED False" in err, (name, err[-2000:])
        flags = re.findall(r"^ +--(?:\[no\])?(\w+):", out, re.M)
        assert len(flags) >= 3, (name, out[-2000:])  # the command's own flags
        assert "(no help available)" not in out, name
        if name.startswith(("psla-train", "main.py")):
            assert {"train_data", "eval_data", "exp_dir", "verbose"} <= set(flags), name


def test_no_sys_path_edits():
    pattern = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\+)?=")
    files = [os.path.join(ROOT, "main.py")]
    for folder in ("psla_tf", "tools", "benchmarks", "tests"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    offenders = [os.path.relpath(f, ROOT) for f in files if pattern.search(open(f).read())]
    assert not offenders
