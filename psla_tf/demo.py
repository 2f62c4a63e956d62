"""A small procedural multi-label sound-event dataset for the demo recipe and tests.

Nine synthetic event types (pure tones, chirps, band-limited noise, click trains, AM tones,
harmonic stacks) are mixed at random onsets and gains onto a quiet noise floor, 1-3 events per
clip, with Zipf-like class frequencies (so balanced sampling, paper Alg. 1, matters). The
vocabulary adds three parent classes from a small AudioSet-format ontology, so label
enhancement (paper Sec. V) has something to do:

=================== ===================== =============================================
parent (vocabulary) children              ontology notes
=================== ===================== =============================================
Tone                Low tone, High tone,  "AM tone" has two parents (Tone and the
                    AM tone               abstract "Synthetic sound")
Chirp               Up chirp, Down chirp
Noise               Noise burst, Hiss
(Synthetic sound)   all of the above,     abstract (restrictions ["abstract"], not in
                    Click train, Harmonic the vocabulary): gives no edges
                    stack
=================== ===================== =============================================

Labels. Evaluation clips are labelled exactly: every mixed-in event's class plus its
vocabulary parents. Training clips carry two deliberate kinds of missing labels (rate
``missing_label_rate``, default 0.3, drawn per clip): a clip with a chirp loses the "Chirp"
parent label (a Type II error, fixed by adding ancestors), and a clip with a noise event keeps
"Noise" but loses the child label ("Noise burst" / "Hiss": a Type I error, fixed by adding
children). Each datafile entry also records its ``events`` (class, onset, duration, gain,
frequencies) so tests can check the audio against the labels.

Every clip is drawn from its own generator seeded by (seed, split, index): clip i is the same
whatever the number of clips. Files: ``audio/{split}/{split}_{i:05d}.wav`` (16 kHz mono
PCM16), ``train.json`` / ``eval.json`` (PSLA datafiles, wav paths relative to the folder),
``labels.csv``, ``ontology.json``; ``.complete.json`` marks a finished folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from psla_tf import atomic
from psla_tf import params
from psla_tf.data import records
from psla_tf.ontology import write_ontology

DEMO_VERSION = 1
SAMPLE_RATE = params.SAMPLE_RATE
NOISE_FLOOR_RMS = 1e-3          # -60 dBFS white noise under every clip
GAIN_DB = (-18.0, -3.0)         # event peak gain range, dBFS
ZIPF_EXPONENT = 1.0             # class probability ∝ 1 / rank ** ZIPF_EXPONENT
EVENTS_PER_CLIP = (1, 3)        # inclusive range, distinct classes per clip


@dataclasses.dataclass(frozen=True)
class DemoClass:
    mid: str
    name: str
    band: tuple[float, float] = (0.0, 0.0)   # Hz where the event's energy lies (tests)
    parent: str | None = None                # vocabulary parent mid


# Event classes in Zipf rank order (most frequent first), then the parent classes.
EVENT_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("/demo/tone_low", "Low tone", (280.0, 520.0), "/demo/tone"),
    DemoClass("/demo/noise_burst", "Noise burst", (1000.0, 2000.0), "/demo/noise"),
    DemoClass("/demo/chirp_up", "Up chirp", (600.0, 4200.0), "/demo/chirp"),
    DemoClass("/demo/harmonic", "Harmonic stack", (150.0, 2500.0)),
    DemoClass("/demo/click_train", "Click train", (2000.0, 7000.0)),
    DemoClass("/demo/tone_high", "High tone", (2400.0, 3600.0), "/demo/tone"),
    DemoClass("/demo/am_tone", "AM tone", (1150.0, 1650.0), "/demo/tone"),
    DemoClass("/demo/hiss", "Hiss", (5000.0, 7500.0), "/demo/noise"),
    DemoClass("/demo/chirp_down", "Down chirp", (600.0, 4200.0), "/demo/chirp"),
)
PARENT_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("/demo/tone", "Tone"),
    DemoClass("/demo/chirp", "Chirp"),
    DemoClass("/demo/noise", "Noise"),
)
ABSTRACT_MID, ABSTRACT_NAME = "/demo/synthetic", "Synthetic sound"
TYPE2_PARENT = "/demo/chirp"    # train: parent label dropped (Type II error)
TYPE1_PARENT = "/demo/noise"    # train: child label dropped, parent kept (Type I error)


def vocabulary() -> tuple[list[str], list[str]]:
    """(mids, names) of the demo vocabulary: parents first, then the event classes."""
    classes = PARENT_CLASSES + EVENT_CLASSES
    return [c.mid for c in classes], [c.name for c in classes]


def class_probabilities() -> np.ndarray:
    """Zipf-like probabilities of the event classes (EVENT_CLASSES order)."""
    p = 1.0 / np.arange(1, len(EVENT_CLASSES) + 1) ** ZIPF_EXPONENT
    return p / p.sum()


def ontology_entries() -> list[dict[str, Any]]:
    """The demo ontology in AudioSet format (one abstract root, three parents)."""
    entries = [{"id": ABSTRACT_MID, "name": ABSTRACT_NAME, "restrictions": ["abstract"],
                "description": "Root of the procedural demo classes (abstract).",
                "child_ids": [p.mid for p in PARENT_CLASSES]
                + [c.mid for c in EVENT_CLASSES if c.parent is None] + ["/demo/am_tone"]}]
    for p in PARENT_CLASSES:
        entries.append({"id": p.mid, "name": p.name, "restrictions": [],
                        "child_ids": [c.mid for c in EVENT_CLASSES if c.parent == p.mid]})
    for c in EVENT_CLASSES:
        entries.append({"id": c.mid, "name": c.name, "restrictions": [], "child_ids": []})
    return entries


# ----------------------------------------------------------------------------- synthesis
def _envelope(n: int, ramp: int = 160) -> np.ndarray:
    """Flat envelope with 10-ms raised-cosine ramps."""
    env = np.ones(n)
    r = min(ramp, n // 2)
    if r > 0:
        up = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        env[:r], env[n - r:] = up, up[::-1]
    return env


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[(f < lo) | (f > hi)] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.max(np.abs(x)) + 1e-12)


def _synth(mid: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, float]]:
    """One event of class ``mid``, ``n`` samples, peak 1; with its drawn parameters."""
    t = np.arange(n) / SAMPLE_RATE
    dur = n / SAMPLE_RATE
    info: dict[str, float] = {}
    if mid in ("/demo/tone_low", "/demo/tone_high"):
        f = rng.uniform(300, 500) if mid.endswith("low") else rng.uniform(2500, 3500)
        x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        info["freq"] = f
    elif mid in ("/demo/chirp_up", "/demo/chirp_down"):
        f0, f1 = rng.uniform(600, 900), rng.uniform(3000, 4000)
        if mid.endswith("down"):
            f0, f1 = f1, f0
        k = np.log(f1 / f0) / dur                      # exponential sweep
        x = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
        info.update(f_start=f0, f_end=f1)
    elif mid == "/demo/noise_burst":
        c = rng.uniform(1350, 1650)
        x = _band_noise(rng, n, c - 300, c + 300)
        info["center"] = c
    elif mid == "/demo/hiss":
        x = _band_noise(rng, n, 5200, 7300)
    elif mid == "/demo/click_train":
        rate = rng.uniform(8, 20)
        x = np.zeros(n)
        click = _band_noise(rng, 48, 2000, 7800) * np.exp(-np.arange(48) / 8.0)
        for s in np.arange(0, dur, 1.0 / rate):
            i = int(s * SAMPLE_RATE)
            m = min(48, n - i)
            x[i:i + m] += click[:m]
        info["rate"] = rate
    elif mid == "/demo/am_tone":
        fc, fm = rng.uniform(1250, 1550), rng.uniform(6, 12)
        x = (1 + 0.9 * np.sin(2 * np.pi * fm * t)) * np.sin(2 * np.pi * fc * t) / 1.9
        info.update(freq=fc, mod_freq=fm)
    elif mid == "/demo/harmonic":
        f0 = rng.uniform(150, 250)
        nh = int(rng.integers(6, 11))
        x = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h
                for h in range(1, nh + 1))
        info.update(f0=f0, harmonics=float(nh))
    else:
        raise ValueError(f"unknown demo event class {mid}")
    x = x * _envelope(n)
    return x / (np.max(np.abs(x)) + 1e-12), info


def complete_labels(events: list[dict[str, Any]]) -> list[str]:
    """A clip's exact labels from its ``events`` (datafile entries): the vocabulary parents of
    the events' classes, then the classes — an evaluation clip's labels; a training clip's
    before its missing labels are drawn."""
    present = [e["label"] for e in events]
    parents = [c.parent for c in EVENT_CLASSES if c.mid in present and c.parent]
    return list(dict.fromkeys(parents + present))


def make_clip(seed: int, split: str, index: int, clip_seconds: float,
              missing_label_rate: float = 0.3) -> tuple[np.ndarray, list[str], list[dict]]:
    """Clip ``index`` of ``split``: (waveform float in [-1, 1], label mids, events)."""
    split_id = {"train": 0, "eval": 1}[split]
    rng = np.random.default_rng([seed, split_id, index])
    n = int(round(clip_seconds * SAMPLE_RATE))
    x = rng.standard_normal(n) * NOISE_FLOOR_RMS
    k = int(rng.integers(EVENTS_PER_CLIP[0], EVENTS_PER_CLIP[1] + 1))
    chosen = rng.choice(len(EVENT_CLASSES), size=k, replace=False, p=class_probabilities())
    events = []
    for ci in sorted(chosen.tolist()):
        c = EVENT_CLASSES[ci]
        d = float(rng.uniform(0.4, min(1.2, clip_seconds)))
        m = int(d * SAMPLE_RATE)
        onset = int(rng.integers(0, n - m + 1))
        gain_db = float(rng.uniform(*GAIN_DB))
        ev, info = _synth(c.mid, rng, m)
        x[onset:onset + m] += ev * 10 ** (gain_db / 20)
        events.append({"label": c.mid, "onset": onset / SAMPLE_RATE, "duration": m / SAMPLE_RATE,
                       "gain_db": gain_db, **info})
    peak = np.max(np.abs(x))
    if peak > 0.99:
        x *= 0.99 / peak
    labels = complete_labels(events)
    if split == "train":
        drop2, drop1 = rng.random() < missing_label_rate, rng.random() < missing_label_rate
        if drop2 and TYPE2_PARENT in labels:
            labels.remove(TYPE2_PARENT)
        if drop1 and TYPE1_PARENT in labels:
            labels = [m for m in labels if next(
                (c.parent for c in EVENT_CLASSES if c.mid == m), None) != TYPE1_PARENT]
    return x, labels, events


# ----------------------------------------------------------------------------- files
def write_wav(path: str, x: np.ndarray) -> None:
    """A float waveform in [-1, 1] as a 16-bit 16-kHz WAV file, atomically."""
    import soundfile as sf
    with atomic.atomic_path(path, ".wav") as tmp:
        sf.write(tmp, records.float_to_int16(x), SAMPLE_RATE, subtype="PCM_16")


def generate_demo_dataset(out_dir: str, num_train: int = 800, num_eval: int = 200,
                          clip_seconds: float = 3.0, seed: int = 0,
                          missing_label_rate: float = 0.3,
                          progress: bool = True) -> dict[str, str]:
    """Generate (once) the demo dataset under ``out_dir``; returns its paths.

    Keys: ``root``, ``train`` / ``eval`` (datafiles), ``label_csv``, ``ontology``. A folder
    with a ``.complete.json`` of the same parameters is reused as is; a folder left half-done
    with the same parameters is completed (each WAV is written atomically, so any WAV present
    is whole); other parameters regenerate everything.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError("num_train and num_eval must be positive")
    if not 0.5 <= clip_seconds <= 30:
        raise ValueError("clip_seconds must be within [0.5, 30]")
    if not 0.0 <= missing_label_rate <= 1.0:
        raise ValueError("missing_label_rate must be within [0, 1]")
    spec = {"version": DEMO_VERSION, "num_train": int(num_train), "num_eval": int(num_eval),
            "clip_seconds": float(clip_seconds), "seed": int(seed),
            "missing_label_rate": float(missing_label_rate), "sample_rate": SAMPLE_RATE}
    paths = {"root": out_dir, "train": os.path.join(out_dir, "train.json"),
             "eval": os.path.join(out_dir, "eval.json"),
             "label_csv": os.path.join(out_dir, "labels.csv"),
             "ontology": os.path.join(out_dir, "ontology.json")}
    marker = os.path.join(out_dir, ".complete.json")
    started = os.path.join(out_dir, ".params.json")
    if _read_json(marker) == spec and all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    reuse = _read_json(started) == spec
    if not reuse:
        import shutil
        shutil.rmtree(os.path.join(out_dir, "audio"), ignore_errors=True)
        atomic.write_json(started, spec, indent=1)
    for split, count in (("train", num_train), ("eval", num_eval)):
        _generate_split(out_dir, split, count, spec, progress, paths[split])
    mids, names = vocabulary()
    records.write_label_csv(paths["label_csv"], mids, names)
    with atomic.atomic_path(paths["ontology"]) as tmp:
        write_ontology(tmp, ontology_entries())
    atomic.write_json(marker, spec, indent=1)
    return paths


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _generate_split(out_dir: str, split: str, count: int, spec: dict, progress: bool,
                    datafile: str) -> None:
    from tqdm import tqdm
    audio = os.path.join(out_dir, "audio", split)
    os.makedirs(audio, exist_ok=True)
    entries = []
    for i in tqdm(range(count), desc=f"demo {split}", unit="clip", disable=not progress):
        rel = f"audio/{split}/{split}_{i:05d}.wav"
        x, labels, events = make_clip(spec["seed"], split, i, spec["clip_seconds"],
                                      spec["missing_label_rate"])
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path):
            write_wav(path, x)
        entries.append({"wav": rel, "labels": ",".join(labels),
                        "events": [{k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in e.items()} for e in events]})
    atomic.write_json(datafile, {"data": entries}, indent=1)


if __name__ == "__main__":  # python -m psla_tf.demo OUT_DIR
    import sys
    print(generate_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else "demo_data"))
