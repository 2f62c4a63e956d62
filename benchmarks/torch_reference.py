"""The PyTorch baseline of the benchmark: PSLA's training input pipeline in the reference's
style (src/dataloader.py of the authors' code), run on the same 10-s clips as psla_tf.

Per clip, in DataLoader worker processes: read the wav (soundfile, as torchaudio's soundfile
backend does), remove the mean, with probability 0.5 mix with a uniformly drawn partner
(λ ~ Beta(10, 10), mean removed again), ``torchaudio.compliance.kaldi.fbank`` with PSLA's
arguments, zero-pad/cut to 1056 frames, FrequencyMasking(48) and TimeMasking(192), normalise;
labels with +λ / +(1-λ). Sampling: ``WeightedRandomSampler`` over PSLA's balanced weights,
batch 100, ``num_workers`` = cores.

Needs torch + torchaudio (requirements-bench.txt); it is run by benchmarks/run.py with the
interpreter given by ``--torch_python`` (a separate environment), or by hand:

    TORCH_PY benchmarks/torch_reference.py --wav_dir=DIR --workers=2 --batches=6 --repeats=3

and prints one JSON object: clips/s per repeat and the median.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

NORM_MEAN, NORM_STD = -4.6476, 4.5699
TARGET_LENGTH, NUM_MEL_BINS, FREQM, TIMEM, MIXUP = 1056, 128, 48, 192, 0.5


class ReferenceStyleDataset(Dataset):
    """PSLA's AudiosetDataset, reduced to what the timing needs (same per-clip work)."""

    def __init__(self, files: list[str], labels: list[list[int]], num_classes: int):
        self.files, self.labels, self.num_classes = files, labels, num_classes

    def _load(self, path: str) -> torch.Tensor:
        x, _ = sf.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(x.T.copy())

    def _wav2fbank(self, f1: str, f2: str | None):
        w1 = self._load(f1)
        w1 = w1 - w1.mean()
        lam = 1.0
        if f2 is not None:
            w2 = self._load(f2)
            w2 = w2 - w2.mean()
            if w1.shape[1] != w2.shape[1]:
                if w1.shape[1] > w2.shape[1]:
                    w2 = torch.nn.functional.pad(w2, (0, w1.shape[1] - w2.shape[1]))
                else:
                    w2 = w2[:, :w1.shape[1]]
            lam = float(np.random.beta(10, 10))
            w1 = lam * w1 + (1 - lam) * w2
            w1 = w1 - w1.mean()
        fb = torchaudio.compliance.kaldi.fbank(
            w1, htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=10)
        p = TARGET_LENGTH - fb.shape[0]
        fb = torch.nn.ZeroPad2d((0, 0, 0, p))(fb) if p > 0 else fb[:TARGET_LENGTH]
        return fb, lam

    def __getitem__(self, index: int):
        y = np.zeros(self.num_classes, np.float32)
        if random.random() < MIXUP:
            j = random.randint(0, len(self.files) - 1)
            fb, lam = self._wav2fbank(self.files[index], self.files[j])
            y[self.labels[index]] += lam
            y[self.labels[j]] += 1 - lam
        else:
            fb, _ = self._wav2fbank(self.files[index], None)
            y[self.labels[index]] = 1
        fb = torch.transpose(fb, 0, 1).unsqueeze(0)
        fb = torchaudio.transforms.FrequencyMasking(FREQM)(fb)
        fb = torchaudio.transforms.TimeMasking(TIMEM)(fb)
        fb = torch.transpose(fb.squeeze(0), 0, 1)
        fb = (fb - NORM_MEAN) / NORM_STD
        return fb, torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.files)


def balanced_weights(labels: list[list[int]], num_classes: int) -> np.ndarray:
    """PSLA's gen_weight_csv: w_i = Σ_k 1000 / (c_k + 0.01)."""
    counts = np.zeros(num_classes)
    for row in labels:
        counts[row] += 1
    return np.array([sum(1000.0 / (counts[k] + 0.01) for k in row) for row in labels])


def run(wav_dir: str, workers: int, batches: int, batch_size: int, repeats: int) -> dict:
    with open(os.path.join(wav_dir, "listing.json")) as f:
        listing = json.load(f)
    files = [os.path.join(wav_dir, e["wav"]) for e in listing["data"]]
    labels = [e["labels"] for e in listing["data"]]
    ds = ReferenceStyleDataset(files, labels, listing["num_classes"])
    w = balanced_weights(labels, listing["num_classes"])
    rates = []
    for r in range(repeats):
        sampler = WeightedRandomSampler(torch.from_numpy(w), len(w), replacement=True)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            pin_memory=False, drop_last=True, persistent_workers=False)
        it = iter(loader)
        next(it)  # warm-up: workers started, first batch excluded
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            x, _ = next(it)
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
        del it, loader
    return {"workers": workers, "batch_size": batch_size, "batches": batches,
            "clips_per_s": rates, "median_clips_per_s": statistics.median(rates),
            "torch": torch.__version__, "torchaudio": torchaudio.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wav_dir", required=True, help="folder with listing.json + wavs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(a.wav_dir, a.workers, a.batches, a.batch_size, a.repeats)))


if __name__ == "__main__":
    main()
