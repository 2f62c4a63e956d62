"""Every command × every path flag × the bad inputs users produce (issue 21).

The cases are generated from each command module's ``PATHS`` declaration
(:mod:`psla_tf.cli.paths`): for every declared flag, the inputs of its kind that users get
wrong — a missing path, an empty file, a folder where a file is expected, a file of another
kind (audio where a listing is expected, a listing where shards are expected, text where a
model is expected), a truncated file, a glob matching nothing, a wrong vocabulary, audio of
another sample rate / channel count or with NaN samples, an output whose folder cannot be
written, an existing output (the declared overwrite rule). Each case runs the command
in-process through ``main()`` (what the console script runs) and asserts: the documented exit
status (2 user error, 1 failure during work, 0 accepted), exactly one ``error:`` line on
stderr and nothing else, no traceback, and no new file left in the case's folder. A new
flag joins the matrix by being declared in ``PATHS``; a new command by being declared in
pyproject.toml (``test_every_command_is_in_the_matrix`` fails until it has a base
invocation here). A few subprocess runs prove the same at the process boundary (exit status,
no traceback), and that ``--debug`` / ``PSLA_DEBUG=1`` show the traceback.

Fixtures are built once for the module: a tiny tagger (EfficientNet-B0, 64 frames, 5
classes) saved with the package's own builder, a 2-clip listing, a 2-clip shard, score files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import types
from typing import Callable

import numpy as np
import pytest

from helpers_cli import command

from psla_tf.cli import paths as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 5
MIDS = [f"/m/c{k}" for k in range(C)]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TINY_TRAIN = ["--n_epochs=1", "--batch_size=2", "--eval_batch_size=2", "--nowa",
              "--model=cnn", "--cnn_width=0.25", "--att_head=1", "--target_length=64", "--freqm=0", "--timem=0",
              "--shuffle_buffer=4", "--verbose=2", "--pretrained=none", "--mixup=0"]


# ----------------------------------------------------------------------------- fixtures
def _wav(path, x, sr, subtype="PCM_16"):
    import soundfile as sf
    sf.write(str(path), x, sr, subtype=subtype)
    return str(path)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Valid inputs (fx.model, fx.shards, fx.listing, ...) and bad ones (fx.bad[...])."""
    from helpers_data import write_shards
    from helpers_models import CLIP_SAMPLES, make_tagger, save_tagger

    from psla_tf.data.records import write_label_csv
    from psla_tf.ontology import write_ontology
    from psla_tf.prediction import Predictions, save_scores
    d = tmp_path_factory.mktemp("matrix_inputs")
    rng = np.random.default_rng(0)
    f = types.SimpleNamespace(dir=str(d))
    f.model = save_tagger(make_tagger(C, att_head=1), str(d / "model"))
    shutil.copytree(d / "model", d / "model2")
    f.model2 = str(d / "model2" / "model.keras")
    f.label_csv = str(d / "model" / "labels.csv")
    # audio and listings (the clips' labels are in the model's vocabulary)
    (d / "audio").mkdir()
    for name in ("a", "b"):
        _wav(d / "audio" / f"{name}.wav", rng.normal(0, 0.1, CLIP_SAMPLES).astype(np.float32),
             16000)
    f.audio = str(d / "audio" / "a.wav")
    (d / "audio" / "list.csv").write_text("path,labels\na.wav,/m/c0\nb.wav,/m/c1;/m/c2\n")
    f.listing = str(d / "audio" / "list.csv")
    (d / "audio" / "list.json").write_text(json.dumps({"data": [
        {"wav": "a.wav", "labels": "/m/c0"}, {"wav": "b.wav", "labels": "/m/c1,/m/c2"}]}))
    f.datafile = str(d / "audio" / "list.json")
    (d / "audio" / "cv.csv").write_text("path,labels,fold\na.wav,/m/c0,1\nb.wav,/m/c1,2\n")
    f.cv_listing = str(d / "audio" / "cv.csv")
    # shards (same vocabulary) and shards of another vocabulary
    waves = [rng.integers(-3000, 3000, CLIP_SAMPLES).astype("<i2") for _ in range(2)]
    f.shards = write_shards(str(d), waves, [[0, 1, 2], [3, 4]], C, num_shards=1,
                            prefix="eval")
    (d / "other").mkdir()
    f.other_shards = write_shards(str(d / "other"), waves, [[0], [1]], 3, num_shards=1,
                                  prefix="other")
    (d / "trunc").mkdir()
    f.truncated_shards = write_shards(str(d / "trunc"), waves, [[0], [1]], C, num_shards=1,
                                      prefix="trunc")
    shard = sorted(p for p in os.listdir(d / "trunc") if p.endswith(".tfrecord"))[0]
    data = (d / "trunc" / shard).read_bytes()
    (d / "trunc" / shard).write_bytes(data[: len(data) // 2])
    # score files: ids of the shards and of the listing; targets give every class a positive
    t = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)       # the shards' labels
    t_listing = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0]], np.float32)  # the listing's
    names = [f"class {k}" for k in range(C)]
    for name, ids, seed, y in (("scores", ["clip00000", "clip00001"], 1, t),
                               ("scores2", ["clip00000", "clip00001"], 2, t),
                               ("scores_listing", ["a.wav", "b.wav"], 3, t_listing)):
        s = np.random.default_rng(seed).uniform(0, 1, (2, C)).astype(np.float32)
        save_scores(str(d / f"{name}.npz"), Predictions(ids, s, y, MIDS, names))
        setattr(f, name, str(d / f"{name}.npz"))
    write_ontology(str(d / "ontology.json"), [
        {"id": "/m/c0", "name": "class 0", "child_ids": ["/m/c1"]},
        {"id": "/m/c1", "name": "class 1", "child_ids": []},
        {"id": "/m/c2", "name": "class 2", "child_ids": ["/m/c3"]},
        {"id": "/m/c3", "name": "class 3", "child_ids": []},
        {"id": "/m/c4", "name": "class 4", "child_ids": []}])
    f.ontology = str(d / "ontology.json")
    (d / "class_info.csv").write_text("mid,quality\n" + "".join(f"{m},{0.5 + k / 10}\n"
                                                              for k, m in enumerate(MIDS)))
    f.class_info = str(d / "class_info.csv")
    import pickle
    with open(d / "state.pth", "wb") as fh:  # a pickle, not a state dict of tensors
        pickle.dump({"weight": [0.0]}, fh, protocol=2)
    f.pth = str(d / "state.pth")
    (d / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    f.weights = str(d / "weights.h5")
    (d / "fsdd").mkdir()
    _wav(d / "fsdd" / "3_george_0.wav", rng.normal(0, 0.1, 4000).astype(np.float32), 8000)
    f.fsdd = str(d / "fsdd")

    # ------------------------------------------------------------------ bad inputs
    b = d / "bad"
    b.mkdir()
    (b / "empty_dir").mkdir()
    (b / "empty.keras").write_bytes(b"")
    (b / "empty.csv").write_bytes(b"")
    (b / "empty.npz").write_bytes(b"")
    (b / "empty.wav").write_bytes(b"")
    (b / "empty.json").write_bytes(b"")
    (b / "notes.txt").write_text("just some notes\nnot what the flag takes\n")
    (b / "notes.keras").write_text("just some notes\n")
    (b / "notes.wav").write_text("not audio\n")
    (b / "notes.npz").write_text("id,score\n")
    model_bytes = open(f.model, "rb").read()
    (b / "truncated.keras").write_bytes(model_bytes[: len(model_bytes) // 2])
    npz = open(f.scores, "rb").read()
    (b / "truncated.npz").write_bytes(npz[: len(npz) // 2])
    np.savez(b / "wrong_arrays.npz", x=np.zeros(3))
    save_scores(str(b / "nan_scores.npz"), Predictions(
        ["clip00000", "clip00001"], np.full((2, C), np.nan, np.float32), t, MIDS, names))
    (b / "truncated.json").write_text(open(f.datafile).read()[:20])
    (b / "table.csv").write_text("hello\nworld\n")
    (b / "other_vocab.csv").write_text("index,mid,display_name\n0,/m/x,x\n1,/m/y,y\n")
    wav = open(f.audio, "rb").read()
    (b / "truncated.wav").write_bytes(wav[:30])
    _wav(b / "nan.wav", np.full(16000, np.nan, np.float32), 16000, "FLOAT")
    _wav(b / "stereo8k.wav", rng.normal(0, 0.1, (8000, 2)).astype(np.float32), 8000)
    (b / "rows_missing_audio.csv").write_text("path,labels\nghost.wav,/m/c0\n")
    f.bad = {p.name: str(p) for p in b.iterdir()}
    f.snapshot = _tree(str(d))
    return f


def _tree(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size if os.path.isfile(p) else -1,
                                             st.st_mtime_ns if os.path.isfile(p) else 0)
    return out


# ----------------------------------------------------------------------------- commands
@dataclasses.dataclass
class Cmd:
    module: str
    base: Callable[[types.SimpleNamespace, str], list[str]]
    """Valid flags (fixtures, case folder) → argv; outputs go into the case folder."""
    companions: dict[str, Callable[[types.SimpleNamespace], list[str]]] = \
        dataclasses.field(default_factory=dict)
    """flag → the other flags it needs to be read at all."""
    replace_ok: bool = False
    """The base run is cheap: the 'existing output is replaced' case runs it to the end."""


COMMANDS = {
    "psla-train": Cmd("psla_tf.cli.train", lambda f, o: [
        f"--train_data={f.shards}", f"--eval_data={f.shards}", f"--exp_dir={o}/exp",
        *TINY_TRAIN],
        companions={"retain_eval_data": lambda f: ["--append_classes",
                                                   f"--init_from={f.model}"]}),
    "psla-prepare": Cmd("psla_tf.cli.prepare", lambda f, o: [
        f"--input={f.listing}", f"--output_prefix={o}/data/train", "--noprogress",
        "--no_stats"], replace_ok=True),
    "psla-predict": Cmd("psla_tf.cli.predict", lambda f, o: [
        f"--model={f.model}", f"--data={f.shards}", f"--output={o}/scores.npz",
        "--noprogress"], replace_ok=True),
    "psla-adapt": Cmd("psla_tf.cli.adapt", lambda f, o: [
        f"--model={f.model}", f"--data={f.shards}", f"--output={o}/adapted.keras",
        "--min_clips=2", "--noprogress"], replace_ok=True),
    "psla-evaluate": Cmd("psla_tf.cli.evaluate", lambda f, o: [
        f"--scores={f.scores}", f"--out_dir={o}/report"],
        companions={"target_data": lambda f: ["--class_map=mid"],
                    "class_map": lambda f: [f"--target_data={f.shards}"],
                    "target_label_csv": lambda f: ["--class_map=mid",
                                                   f"--target_data={f.listing}"]}),
    "psla-export": Cmd("psla_tf.cli.export", lambda f, o: [
        f"--model={f.model}", f"--saved_model_dir={o}/serving"],
        companions={"calibration_data": lambda f: ["--tflite=/nonexistent/never.tflite",
                                                   "--quantize=int8"],
                    "compare_data": lambda f: ["--tflite=/nonexistent/never.tflite"]}),
    "psla-infer": Cmd("psla_tf.cli.infer", lambda f, o: [f"--model={f.model}", f.audio],
                      companions={"frame_dir": lambda f: ["--frame_level"]}),
    "psla-ensemble": Cmd("psla_tf.cli.ensemble", lambda f, o: [
        f"--scores={f.scores},{f.scores2}", f"--output={o}/ens.npz"], replace_ok=True,
        companions={"models": lambda f: [f"--data={f.shards}"],
                    "data": lambda f: [f"--models={f.model},{f.model2}"],
                    "export": lambda f: [f"--models={f.model},{f.model2}",
                                         f"--data={f.shards}"],
                    "label_csv": lambda f: [f"--models={f.model},{f.model2}",
                                            f"--data={f.shards}"]}),
    "psla-average-weights": Cmd("psla_tf.cli.average_weights", lambda f, o: [
        f"--checkpoints={f.model},{f.model2}", f"--output={o}/avg.keras", "--noprogress"]),
    "psla-enhance-labels": Cmd("psla_tf.cli.enhance_labels", lambda f, o: [
        f"--train_data={f.datafile}", f"--scores={f.scores_listing}",
        f"--ontology={f.ontology}", f"--label_csv={f.label_csv}", f"--output={o}/le.json"],
        replace_ok=True),
    "psla-split": Cmd("psla_tf.cli.split", lambda f, o: [
        f"--input={f.listing}", f"--output_prefix={o}/lists/s", "--val_fraction=0.5",
        "--test_fraction=0"]),
    "psla-cross-validate": Cmd("psla_tf.cli.cross_validate", lambda f, o: [
        f"--input={f.cv_listing}", f"--exp_dir={o}/cv", *TINY_TRAIN, "--val_groups=0",
        "--batch_size=1"]),
    "psla-sampling-report": Cmd("psla_tf.cli.sampling_report", lambda f, o: [
        f"--train_data={f.shards}", f"--out_dir={o}/report", "--epochs=1", "--batch_size=2",
        "--noprogress"]),
    "psla-import-checkpoint": Cmd("psla_tf.cli.import_checkpoint", lambda f, o: [
        f"--checkpoint={f.pth}", f"--label_csv={f.label_csv}", f"--output={o}/m.keras"]),
    "psla-add-teacher-scores": Cmd("psla_tf.cli.add_teacher_scores", lambda f, o: [
        f"--data={f.shards}", f"--teacher_scores={f.scores}", f"--output={o}/kd/train",
        "--noprogress"]),
    "psla-make-fsdd-mixtures": Cmd("psla_tf.cli.make_fsdd_mixtures", lambda f, o: [
        f"--fsdd_dir={f.fsdd}", f"--out={o}/mix", "--num_train=1", "--num_eval=1",
        "--workers=1"]),
}


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    value: Callable[[types.SimpleNamespace, str], str]  # (fixtures, case folder) → value
    expect: int = 2


def _bad(name):
    return lambda f, o: f.bad[name]


MISSING = Case("missing", lambda f, o: os.path.join(f.dir, "no_such_file.xyz"))
EMPTY_DIR = Case("folder", _bad("empty_dir"))

INPUT_CASES: dict[str, list[Case]] = {
    P.MODEL: [Case("missing", lambda f, o: os.path.join(f.dir, "none.keras")), EMPTY_DIR,
              Case("empty_file", _bad("empty.keras")), Case("text_file", _bad("notes.keras")),
              Case("text_file_txt", _bad("notes.txt")), Case("audio_file", _bad("nan.wav")),
              Case("truncated", _bad("truncated.keras")),
              Case("scores_file", lambda f, o: f.scores)],
    P.SHARDS: [Case("glob_matches_nothing", lambda f, o: os.path.join(f.dir, "none-*.tfrecord")),
               Case("listing", lambda f, o: f.listing), Case("audio_file", _bad("stereo8k.wav")),
               Case("folder", _bad("empty_dir")), Case("empty_file", _bad("empty.npz")),
               Case("scores_file", lambda f, o: f.scores)],
    P.LISTING: [Case("missing", lambda f, o: os.path.join(f.dir, "none.csv")),
                Case("audio_file", lambda f, o: f.audio), Case("empty_file", _bad("empty.csv")),
                Case("binary_file", lambda f, o: f.scores), Case("folder", _bad("empty_dir")),
                Case("truncated_json", _bad("truncated.json"))],
    P.AUDIO: [Case("missing", lambda f, o: os.path.join(f.dir, "none.wav")),
              Case("empty_file", _bad("empty.wav")), Case("folder", _bad("empty_dir")),
              Case("text_file", _bad("notes.wav"), expect=1),
              Case("truncated", _bad("truncated.wav"), expect=1),
              Case("nan_samples", _bad("nan.wav"), expect=1),
              Case("8khz_stereo", _bad("stereo8k.wav"), expect=0)],
    P.SCORES: [Case("missing", lambda f, o: os.path.join(f.dir, "none.npz")),
               Case("empty_file", _bad("empty.npz")), Case("folder", _bad("empty_dir")),
               Case("text_file", _bad("notes.npz")), Case("audio_file", lambda f, o: f.audio),
               Case("truncated", _bad("truncated.npz")),
               Case("wrong_arrays", _bad("wrong_arrays.npz")),
               Case("nan_scores", _bad("nan_scores.npz"))],
    P.LABEL_CSV: [Case("missing", lambda f, o: os.path.join(f.dir, "none.csv")),
                  Case("empty_file", _bad("empty.csv")), Case("folder", _bad("empty_dir")),
                  Case("audio_file", lambda f, o: f.audio),
                  Case("not_a_class_map", _bad("table.csv")),
                  Case("wrong_vocabulary", _bad("other_vocab.csv"))],
    P.TABLE: [Case("missing", lambda f, o: os.path.join(f.dir, "none.csv")),
              Case("empty_file", _bad("empty.csv")), Case("folder", _bad("empty_dir")),
              Case("audio_file", lambda f, o: f.audio), Case("no_columns", _bad("table.csv"))],
    P.JSON: [Case("missing", lambda f, o: os.path.join(f.dir, "none.json")),
             Case("empty_file", _bad("empty.json")), Case("folder", _bad("empty_dir")),
             Case("audio_file", lambda f, o: f.audio),
             Case("truncated", _bad("truncated.json"))],
    P.TORCH: [Case("missing", lambda f, o: os.path.join(f.dir, "none.pth")),
              Case("empty_file", _bad("empty.npz")), Case("folder", _bad("empty_dir")),
              Case("text_file", _bad("notes.txt")), Case("not_a_state_dict", lambda f, o: f.pth)],
    P.WEIGHTS: [Case("missing", lambda f, o: os.path.join(f.dir, "none.h5")),
                Case("empty_file", _bad("empty.keras")), Case("folder", _bad("empty_dir")),
                Case("text_file", _bad("notes.txt"))],
    P.FOLDER: [Case("missing", lambda f, o: os.path.join(f.dir, "no_such_folder")),
               Case("a_file", lambda f, o: f.audio)],
}
INPUT_CASES[P.DATA] = INPUT_CASES[P.SHARDS][:1] + [
    c for c in INPUT_CASES[P.LISTING] if c.name != "folder"] + [
    Case("empty_folder", _bad("empty_dir"))]


def _parent_is_file(ext):
    return Case("parent_is_a_file", lambda f, o: os.path.join(f.bad["notes.txt"], f"x{ext}"))


def _readonly(ext):
    def value(f, o):
        d = os.path.join(o, "readonly")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o555)
        return os.path.join(d, "sub", f"x{ext}")
    return Case("folder_not_writable", value)


def _existing_folder(f, o):
    os.makedirs(os.path.join(o, "existing"), exist_ok=True)
    return os.path.join(o, "existing")


def _existing_file(f, o):
    p = os.path.join(o, "existing.out")
    with open(p, "w") as fh:
        fh.write("an older output\n")
    return p


OUTPUT_CASES = {
    P.OUT_FILE: [_parent_is_file(".out"), Case("is_a_folder", _existing_folder),
                 _readonly(".out")],
    P.OUT_DIR: [_parent_is_file(""), Case("is_a_file", _existing_file), _readonly("")],
    P.OUT_PREFIX: [_parent_is_file(""), Case("ends_with_a_slash",
                                             lambda f, o: os.path.join(o, "prefix") + os.sep),
                   _readonly("")],
}

# (command, flag, case) → the documented exit status where it differs from the kind's
EXPECT = {
    # an optional listing folder of class sub-folders: an empty one is refused too (2)
    # evaluate --target_data: the scores' clips are not in the listing → no clip (2)
    # export --compare_data / --calibration_data only matter with --tflite
}
# (command, flag) → extra cases of that flag (besides its kind's)
EXTRA = {
    ("psla-predict", "data"): [
        Case("other_vocabulary", lambda f, o: f.other_shards),
        Case("truncated_shard", lambda f, o: f.truncated_shards),
        Case("listing_rows_missing_audio", _bad("rows_missing_audio.csv"))],
    ("psla-train", "eval_data"): [Case("other_vocabulary", lambda f, o: f.other_shards)],
    ("psla-evaluate", "data"): [Case("other_vocabulary", lambda f, o: f.other_shards)],
    ("psla-prepare", "input"): [Case("rows_missing_audio", _bad("rows_missing_audio.csv"))],
}


# path flags a command checks itself because they only matter with another flag
UNDECLARED = {"psla-infer": {"frame_dir": P.PathFlag(P.OUT_DIR, overwrite="merge")},
              # files, globs or a run folder with --epochs: resolved by the command
              "psla-average-weights": {"checkpoints": P.PathFlag(P.MODEL, many=True)}}


# placeholder fixtures: only to see which flags a base invocation sets
_NAMES = {k: k for k in ("model", "model2", "shards", "listing", "datafile", "cv_listing",
                         "scores", "scores2", "scores_listing", "label_csv", "ontology", "pth",
                         "fsdd", "audio", "dir")}


def _declared(name: str) -> dict[str, P.PathFlag]:
    with command(COMMANDS[name].module) as run:
        return {**run.module.PATHS, **UNDECLARED.get(name, {})}


def _generate():
    out = []
    for name, cmd in COMMANDS.items():
        for flag, spec in _declared(name).items():
            if spec.is_output:
                cases = list(OUTPUT_CASES[spec.kind])
                if spec.overwrite == "refuse":
                    cases.append(Case("existing_output_refused", _existing_output, 2))
                elif (spec.overwrite == "replace" and cmd.replace_ok and spec.kind == P.OUT_FILE
                      and _base_value(cmd.base(types.SimpleNamespace(**_NAMES), "/o"), flag)):
                    cases.append(Case("existing_output_replaced", _existing_output, 0))
            else:
                cases = INPUT_CASES[spec.kind] + EXTRA.get((name, flag), [])
            for case in cases:
                expect = EXPECT.get((name, flag, case.name), case.expect)
                if spec.kind == P.LISTING and not spec.folder_ok and case.name == "folder":
                    expect = 2
                out.append(pytest.param(name, flag, case, expect,
                                        id=f"{name}-{flag}-{case.name}"))
    return out


def _existing_output(f, o):
    """The base run's own output path, already holding an older file."""
    return "EXISTING"  # resolved in test_bad_input (needs the base value)


# ----------------------------------------------------------------------------- helpers
def _with_value(argv: list[str], flag: str, value: str, spec: P.PathFlag,
                companions: list[str]) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (a list flag keeps its other members)."""
    if flag == P.POSITIONAL:
        return [a for a in argv if a.startswith("--")] + [value]
    out, found = [], False
    for a in argv:
        if a.startswith(f"--{flag}="):
            old = a.split("=", 1)[1]
            rest = old.split(",")[1:] if spec.many else []
            out.append(f"--{flag}=" + ",".join([value, *rest]))
            found = True
        else:
            out.append(a)
    if not found:
        out.append(f"--{flag}={value}")
    names = {a.split("=", 1)[0] for a in out}
    return out + [c for c in companions if c.split("=", 1)[0] not in names]


def _base_value(argv: list[str], flag: str) -> str | None:
    for a in argv:
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
    return None


def _check_one_error_line(r, expect):
    assert r.code == expect, (r.code, r.err[-3000:], r.out[-1000:])
    assert "Traceback" not in r.err, r.err[-3000:]
    if expect == 0:
        return
    lines = r.error_lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, lines
    assert len(errors[0]) > len("error: ") + 10, errors
    assert "unexpected" not in errors[0] or "arguments" in errors[0], errors  # no bug line


# ----------------------------------------------------------------------------- tests
def test_every_command_is_in_the_matrix(processes):
    """(``processes`` starts the subprocess runs now, so they overlap the matrix.)"""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    assert set(scripts) == set(COMMANDS), sorted(set(scripts) ^ set(COMMANDS))
    for name, cmd in COMMANDS.items():
        assert scripts[name] == f"{cmd.module}:main", name


PATH_WORDS = re.compile(r"data|dir|path|csv|model|output|scores|checkpoint|file|ontology|"
                        r"input|folder|^out$|export|json|tflite|onnx|report|prefix|init_from|"
                        r"pretrained|root|label")
NOT_PATHS = {"filename_pattern", "input_format", "model_name", "model_description",
             "model_version", "model_license", "model_author", "dataset_mean", "dataset_std",
             "ignore_labels", "save_predictions", "skip_corrupt_records", "allow_cut_clips",
             "fold_column", "group_regex", "json", "frame_level"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_path_flag_is_declared(name):
    """Each string flag whose name says it holds a path is in the module's PATHS (or is
    listed above as not a path), so the matrix covers it."""
    from absl import flags
    cmd = COMMANDS[name]
    with command(cmd.module) as run:
        declared = set(run.module.PATHS)
        fv = flags.FLAGS
        strings = {n for n in fv if n == fv[n].name and fv[n].flag_type() == "string"
                   and not (fv.find_module_defining_flag(n) or "").startswith("absl")}
    json_is_output = name == "psla-ensemble"  # --json FILE there; a boolean elsewhere
    want = {n for n in strings if PATH_WORDS.search(n) and n not in NOT_PATHS}
    if json_is_output:
        want.add("json")
    missing = sorted(want - declared - set(UNDECLARED.get(name, {})))
    assert not missing, f"{name}: declare {missing} in PATHS (psla_tf/cli/paths.py)"


_LOADED: dict[str, object] = {}
CACHE_MODELS = ("psla-predict", "psla-infer", "psla-export", "psla-ensemble")
"""Commands that only read the fixture models: they get each loaded once (speed)."""


def _cached_loader(real, fx):
    def load_tagger(path, compile=False):
        key = os.path.abspath(str(path))
        if compile or key not in (fx.model, fx.model2):
            return real(path, compile=compile)
        if key not in _LOADED:
            _LOADED[key] = real(path)
        return _LOADED[key]
    return load_tagger


@pytest.mark.parametrize("name,flag,case,expect", _generate())
def test_bad_input(fx, tmp_path, monkeypatch, name, flag, case, expect):
    cmd = COMMANDS[name]
    if name in CACHE_MODELS:
        from psla_tf.models import loading
        monkeypatch.setattr(loading, "load_tagger", _cached_loader(loading.load_tagger, fx))
    spec = _declared(name)[flag]
    out = str(tmp_path / "case")
    os.makedirs(out)
    base = cmd.base(fx, out)
    value = case.value(fx, out)
    old = None
    if value == "EXISTING":
        value = _base_value(base, flag)
        assert value, f"{name}: the base invocation sets no --{flag}"
        os.makedirs(os.path.dirname(value), exist_ok=True)
        with open(value, "w") as fh:
            fh.write("an older output\n")
        old = open(value, "rb").read()
    if case.name == "folder_not_writable" and IS_ROOT:  # root may write in a 0555 folder:
        ro, real_access = os.path.join(out, "readonly"), os.access  # the check is what counts

        def access(path, mode, *a, **k):
            if os.path.abspath(path) == ro and mode & os.W_OK:
                return False
            return real_access(path, mode, *a, **k)
        monkeypatch.setattr(os, "access", access)
    argv = _with_value(base, flag, value, spec, [c for c in
                                                 cmd.companions.get(flag, lambda f: [])(fx)])
    before = _tree(out)
    with command(cmd.module) as run:
        r = run(*argv)
    try:
        _check_one_error_line(r, expect)
        after = _tree(out)
        if expect != 0:
            new = sorted(set(after) - set(before))
            assert not new, f"left behind: {new}"
            if old is not None:
                assert open(value, "rb").read() == old, "the existing output was changed"
        elif old is not None:
            assert open(value, "rb").read() != old, "the existing output was not replaced"
            leftovers = [p for p in after if ".tmp" in p]
            assert not leftovers, leftovers
    finally:
        for dirpath, dirnames, _ in os.walk(out):
            for dn in dirnames:
                os.chmod(os.path.join(dirpath, dn), 0o755)
    assert _tree(fx.dir) == fx.snapshot, "an input fixture was changed"


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"psla-infer"}))
def test_unquoted_glob_is_one_line(fx, tmp_path, name):
    """A glob the shell expanded (``--data=a-0.tfrecord a-1.tfrecord``) leaves extra
    arguments: refused (exit 2) instead of silently using the first file."""
    cmd = COMMANDS[name]
    out = str(tmp_path / "case")
    os.makedirs(out)
    with command(cmd.module) as run:
        r = run(*cmd.base(fx, out), fx.shards.replace("*", "00000"))
    _check_one_error_line(r, 2)
    assert "unexpected arguments" in r.error_lines[0] and "quote" in r.error_lines[0]
    assert not os.listdir(out)


# ----------------------------------------------------------------------------- --debug
@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(fx, tmp_path, how):
    """--debug / PSLA_DEBUG=1: the traceback above the same one line, same exit status."""
    args = [f"--scores={fx.bad['truncated.npz']}", f"--out_dir={tmp_path / 'r'}"]
    with command("psla_tf.cli.evaluate") as run:
        plain = run(*args)
        debug = run(*args, "--debug") if how == "flag" else run(*args, env={"PSLA_DEBUG": "1"})
    assert plain.code == debug.code == 2
    assert "Traceback" not in plain.err and len(plain.error_lines) == 1
    assert "Traceback (most recent call last)" in debug.err
    assert debug.error_lines[-1] == plain.error_lines[0]
    assert not (tmp_path / "r").exists()


def test_bad_flag_values_are_one_line(fx, tmp_path):
    """absl's parse errors (a wrong type, an unknown flag, a missing flagfile, a required
    flag) are one line and exit 2 too, not absl's usage text."""
    cases = {"psla_tf.cli.predict": ["--batch_size=abc", "--no_such_flag=1",
                                     f"--flagfile={tmp_path / 'none.flags'}"],
             "psla_tf.cli.enhance_labels": []}
    for module, bad in cases.items():
        with command(module) as run:
            for arg in bad or ["--threshold=mean"]:  # enhance_labels: required flags missing
                r = run(arg)
                assert r.code == 2 and "Traceback" not in r.err, (arg, r.err)
                assert len(r.error_lines) == 1 and r.error_lines[0].startswith("error: "), (
                    arg, r.err)


# ----------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def processes(fx, tmp_path_factory):
    """A few runs through the installed entry points, started together (they overlap):
    the process boundary itself — exit status, stderr, no traceback."""
    import sysconfig

    from helpers_proc import Background
    d = tmp_path_factory.mktemp("matrix_processes")
    bg = Background(str(d / "logs"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_HOME=str(d / "keras_home"),
               HOME=str(d), https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    py, bindir = sys.executable, sysconfig.get_path("scripts")
    runs = {
        # an audio file where a listing or shards are expected (was a UnicodeDecodeError)
        "predict_audio": [py, os.path.join(ROOT, "tools", "predict.py"), f"--model={fx.model}",
                          f"--data={fx.audio}", f"--output={d / 'p' / 'scores.npz'}"],
        # ImageNet weights without network (was a PretrainedWeightsError traceback)
        "imagenet": [py, os.path.join(ROOT, "main.py"), f"--train_data={fx.shards}",
                     f"--eval_data={fx.shards}", f"--exp_dir={d / 'exp'}",
                     *[a for a in TINY_TRAIN if not a.startswith(("--pretrained", "--model",
                                                                  "--cnn_width"))],
                     "--eff_b=0", "--pretrained=imagenet"],   # cnn has no ImageNet weights
        # the model's own input length is the default window (was: 10 s refused)
        "infer_default_window": [py, os.path.join(ROOT, "tools", "infer.py"),
                                 f"--model={fx.model}", "--json", fx.audio],
        "bad_flag": [os.path.join(bindir, "psla-evaluate"), "--show=many"],
        "debug": [os.path.join(bindir, "psla-evaluate"), f"--scores={fx.bad['notes.npz']}",
                  f"--out_dir={d / 'r'}", "--debug"],
    }
    for name, argv in runs.items():
        bg.start(name, argv, env=env, cwd=str(d))
    yield types.SimpleNamespace(bg=bg, dir=d)
    bg.close()


def _one_error_line(p) -> str:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("name,expect,message", [
    ("predict_audio", 2, "is an audio file (WAV), not a listing"),
    ("imagenet", 2, "--pretrained=imagenet: could not obtain ImageNet weights"),
    ("bad_flag", 2, "flag --show=many"),
])
def test_process_boundary(processes, name, expect, message):
    p = processes.bg.result(name, 600)
    assert p.returncode == expect, p.stderr[-3000:]
    assert message in _one_error_line(p)
    assert not os.path.exists(processes.dir / "p") and not os.path.exists(processes.dir / "exp")


def test_process_debug_traceback(processes):
    p = processes.bg.result("debug", 600)
    assert p.returncode == 2
    assert "Traceback (most recent call last)" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_infer_window_follows_the_model(processes, fx):
    """A model with a short input (here 64 frames = 0.655 s) is tagged with windows of its
    own input length by default, hopped by half a window."""
    from helpers_models import CLIP_SAMPLES
    p = processes.bg.result("infer_default_window", 600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["window_seconds"] == pytest.approx(CLIP_SAMPLES / 16000)
    assert out["hop_seconds"] == pytest.approx(CLIP_SAMPLES / 32000)
    assert out["files"][0]["num_windows"] == 1  # the clip is one model input long
