"""The command line: one module per console command (pyproject.toml ``[project.scripts]``).

Each module defines its absl flags when imported and exposes ``main(argv=None)``:

* ``main()`` is the command: absl parses ``sys.argv`` (``--help`` lists the command's flags
  and exits 0), then calls ``main(argv)``, whose return value is the exit status; a
  :class:`psla_tf.errors.PslaError` it lets through is printed as one ``error: ...`` line;
* ``main(argv)``, with the flags already parsed, runs it and returns the exit status
  (0 done, 1 failed, 2 user error: one ``error: ...`` line, no traceback).

``main.py`` and ``tools/*.py`` are thin entry points over these modules. Module-level imports
stay TensorFlow-free, so ``--help`` answers without loading TensorFlow.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """absl's ``app.run(main)``, with ``main``'s module docstring and every psla_tf flag as
    the ``--help`` text (absl shows the flags of the ``__main__`` module, which for a console
    script or a thin entry point defines none)."""
    fv = flags.FLAGS
    for module, defined in fv.flags_by_module_dict().items():
        if module.startswith("psla_tf."):
            for flag in defined:
                fv.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
    try:
        app.run(lambda argv: _one_line_errors(main, argv))
    except SystemExit as e:  # absl exits 1 after printing the help asked for: that is no error
        if e.code == 1 and _asked_for_help(sys.argv[1:]):
            sys.exit(0)
        raise


def _one_line_errors(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
    """``main(argv)``; a psla_tf error it does not handle itself is printed as one line and
    exits with the error's status (2: a user error), not as a traceback."""
    from psla_tf.errors import PslaError
    try:
        return main(argv)
    except PslaError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code


def _asked_for_help(args: list[str]) -> bool:
    """``args`` (before any ``--``) hold one of absl's help flags."""
    args = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_FLAGS for a in args)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull", "--helpxml", "-helpxml")
