"""A classical yardstick for FSDD leave-one-speaker-out: MFCC + RBF support-vector machine,
nested as ``tools/cross_validate.py --val_groups=1`` nests (docs/fsdd_recipe.md, "A classical
yardstick").

Per clip: psla_tf's Kaldi fbank (16 kHz, 128 bins) of the first 0.64 s, the frames within
6 log units (~26 dB) of the loudest kept (energy trim), the first N cepstral coefficients
(orthonormal DCT-II, c1..cN), the clip's mean removed, the utterance resampled to 8 time
points (tempo normalised) → an 8·N vector. Per fold: test speaker g, validation speaker the
next in sorted order, training the other four; N ∈ ``--num_ceps`` is chosen on the
validation speaker, the test speaker is scored once.

    python benchmarks/fsdd_classical_baseline.py --fsdd_dir=../shared/data/fsdd/recordings
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import soundfile as sf
import soxr

from psla_tf.label_propagation import TRIM, utterance_cepstra  # TRIM: 6 log units (~26 dB)

SEGMENTS = 8            # time points per utterance
SAMPLES = 10480         # 64 frames at 16 kHz, the input of configs/fsdd.flags


def load_fbank(fsdd_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fbank [N, 64, 128]``, ``digit [N]``, ``speaker [N]`` of ``{digit}_{speaker}_{n}.wav``."""
    import tensorflow as tf
    from psla_tf.features import kaldi_fbank
    files = sorted(glob.glob(os.path.join(fsdd_dir, "*.wav")))
    if not files:
        raise SystemExit(f"error: no .wav files in {fsdd_dir}")
    waves, digits, speakers = [], [], []
    for f in files:
        digit, speaker, _ = os.path.basename(f)[:-4].split("_")
        x, sr = sf.read(f, dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(1), sr, 16000).astype(np.float32)[:SAMPLES]
        waves.append(np.pad(x, (0, SAMPLES - len(x))))
        digits.append(int(digit))
        speakers.append(speaker)
    fb = kaldi_fbank(tf.constant(np.stack(waves)), 16000, 128).numpy()
    return fb, np.array(digits), np.array(speakers)


def features(fb: np.ndarray, num_ceps: int) -> np.ndarray:
    """``[64, 128]`` log-mel → ``[SEGMENTS * num_ceps]`` (module doc)."""
    c = utterance_cepstra(fb, num_ceps, TRIM)
    t = np.linspace(0, len(c) - 1, SEGMENTS)
    return np.stack([np.interp(t, np.arange(len(c)), c[:, k]) for k in range(num_ceps)], 1).ravel()


def accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    clf = make_pipeline(StandardScaler(), SVC(C=10.0, gamma="scale")).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsdd_dir", default="../shared/data/fsdd/recordings")
    ap.add_argument("--num_ceps", default="8,13,20,30",
                    help="cepstral counts the validation speaker chooses from")
    args = ap.parse_args()
    fb, y, spk = load_fbank(args.fsdd_dir)
    choices = [int(n) for n in args.num_ceps.split(",")]
    feats = {n: np.stack([features(x, n) for x in fb]) for n in choices}
    groups = sorted(set(spk))
    print("| test speaker | validation | N chosen (val accuracy) | test accuracy |")
    print("| --- | --- | --- | --- |")
    results = []
    for i, test in enumerate(groups):
        val = groups[(i + 1) % len(groups)]
        train = (spk != test) & (spk != val)
        scores = {n: accuracy(f[train], y[train], f[spk == val], y[spk == val])
                  for n, f in feats.items()}
        best = max(choices, key=lambda n: (scores[n], -n))
        f = feats[best]
        results.append(accuracy(f[train], y[train], f[spk == test], y[spk == test]))
        print(f"| {test} | {val} | {best} ({scores[best]:.1%}) | {results[-1]:.1%} |")
    print(f"mean {np.mean(results):.1%} ± {np.std(results):.1%} (population std), "
          f"worst {min(results):.1%}")


if __name__ == "__main__":
    main()
