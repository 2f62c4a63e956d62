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
import sys
import traceback
from typing import Iterator

from absl import flags


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
        import os
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
