"""A real-audio multi-label set: 3-s mixtures of 1-3 spoken FSDD digits over noise.

The Free Spoken Digit Dataset (``{digit}_{speaker}_{n}.wav``, 8 kHz, 6 speakers) gives real
speech; each clip mixes 1-3 (1..``max_digits``) *distinct* digits at random onsets and levels
onto a coloured noise floor, with Zipf-skewed digit frequencies (P(digit of rank r) ∝ 1/r,
rank = digit + 1), so balanced sampling (paper Alg. 1) and mixup matter as on AudioSet.
Splits are speaker-disjoint: a split's clips use only its speakers' recordings. Labels are the
digits present (10 classes).

This is the learning-dynamics instrument of psla_tf (PyTorch reference vs psla_tf, distillation,
own-data recipes). Every clip is drawn from its own generator seeded by (seed, split, index).

Files under ``out_dir``: ``audio/{split}/{split}_{i:05d}.wav`` (16 kHz PCM16), ``{split}.json``
(PSLA datafiles, paths relative to ``out_dir``, each entry with its ``speakers``),
``labels.csv``; ``.complete.json`` marks a finished folder.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Sequence

import numpy as np

from psla_tf import atomic
from psla_tf import params
from psla_tf.data import records
from psla_tf.demo import _read_json, write_wav

VERSION = 1
SAMPLE_RATE = params.SAMPLE_RATE
DIGITS = tuple(range(10))
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
DEFAULT_SPLITS = {"train": ("george", "jackson", "lucas", "nicolas"),
                  "eval": ("theo", "yweweler")}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GAIN_DB = (-20.0, -3.0)        # peak level of each spoken digit, dBFS
NOISE_DB = (-50.0, -25.0)      # RMS of the noise floor, dBFS
MAX_DIGITS = 3                 # digits per clip: 1..MAX_DIGITS, uniform
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def vocabulary() -> tuple[list[str], list[str]]:
    """(mids, display names) of the 10 digit classes, in index order."""
    return [f"/fsdd/{d}" for d in DIGITS], [f"Spoken {n}" for n in DIGIT_NAMES]


def digit_probabilities(exponent: float = 1.0) -> np.ndarray:
    """Zipf-skewed digit probabilities ``[10]``: P(d) ∝ 1 / (d + 1) ** exponent."""
    p = 1.0 / np.arange(1, len(DIGITS) + 1) ** exponent
    return p / p.sum()


def load_recordings(fsdd_dir: str) -> dict[tuple[int, str], list[np.ndarray]]:
    """``{(digit, speaker): [waveform at 16 kHz, ...]}`` from FSDD's recordings folder."""
    import soundfile as sf
    import soxr
    out: dict[tuple[int, str], list[np.ndarray]] = {}
    files = sorted(glob.glob(os.path.join(fsdd_dir, "*.wav")))
    if not files:
        raise FileNotFoundError(f"no FSDD recordings (*.wav) in {fsdd_dir}")
    for path in files:
        m = _NAME.match(os.path.basename(path))
        if not m:
            continue
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(axis=1), sr, SAMPLE_RATE) if sr != SAMPLE_RATE else x[:, 0]
        out.setdefault((int(m.group(1)), m.group(2)), []).append(x.astype(np.float32))
    return out


def coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f²) noise ``[n]``, colour drawn uniformly."""
    white = rng.standard_normal(n)
    slope = rng.choice([0.0, 0.5, 1.0])          # amplitude ∝ f^-slope
    spec = np.fft.rfft(white)
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    x = np.fft.irfft(spec / f ** slope, n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def make_clip(recordings: dict, speakers: Sequence[str], seed: int, split: str, index: int,
              clip_seconds: float = 3.0, zipf_exponent: float = 1.0, max_digits: int = MAX_DIGITS
              ) -> tuple[np.ndarray, list[int], list[dict[str, Any]]]:
    """One mixture ``[clip_seconds · 16 kHz]`` float32, its digits, and the events placed.

    The clip holds 1..``max_digits`` distinct digits (uniform count), so the class prior, the
    eval mAP of a constant scorer, is about (1 + max_digits) / 20.
    """
    rng = np.random.default_rng([seed, sum(map(ord, split)), index])
    n = int(round(clip_seconds * SAMPLE_RATE))
    x = coloured_noise(rng, n) * 10 ** (rng.uniform(*NOISE_DB) / 20)
    k = int(rng.integers(1, max_digits + 1))
    digits = sorted(rng.choice(len(DIGITS), size=k, replace=False,
                               p=digit_probabilities(zipf_exponent)).tolist())
    events = []
    for d in digits:
        spk = str(rng.choice(list(speakers)))
        pool = recordings[(d, spk)]
        utt = pool[int(rng.integers(len(pool)))][:n]
        gain_db = float(rng.uniform(*GAIN_DB))
        utt = utt / (np.max(np.abs(utt)) + 1e-9) * 10 ** (gain_db / 20)
        onset = int(rng.integers(0, n - len(utt) + 1))
        x[onset:onset + len(utt)] += utt
        events.append({"digit": d, "speaker": spk, "onset": round(onset / SAMPLE_RATE, 4),
                       "gain_db": round(gain_db, 2)})
    peak = np.max(np.abs(x))
    if peak > 0.99:
        x *= 0.99 / peak
    return x.astype(np.float32), digits, events


def generate(out_dir: str, fsdd_dir: str, counts: dict[str, int] | None = None,
             splits: dict[str, Sequence[str]] | None = None, seed: int = 0,
             clip_seconds: float = 3.0, zipf_exponent: float = 1.0, max_digits: int = MAX_DIGITS,
             progress: bool = True) -> dict[str, str]:
    """Write the set (once; a finished folder with the same parameters is reused).

    ``counts``: clips per split (default train 2000, eval 600); ``splits``: speakers per split
    (default train george/jackson/lucas/nicolas, eval theo/yweweler); ``max_digits``: 1-3
    digits per clip by default, 1-2 for an easier set. Returns the paths:
    ``root``, ``label_csv`` and one datafile per split.
    """
    from tqdm import tqdm
    counts = dict(counts or {"train": 2000, "eval": 600})
    splits = {k: tuple(v) for k, v in (splits or DEFAULT_SPLITS).items()}
    if set(counts) != set(splits):
        raise ValueError(f"counts {sorted(counts)} and splits {sorted(splits)} name other sets")
    used = [s for v in splits.values() for s in v]
    if len(used) != len(set(used)) or not set(used) <= set(SPEAKERS):
        raise ValueError(f"splits must use distinct speakers of {SPEAKERS}, got {splits}")
    spec = {"version": VERSION, "counts": counts, "splits": {k: list(v) for k, v in
                                                              splits.items()},
            "seed": int(seed), "clip_seconds": float(clip_seconds),
            "zipf_exponent": float(zipf_exponent)}
    if not 1 <= max_digits <= len(DIGITS):
        raise ValueError(f"max_digits must be in 1..{len(DIGITS)}, got {max_digits}")
    if max_digits != MAX_DIGITS:    # folders made before the option keep their marker
        spec["max_digits"] = int(max_digits)
    paths = {"root": out_dir, "label_csv": os.path.join(out_dir, "labels.csv")}
    paths.update({s: os.path.join(out_dir, f"{s}.json") for s in splits})
    marker = os.path.join(out_dir, ".complete.json")
    if _read_json(marker) == spec and all(os.path.exists(p) for p in paths.values()):
        return paths
    recordings = load_recordings(fsdd_dir)
    mids, names = vocabulary()
    for split, speakers in splits.items():
        folder = os.path.join(out_dir, "audio", split)
        os.makedirs(folder, exist_ok=True)
        entries = []
        for i in tqdm(range(counts[split]), desc=f"fsdd mixtures {split}", unit="clip",
                      disable=not progress):
            x, digits, events = make_clip(recordings, speakers, seed, split, i, clip_seconds,
                                          zipf_exponent, max_digits)
            rel = f"audio/{split}/{split}_{i:05d}.wav"
            write_wav(os.path.join(out_dir, rel), x)
            entries.append({"wav": rel, "labels": ",".join(mids[d] for d in digits),
                            "speakers": sorted({e["speaker"] for e in events}),
                            "events": events})
        atomic.write_json(paths[split], {"data": entries}, indent=1)
    records.write_label_csv(paths["label_csv"], mids, names)
    atomic.write_json(marker, spec, indent=1)
    return paths
