"""The PyTorch input pipeline in PSLA's reference style, timed (issue 8, baseline).

What the reference's ``dataloader.AudiosetDataset`` + ``run.py`` do, per clip in DataLoader
worker processes: read the wav (``torchaudio.load``), mixup with probability 0.5 against a
uniformly drawn partner (both mean-removed, partner padded/cut, λ ~ Beta(10, 10), mean removed
again), ``torchaudio.compliance.kaldi.fbank`` (PSLA's arguments), zero-pad/cut to 1056
frames, ``torchaudio.transforms.FrequencyMasking(48)`` and ``TimeMasking(192)``, normalise;
a ``WeightedRandomSampler`` over the weights of the reference's ``gen_weight`` (1000 / (c_k +
0.01) summed over each clip's labels, N draws with replacement), batch 100,
``num_workers`` = cores. Workers are kept between epochs (``persistent_workers``), which
only helps the baseline.

``--train_step`` times the reference's training step instead: the model of
``torch_reference_train.py`` (efficientnet_pytorch ``from_name(in_channels=1)`` + the
reference's attention heads), clamped BCE, Adam(0.95, 0.999, weight_decay 5e-7), on one
in-memory fbank batch ``[batch_size, frames, 128]`` (the reference computes fbank in its
DataLoader, so the step starts from fbank), ``--cores`` threads.

No TensorFlow import: runs wherever torch + torchaudio are installed
(``requirements-bench.txt``). Prints ``RESULT {json}`` last.

    python benchmarks/torch_reference.py --datafile=DATA.json --workers=2 --cores=2
    python benchmarks/torch_reference.py --synthetic=300 --workers=2   # self-made clips
    python benchmarks/torch_reference.py --train_step --eff_b=2 --heads=4 --frames=1056 \
        --batch_size=8 --cores=2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

TARGET_LENGTH, FREQM, TIMEM = 1056, 48, 192
NORM_MEAN, NORM_STD = -4.6476, 4.5699


def read_wav(path: str):
    """(waveform [1, n] float32 tensor, sample rate): torchaudio.load as the reference, or
    soundfile / scipy where this torchaudio has no decoding backend."""
    import torch
    if READER == "torchaudio":
        import torchaudio
        return torchaudio.load(path)
    if READER == "soundfile":
        import soundfile as sf
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(x.T)), sr
    from scipy.io import wavfile
    sr, x = wavfile.read(path)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
    return torch.from_numpy(x.reshape(1, -1) if x.ndim == 1 else np.ascontiguousarray(x.T)), sr


READER = "torchaudio"


def pick_reader(path: str) -> str:
    global READER
    for name in ("torchaudio", "soundfile", "scipy"):
        READER = name
        try:
            read_wav(path)
            return name
        except Exception:  # noqa: BLE001 - e.g. torchaudio without torchcodec / sox
            continue
    raise SystemExit(f"error: cannot read {path} with torchaudio, soundfile or scipy")


class ReferenceDataset:
    """PSLA's AudiosetDataset.__getitem__, step for step."""

    def __init__(self, data: list[dict], index: dict[str, int], mixup: float = 0.5):
        self.data, self.index, self.mixup = data, index, mixup

    def __len__(self):
        return len(self.data)

    def _wav2fbank(self, filename, filename2=None):
        import torch
        import torchaudio
        if filename2 is None:
            waveform, sr = read_wav(filename)
            waveform = waveform - waveform.mean()
            mix_lambda = 0.0
        else:
            waveform1, sr = read_wav(filename)
            waveform2, _ = read_wav(filename2)
            waveform1 = waveform1 - waveform1.mean()
            waveform2 = waveform2 - waveform2.mean()
            if waveform1.shape[1] != waveform2.shape[1]:
                if waveform1.shape[1] > waveform2.shape[1]:
                    temp = torch.zeros(1, waveform1.shape[1])
                    temp[0, 0:waveform2.shape[1]] = waveform2
                    waveform2 = temp
                else:
                    waveform2 = waveform2[:, 0:waveform1.shape[1]]
            mix_lambda = np.random.beta(10, 10)
            waveform = mix_lambda * waveform1 + (1 - mix_lambda) * waveform2
            waveform = waveform - waveform.mean()
        fbank = torchaudio.compliance.kaldi.fbank(
            waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        p = TARGET_LENGTH - fbank.shape[0]
        if p > 0:
            fbank = torch.nn.ZeroPad2d((0, 0, 0, p))(fbank)
        elif p < 0:
            fbank = fbank[0:TARGET_LENGTH, :]
        return fbank, mix_lambda

    def __getitem__(self, i):
        import torch
        import torchaudio
        datum = self.data[i]
        labels = np.zeros(len(self.index))
        if random.random() < self.mixup:
            mix_datum = self.data[random.randint(0, len(self.data) - 1)]
            fbank, lam = self._wav2fbank(datum["wav"], mix_datum["wav"])
            for m in datum["labels"].split(","):
                labels[self.index[m]] += lam
            for m in mix_datum["labels"].split(","):
                labels[self.index[m]] += 1.0 - lam
        else:
            fbank, _ = self._wav2fbank(datum["wav"])
            for m in datum["labels"].split(","):
                labels[self.index[m]] = 1.0
        freqm = torchaudio.transforms.FrequencyMasking(FREQM)
        timem = torchaudio.transforms.TimeMasking(TIMEM)
        fbank = torch.transpose(fbank, 0, 1).unsqueeze(0)
        fbank = timem(freqm(fbank))
        fbank = torch.transpose(fbank.squeeze(0), 0, 1)
        fbank = (fbank - NORM_MEAN) / NORM_STD
        return fbank, torch.FloatTensor(labels)


def sample_weights(data: list[dict], index: dict[str, int]) -> np.ndarray:
    """The reference's gen_weight: 1000 / (c_k + 0.01) summed over each clip's labels."""
    counts = np.zeros(len(index))
    for d in data:
        for m in d["labels"].split(","):
            counts[index[m]] += 1
    w_class = 1000.0 / (counts + 0.01)
    return np.array([sum(w_class[index[m]] for m in d["labels"].split(",")) for d in data])


def synthetic(n: int, folder: str) -> str:
    """``n`` 10-s 16-kHz PCM-16 wav clips with 1-3 of 20 labels and their datafile."""
    from scipy.io import wavfile
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        path = os.path.join(folder, f"clip{i:05d}.wav")
        x = np.clip(0.1 * rng.standard_normal(160000), -1, 1)
        wavfile.write(path, 16000, (x * 32767).astype(np.int16))
        labs = sorted({f"/m/c{k}" for k in rng.integers(0, 20, int(rng.integers(1, 4)))})
        entries.append({"wav": path, "labels": ",".join(labs)})
    datafile = os.path.join(folder, "data.json")
    with open(datafile, "w") as f:
        json.dump({"data": entries}, f)
    return datafile


def train_step(args) -> dict:
    """Clips/s of the reference's training step on one in-memory batch (median of
    ``repeats`` runs of ``batches_per_repeat`` steps after ``warmup_batches`` steps)."""
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location(
        "torch_reference_train",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference_train.py"))
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    build_model = trainer.build_model
    torch.manual_seed(0)
    classes = 527
    model = build_model(classes, args.eff_b, args.heads)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-4, weight_decay=5e-7, betas=(0.95, 0.999))
    loss_fn = torch.nn.BCELoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.frames, 128, generator=gen)
    y = (torch.rand(args.batch_size, classes, generator=gen) < 0.01).float()

    def step():
        out = torch.clamp(model(x), 1e-7, 1.0 - 1e-7)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    for _ in range(args.warmup_batches - 1):
        step()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.batches_per_repeat):
            step()
        times.append(time.perf_counter() - t)
    cps = args.batches_per_repeat * args.batch_size / statistics.median(times)
    return {"clips_per_s": cps, "first_step_s": first, "torch": torch.__version__,
            "note": f"EfficientNet-B{args.eff_b} + {args.heads} heads, batch "
                    f"{args.batch_size}, {args.frames} frames, {torch.get_num_threads()} "
                    "threads, from fbank"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datafile", help="PSLA datafile JSON {'data': [{'wav', 'labels'}]}")
    ap.add_argument("--synthetic", type=int, default=0, help="make this many clips instead")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--cores", type=int, default=0, help="pin to the first N CPUs (0: all)")
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    ap.add_argument("--batches_per_repeat", type=int, default=3)
    ap.add_argument("--warmup_batches", type=int, default=2)
    ap.add_argument("--train_step", action="store_true",
                    help="time the reference's training step instead of the pipeline")
    ap.add_argument("--eff_b", type=int, default=2, help="--train_step: EfficientNet-B*")
    ap.add_argument("--heads", type=int, default=4, help="--train_step: attention heads")
    ap.add_argument("--frames", type=int, default=TARGET_LENGTH, help="--train_step: frames")
    args = ap.parse_args()
    try:
        import torch
        from torch.utils.data import DataLoader, WeightedRandomSampler
        if args.train_step:
            import efficientnet_pytorch  # noqa: F401
        else:
            import torchaudio  # noqa: F401
    except ImportError as e:
        print(f"error: {e} (pip install -r requirements-bench.txt)", file=sys.stderr)
        return 2
    if args.cores:
        allowed = sorted(os.sched_getaffinity(0))
        if args.cores > len(allowed):
            print(f"error: --cores={args.cores} but {len(allowed)} usable", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, allowed[:args.cores])
    torch.set_num_threads(max(1, args.cores or os.cpu_count() or 1))
    if args.train_step:
        if args.batch_size < 1 or args.frames < 32 or args.repeats < 1:
            print("error: --train_step needs --batch_size >= 1, --frames >= 32, --repeats >= 1",
                  file=sys.stderr)
            return 2
        print("RESULT " + json.dumps(train_step(args)), flush=True)
        return 0
    if args.synthetic:
        args.datafile = synthetic(args.synthetic, tempfile.mkdtemp(prefix="torch_ref_"))
    if not args.datafile:
        print("error: give --datafile or --synthetic", file=sys.stderr)
        return 2
    with open(args.datafile) as f:
        data = [d for d in json.load(f)["data"] if d.get("labels")]
    if len(data) < args.batch_size:
        print(f"error: {len(data)} labelled clips, fewer than one batch", file=sys.stderr)
        return 2
    mids = sorted({m for d in data for m in d["labels"].split(",")})
    index = {m: i for i, m in enumerate(mids)}
    reader = pick_reader(data[0]["wav"])
    weights = sample_weights(data, index)
    sampler = WeightedRandomSampler(torch.as_tensor(weights), len(weights), replacement=True)
    loader = DataLoader(ReferenceDataset(data, index), batch_size=args.batch_size,
                        sampler=sampler, num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)

    def batches():
        while True:
            yield from loader
    it = batches()
    for _ in range(args.warmup_batches):
        next(it)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.batches_per_repeat):
            fb, lab = next(it)
        times.append(time.perf_counter() - t)
    assert fb.shape == (args.batch_size, TARGET_LENGTH, 128), fb.shape
    cps = args.batches_per_repeat * args.batch_size / statistics.median(times)
    note = f"{args.workers} DataLoader worker(s), wav read with {reader}"
    print("RESULT " + json.dumps({"clips_per_s": cps, "runs": [
        args.batches_per_repeat * args.batch_size / t for t in times], "note": note,
        "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
