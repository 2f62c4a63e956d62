"""Run a psla_tf command in-process, through the entry point users run (``main()`` of its
``psla_tf.cli`` module, which parses ``sys.argv``), and capture its exit status, stdout and
stderr.

absl keeps every command's flags in one global registry, and two commands define flags of
the same name (``--model``, ``--output``), so :func:`command` imports the command's module
alone: it sets the flags other psla_tf modules defined aside, imports the module afresh,
and on exit removes the command's flags and puts the others back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import sys
import traceback
from typing import Iterator

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Result:
    code: int | None      # exit status; None when an exception escaped main()
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _kept(fv: flags.FlagValues, name: str) -> bool:
    """absl's own flags and psla_tf.cli's --debug stay registered."""
    module = fv.find_module_defining_flag(name) or ""
    return module.startswith("absl") or module == "psla_tf.cli"


@contextlib.contextmanager
def command(module_name: str) -> Iterator["Runner"]:
    """The command module ``module_name`` (e.g. ``psla_tf.cli.predict``) imported with only
    its own flags registered; yields a :class:`Runner`."""
    import psla_tf.cli  # noqa: F401  (defines --debug before the snapshot)
    fv = flags.FLAGS
    stash = []
    for name in list(fv):
        flag = fv[name]
        if name != flag.name or _kept(fv, name):
            continue  # short names go with their flag
        stash.append((name, flag, fv.find_module_defining_flag(name),
                      fv.find_module_id_defining_flag(name)))
    for name, *_ in stash:
        delattr(fv, name)
    old_module = sys.modules.pop(module_name, None)
    try:
        module = importlib.import_module(module_name)
        yield Runner(module)
    finally:
        for name in list(fv):
            if name in fv and name == fv[name].name and not _kept(fv, name):
                delattr(fv, name)
        for name, flag, mod_name, mod_id in stash:
            fv[name] = flag
            if mod_name:
                fv.register_flag_by_module(mod_name, flag)
            if mod_id:
                fv.register_flag_by_module_id(mod_id, flag)
        sys.modules.pop(module_name, None)
        if old_module is not None:
            sys.modules[module_name] = old_module
        fv.unparse_flags()


@dataclasses.dataclass
class Runner:
    module: object

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """``prog *args`` as a user types it; ``env``: environment variables set meanwhile."""
        fv = flags.FLAGS
        fv.unparse_flags()
        out, err = io.StringIO(), io.StringIO()
        saved_argv, saved_env = sys.argv, dict(os.environ)
        sys.argv = [self.module.__name__.rsplit(".", 1)[-1], *args]
        os.environ.update(env or {})
        code: int | None
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    self.module.main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # noqa: B036 — what a user would see as a traceback
                    code = None
                    traceback.print_exc()
        finally:
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
        return Result(code, out.getvalue(), err.getvalue())


def script_module(script: str) -> str:
    """The command module behind an entry-point script: ``main.py`` or ``tools/NAME.py``
    (a thin shim, tests/test_commands.py) → e.g. ``psla_tf.cli.predict``."""
    import re
    path = script if os.path.isabs(script) else os.path.join(
        ROOT, script if script == "main.py" or "/" in script else os.path.join("tools", script))
    m = re.search(r"^from (psla_tf\.cli\.\w+) import", open(path).read(), re.M)
    if m is None:
        raise ValueError(f"{path} is not a thin entry point over a psla_tf.cli module")
    return m.group(1)


def run_script(script: str, *args: str, env: dict[str, str] | None = None):
    """``python SCRIPT *args`` (``main.py``, ``tools/NAME.py`` or ``NAME.py`` for a tool) run
    in-process, from the repository root, through its command module's ``main()`` — the code
    the script runs, without a fresh interpreter (for tests where the process boundary is not
    what is tested: a fresh Python + TensorFlow costs seconds per run). Returns what
    ``subprocess.run(..., capture_output=True, text=True)`` would: ``returncode`` (None when an
    exception escaped ``main()``: the traceback is in ``stderr``), ``stdout`` and ``stderr``
    (what the file descriptors got, TensorFlow's C++ side, first; then Python's output)."""
    import subprocess
    if "PSLA_FAULT" in (env or {}):
        raise ValueError("PSLA_FAULT kills the process: run the script in a subprocess")
    fault = os.environ.pop("PSLA_FAULT", None)   # (an in-process run must not kill pytest)
    cwd = os.getcwd()
    os.chdir(ROOT)                                # where the subprocess runs started
    try:
        with _native_output() as native, command(script_module(script)) as run:
            r = run(*args, env=env)
    finally:
        os.chdir(cwd)
        if fault is not None:
            os.environ["PSLA_FAULT"] = fault
    # native (C++) lines first: the command's own last line (e.g. its one error line) stays last
    return subprocess.CompletedProcess([script, *args], r.code, native["out"] + r.out,
                                       native["err"] + r.err)


@contextlib.contextmanager
def _native_output() -> Iterator[dict[str, str]]:
    """What is written to file descriptors 1 and 2 meanwhile (TensorFlow's C++ side, e.g. a
    graph-mode ``tf.print``), as a subprocess's pipes would have it: {"out": ..., "err": ...}."""
    import tempfile
    got = {"out": "", "err": ""}
    saved, files = {}, {}
    for fd in (1, 2):
        (sys.stdout if fd == 1 else sys.stderr).flush()
        files[fd] = tempfile.TemporaryFile()
        saved[fd] = os.dup(fd)
        os.dup2(files[fd].fileno(), fd)
    try:
        yield got
    finally:
        for fd, key in ((1, "out"), (2, "err")):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            got[key] = files[fd].read().decode(errors="replace")
            files[fd].close()


def lazy_runs(script: str, args: dict[str, list[str]], env: dict[str, str] | None = None):
    """name → :func:`run_script` (SCRIPT, *args[name], env=env), each run made once, when a
    test first asks for it (a module fixture's runs, in-process)."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            done[name] = run_script(script, *args[name], env=env)
        return done[name]
    return get
