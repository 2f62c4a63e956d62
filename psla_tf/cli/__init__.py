"""The command line: one module per console command (pyproject.toml ``[project.scripts]``).

Each module defines its absl flags when imported, declares its path flags in ``PATHS``
(:mod:`psla_tf.cli.paths`) and exposes ``main(argv=None)``:

* ``main()`` is the command: absl parses ``sys.argv`` (``--help`` lists the command's flags
  and exits 0), the module's ``check_flags()`` (if any: flag combinations, no files) and
  the declared paths are checked, then ``main(argv)`` runs; its return value is the exit
  status;
* ``main(argv)``, with the flags already parsed, runs it and returns the exit status.

Exit status (README, "Errors and exit codes"): 0 done; 2 a user error — a bad flag, a
missing or wrong file, a wrong vocabulary — reported as one ``error: ...`` line saying what
is wrong and what to do, before any output is written; 1 a failure during the work (a
diverged training run, files that could not be tagged, a full disk, an unexpected error),
also one ``error: ...`` line; 130 interrupted. ``--debug`` (or ``PSLA_DEBUG=1``) prints the
traceback above that line, for bug reports. A failed run removes the output files it
created (outputs are written to a temporary name and renamed, so a replaced output is never
half-written) and the empty folders it made.

``main.py`` and ``tools/*.py`` are thin entry points over these modules. Module-level imports
stay TensorFlow-free, so ``--help`` answers without loading TensorFlow.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

flags.DEFINE_bool("debug", False, "On an error, also print the Python traceback (for bug "
                  "reports); the environment variable PSLA_DEBUG=1 does the same.")


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """absl's ``app.run(main)``, with ``main``'s module docstring and every psla_tf flag as
    the ``--help`` text (absl shows the flags of the ``__main__`` module, which for a console
    script or a thin entry point defines none), flag errors as one line (exit 2), the
    declared paths checked first, and every error as one line (see the module doc)."""
    fv = flags.FLAGS
    for module, defined in fv.flags_by_module_dict().items():
        if module.startswith("psla_tf."):
            for flag in defined:
                fv.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
    try:
        app.run(lambda argv: guarded(main, argv), flags_parser=_parse_flags)
    except SystemExit as e:  # absl exits 1 after printing the help asked for: that is no error
        if e.code == 1 and _asked_for_help(sys.argv[1:]):
            sys.exit(0)
        raise


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad flag (unknown name, wrong type, a missing flagfile, a
    required flag not given) is one ``error:`` line and exit 2, not absl's usage text."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {one_line(str(e))} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def debug_enabled() -> bool:
    """--debug or PSLA_DEBUG=1 (any value but '', 0, false, no)."""
    env = os.environ.get("PSLA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    try:
        return env or bool(flags.FLAGS["debug"].value)
    except KeyError:
        return env


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(exc: BaseException) -> int:
    """Print ``exc`` as one ``error:`` line (the traceback above it with --debug); returns
    the exit status (:func:`exit_status`)."""
    code, message = exit_status(exc)
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    sys.stderr.flush()
    return code


def exit_status(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) of an exception that ended a command."""
    from psla_tf.errors import PslaError
    if isinstance(exc, PslaError):
        return exc.exit_code, one_line(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return EXIT_FAILED, one_line(f"no space left on the device writing {exc.filename}: "
                                     "free some space and run it again")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError, FileExistsError)):
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_USER_ERROR, one_line(f"{where}{exc.strerror or exc}: check the path "
                                         "(and its folder's permissions)")
    if isinstance(exc, UnicodeDecodeError):
        return EXIT_USER_ERROR, one_line(f"a file given as text is not UTF-8 text ({exc}): a "
                                         "binary or audio file where a listing / CSV is "
                                         "expected?")
    if isinstance(exc, ModuleNotFoundError):
        return EXIT_USER_ERROR, (f"the module {exc.name!r} is not installed: install the extra "
                                 "that needs it (README, Install), e.g. pip install "
                                 "'psla_tf[deploy]' or 'psla_tf[import]'")
    if isinstance(exc, MemoryError):
        return EXIT_FAILED, "out of memory: use a smaller --batch_size or fewer workers"
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(exc, tf.errors.OpError):
        from psla_tf.data.pipeline import data_error_from
        err = data_error_from(exc)
        if err is not None:
            return err.exit_code, one_line(err)
        text = _first_line(exc.message or exc)
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return EXIT_FAILED, f"out of memory ({text}): use a smaller --batch_size"
        if isinstance(exc, (tf.errors.DataLossError, tf.errors.NotFoundError,
                            tf.errors.InvalidArgumentError)):
            return EXIT_USER_ERROR, f"{text}: a missing, truncated or wrong input file?"
    if isinstance(exc, ValueError):  # a value the library refuses, said in its message
        return EXIT_USER_ERROR, (f"{_first_line(exc)} (--debug shows where; report it if "
                                 "the input looks right)")
    return EXIT_FAILED, (f"unexpected {type(exc).__name__}: {_first_line(exc)} (a bug: run "
                         "again with --debug and report the traceback)")


def _first_line(text, limit: int = 400) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    line = one_line(lines[0]) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 sent to /dev/null: TF 2.21's C++ start-up
    prints absl / oneDNN notices on stderr whatever TF_CPP_MIN_LOG_LEVEL says, and a command's
    stderr is kept to its one ``error:`` line. ``--debug`` keeps them."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    except ImportError:
        pass  # the command reports what it misses itself
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow_info_logs() -> None:
    """Python logging at WARNING (absl's verbosity, which sets the root logger's level): under
    absl's ``app.run`` it passes INFO, and writing a SavedModel logs INFO lines through absl
    (one lists hundreds of renamed signature inputs) on stderr. Warnings and errors still
    pass; ``--debug`` keeps the INFO lines."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)


def guarded(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """``main(argv)`` after the module's declared paths are checked; any exception is one
    line (:func:`fail`), and a failed run's new output files and empty folders are removed
    (:class:`psla_tf.cli.paths.OutputGuard`)."""
    from psla_tf.cli import paths
    module = sys.modules.get(main.__module__)
    declared = getattr(module, "PATHS", {})
    guard = None
    try:
        if len(argv) > 1 and paths.POSITIONAL not in declared:
            from psla_tf.errors import DataError
            raise DataError(f"unexpected arguments {' '.join(argv[1:])}: this command takes "
                            "flags only (quote globs, e.g. --data='data/eval-*.tfrecord', so "
                            "the shell does not expand them)")
        if hasattr(module, "check_flags"):  # flag combinations first: they need no file
            module.check_flags()
        paths.check_paths(declared, flags.FLAGS, argv)
        guard = paths.OutputGuard.snapshot(declared, flags.FLAGS, argv)
        if not debug_enabled():
            import_tensorflow_quietly()
            quiet_tensorflow_info_logs()
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: B036 — every error becomes one line
        code = fail(e)
    code = _status(code)
    if code != EXIT_OK and guard is not None:
        try:
            guard.clean()
        except OSError:
            pass
    return code


def _status(code) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):  # bool too: sys.exit(True) is 1
        return int(code)
    print(f"error: {one_line(code)}", file=sys.stderr)  # sys.exit("message")
    return EXIT_FAILED


def _asked_for_help(args: list[str]) -> bool:
    """``args`` (before any ``--``) hold one of absl's help flags."""
    args = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_FLAGS for a in args)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull", "--helpxml", "-helpxml")
