"""PSLA's reference training, step for step in PyTorch, on psla_tf's prepared shards.

The instrument of the learning comparison (docs/learning.md): the
authors' model (efficientnet_pytorch ``EfficientNet.from_name(in_channels=1)`` + their
``MHeadAttention`` / ``Attention`` / mean pooling behind ``AvgPool2d((4, 1))``), their
``AudiosetDataset`` (per-clip mixup against a partner drawn with ``random.randint``,
λ ~ Beta(α, α), ``torchaudio.compliance.kaldi.fbank``, zero-pad/cut, torchaudio
``FrequencyMasking`` / ``TimeMasking``, normalisation), ``WeightedRandomSampler`` over
``gen_weight``'s weights, and ``traintest.py``'s loop (clamped BCE, Adam(0.95, 0.999,
weight_decay 5e-7), warm-up every ``warmup_every`` steps, ``MultiStepLR`` stepped per epoch,
evaluation every epoch). At the end: the checkpoint ensemble (mean of every epoch's eval
scores) and the weight average of epochs ``wa_start..wa_end`` (state dicts, BN statistics
included, equal weights), written to ``exp_dir/summary.json`` with psla_tf's keys.

It reads the same flagfile as ``main.py`` (unknown flags are ignored) and the same TFRecord
shards, without TensorFlow (a 40-line TFRecord / tf.train.Example reader below), so it runs
in the benchmark venv (requirements-bench.txt: torch, torchaudio, efficientnet_pytorch):

    python benchmarks/torch_reference_train.py --flagfile=configs/fsddmix.flags \\
        --train_data='data/fsddmix/shards/train-*.tfrecord' \\
        --eval_data='data/fsddmix/shards/eval-*.tfrecord' --exp_dir=exp/torch_s0 --seed=0

``--save_init=PATH`` writes the initial state dict (before any update), for starting psla_tf
from the same weights (tools/import_psla_checkpoint.py, then ``main.py --init_from``).
``--zero_init_residual`` (off: the reference's start) gives the reference's model psla_tf's
default start, every residual block as the identity, to separate the start from the rest.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import struct
import sys
import time

import numpy as np

from psla_tf import metrics  # NumPy / SciPy / sklearn only: no TensorFlow in the bench venv

EFFNET_CHANNELS = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)
DEFAULTS = {"n_epochs": 30, "batch_size": 100, "eval_batch_size": 100, "lr": 1e-4,
            "warmup_steps": 1000, "warmup_every": 50, "lrscheduler_start": 10,
            "lrscheduler_step": 5, "lrscheduler_decay": 0.5, "wa": True, "wa_start": 16,
            "wa_end": 30, "balanced_sampling": True, "mixup": 0.5, "mixup_alpha": 10.0,
            "freqm": 48, "timem": 192, "target_length": 1056, "eff_b": 2, "att_head": 4,
            "dataset_mean": None, "dataset_std": None, "seed": 0, "train_data": None,
            "eval_data": None, "exp_dir": None,
            # not the reference's: off unless asked for (psla_tf's --zero_init_residual)
            "zero_init_residual": False}


# ----------------------------------------------------------------------------- flags
def parse_flags(argv: list[str]) -> dict:
    """main.py's flag syntax (``--name=value``, ``--name`` / ``--noname`` for booleans,
    ``--flagfile=F``); the last value wins; flags this trainer does not use are ignored."""
    out = dict(DEFAULTS)
    args = list(argv)
    while args:
        a = args.pop(0).strip()
        if not a.startswith("--"):
            continue
        name, eq, value = a[2:].partition("=")
        if name == "flagfile":
            with open(value, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            args = lines + args
            continue
        if not eq:
            key, value = (name[2:], False) if name.startswith("no") and name[2:] in out else (
                name, True)
            if key in out:
                out[key] = value
            continue
        if name in out:
            default = DEFAULTS[name]
            if isinstance(default, bool):
                out[name] = value.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                out[name] = int(value)
            elif isinstance(default, float) or name in ("dataset_mean", "dataset_std"):
                out[name] = float(value)
            else:
                out[name] = value
    return out


# ----------------------------------------------------------------------------- data
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (varint / length-delimited)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def parse_example(raw: bytes) -> dict[str, list]:
    """tf.train.Example → {name: [bytes...] or [int...]} (bytes_list and int64_list)."""
    out: dict[str, list] = {}
    for num, _, features in _fields(raw):
        if num != 1:
            continue
        for _, _, entry in _fields(features):
            key, feature = None, b""
            for n, _, v in _fields(entry):
                if n == 1:
                    key = v.decode("utf-8")
                elif n == 2:
                    feature = v
            values: list = []
            for kind, _, lst in _fields(feature):
                for n, wire, v in _fields(lst):
                    if kind == 1:
                        values.append(v)
                    elif kind == 3 and wire == 2:            # packed int64
                        j = 0
                        while j < len(v):
                            x, j = _varint(v, j)
                            values.append(x - (1 << 64) if x >= 1 << 63 else x)
                    elif kind == 3:
                        values.append(v - (1 << 64) if v >= 1 << 63 else v)
            out[key] = values
    return out


def read_shards(pattern: str) -> tuple[list[dict], list[str]]:
    """Every clip of the shards matching ``pattern`` (float32 waveform, label indices) and
    the vocabulary (mids) from the manifest beside them."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: no shards match {pattern}")
    clips = []
    for path in files:
        with open(path, "rb") as f:
            while True:
                head = f.read(12)
                if len(head) < 12:
                    break
                (n,) = struct.unpack("<Q", head[:8])
                raw = f.read(n)
                f.read(4)
                ex = parse_example(raw)
                pcm = np.frombuffer(ex["waveform"][0], "<i2")[:ex["num_samples"][0]]
                clips.append({"id": ex["id"][0].decode("utf-8"),
                              "waveform": pcm.astype(np.float32) / 32768.0,
                              "labels": list(ex["labels"])})
    prefix = files[0].rsplit("-", 3)[0] if "-of-" in files[0] else files[0]
    manifest = prefix + ".manifest.json"
    with open(manifest, encoding="utf-8") as f:
        m = json.load(f)
    return clips, m


def sample_weights(clips: list[dict], num_classes: int) -> np.ndarray:
    """The reference's gen_weight: Σ over a clip's labels of 1000 / (c_k + 0.01)."""
    counts = np.zeros(num_classes)
    for c in clips:
        counts[c["labels"]] += 1
    w = 1000.0 / (counts + 0.01)
    return np.array([w[c["labels"]].sum() for c in clips])


class ReferenceDataset:
    """The reference's AudiosetDataset.__getitem__, on in-memory waveforms."""

    def __init__(self, clips, num_classes, cfg, train: bool, mean: float, std: float):
        self.clips, self.num_classes, self.cfg, self.train = clips, num_classes, cfg, train
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.clips)

    def _fbank(self, w1, w2=None, lam=None):
        import torch
        import torchaudio
        w1 = torch.from_numpy(w1)[None]
        w1 = w1 - w1.mean()
        if w2 is not None:
            w2 = torch.from_numpy(w2)[None]
            w2 = w2 - w2.mean()
            if w1.shape[1] != w2.shape[1]:
                if w1.shape[1] > w2.shape[1]:
                    pad = torch.zeros(1, w1.shape[1])
                    pad[0, :w2.shape[1]] = w2
                    w2 = pad
                else:
                    w2 = w2[:, :w1.shape[1]]
            mixed = lam * w1 + (1 - lam) * w2
            w1 = mixed - mixed.mean()
        fbank = torchaudio.compliance.kaldi.fbank(
            w1, htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
        p = self.cfg["target_length"] - fbank.shape[0]
        if p > 0:
            fbank = torch.nn.ZeroPad2d((0, 0, 0, p))(fbank)
        elif p < 0:
            fbank = fbank[:self.cfg["target_length"]]
        return fbank

    def __getitem__(self, index):
        import torch
        import torchaudio
        datum = self.clips[index]
        label = np.zeros(self.num_classes, np.float32)
        if self.train and random.random() < self.cfg["mixup"]:
            partner = self.clips[random.randint(0, len(self.clips) - 1)]
            lam = np.random.beta(self.cfg["mixup_alpha"], self.cfg["mixup_alpha"])
            fbank = self._fbank(datum["waveform"], partner["waveform"], lam)
            label[datum["labels"]] += lam
            label[partner["labels"]] += 1.0 - lam
        else:
            fbank = self._fbank(datum["waveform"])
            label[datum["labels"]] = 1.0
        if self.train:
            fbank = fbank.T[None]                        # [1, mel, T]
            if self.cfg["freqm"]:
                fbank = torchaudio.transforms.FrequencyMasking(self.cfg["freqm"])(fbank)
            if self.cfg["timem"]:
                fbank = torchaudio.transforms.TimeMasking(self.cfg["timem"])(fbank)
            fbank = fbank[0].T
        fbank = (fbank - self.mean) / self.std
        return fbank, torch.from_numpy(label)


# ----------------------------------------------------------------------------- model
def zero_init_residual(model) -> int:
    """psla_tf's ``--zero_init_residual`` on the reference's model: γ = 0 in ``_bn2`` (the
    projection BatchNorm) of every block whose output efficientnet_pytorch adds to its input
    (its own condition in ``MBConvBlock.forward``). Returns the number of blocks."""
    import torch
    count = 0
    for block in model.effnet._blocks:
        a = block._block_args
        if block.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
            torch.nn.init.zeros_(block._bn2.weight)
            count += 1
    return count


def build_model(num_classes: int, eff_b: int, att_head: int):
    """The reference's EffNetAttention (from scratch): efficientnet_pytorch features →
    AvgPool2d((4, 1)) → mean / single-head / multi-head attention."""
    import torch
    from torch import nn
    from efficientnet_pytorch import EfficientNet

    def init_layer(layer):
        nn.init.kaiming_uniform_(layer.weight)   # the reference's init_layer (He uniform)
        if layer.bias is not None:
            layer.bias.data.fill_(0.0)

    class MHeadAttention(nn.Module):
        def __init__(self, n_in, n_out, heads):
            super().__init__()
            self.heads = heads
            self.head_weight = nn.Parameter(torch.tensor([1.0 / heads] * heads))
            self.att = nn.ModuleList([nn.Conv2d(n_in, n_out, 1) for _ in range(heads)])
            self.cla = nn.ModuleList([nn.Conv2d(n_in, n_out, 1) for _ in range(heads)])
            if heads == 1:
                init_layer(self.att[0])
                init_layer(self.cla[0])

        def forward(self, x):                    # x [B, D, T, 1]
            out = []
            for i in range(self.heads):
                att = torch.sigmoid(self.att[i](x))[:, :, :, 0]
                cla = torch.sigmoid(self.cla[i](x))[:, :, :, 0]
                att = torch.clamp(att, 1e-7, 1.0 - 1e-7)
                norm_att = att / torch.sum(att, dim=2)[:, :, None]
                y = torch.sum(norm_att * cla, dim=2)
                out.append(y * self.head_weight[i] if self.heads > 1 else y)
            return torch.stack(out, dim=0).sum(dim=0)

    class MeanPooling(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.cla = nn.Conv2d(n_in, n_out, 1)
            init_layer(self.cla)

        def forward(self, x):
            return torch.mean(torch.sigmoid(self.cla(x))[:, :, :, 0], dim=2)

    class EffNetAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.effnet = EfficientNet.from_name(f"efficientnet-b{eff_b}", in_channels=1)
            self.effnet._fc = nn.Identity()
            dim = EFFNET_CHANNELS[eff_b]
            self.attention = (MeanPooling(dim, num_classes) if att_head == 0
                              else MHeadAttention(dim, num_classes, att_head))
            self.avgpool = nn.AvgPool2d((4, 1))

        def forward(self, x):                    # x [B, T, mel]
            x = x.unsqueeze(1).transpose(2, 3)   # [B, 1, mel, T]
            x = self.effnet.extract_features(x)
            x = self.avgpool(x)
            return self.attention(x.transpose(2, 3))

    return EffNetAttention()


# ----------------------------------------------------------------------------- loop
def evaluate(model, loader) -> np.ndarray:
    import torch
    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in loader:
            out.append(model(x).numpy())
    return np.concatenate(out)


def scalars(targets: np.ndarray, scores: np.ndarray) -> dict:
    r = metrics.scalar_metrics(metrics.evaluate(targets, scores))
    return {k: float(r[k]) for k in ("mAP", "AUC", "d_prime") if k in r}


def main(argv: list[str]) -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers")
    ap.add_argument("--save_init", default=None, help="write the initial state dict here")
    own, rest = ap.parse_known_args(argv)
    cfg = parse_flags(rest)
    for key in ("train_data", "eval_data", "exp_dir"):
        if not cfg[key]:
            raise SystemExit(f"error: --{key} is required")
    seed = cfg["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(own.threads)
    train, manifest = read_shards(cfg["train_data"])
    ev, _ = read_shards(cfg["eval_data"])
    num_classes = len(manifest["mids"])
    mean = cfg["dataset_mean"] if cfg["dataset_mean"] is not None else manifest.get(
        "fbank_mean", -4.6476)
    std = cfg["dataset_std"] if cfg["dataset_std"] is not None else manifest.get(
        "fbank_std", 4.5699)
    os.makedirs(os.path.join(cfg["exp_dir"], "models"), exist_ok=True)
    model = build_model(num_classes, cfg["eff_b"], cfg["att_head"])
    if cfg["zero_init_residual"]:
        print(f"zero_init_residual: {zero_init_residual(model)} residual blocks start as the "
              "identity", flush=True)
    if own.save_init:
        torch.save(model.state_dict(), own.save_init)

    def worker_init(i):
        s = (seed * 1000 + i + 1000003 * torch.initial_seed()) % 2 ** 32
        random.seed(s)
        np.random.seed(s % 2 ** 32)

    train_set = ReferenceDataset(train, num_classes, cfg, True, mean, std)
    if cfg["balanced_sampling"]:
        w = sample_weights(train, num_classes)
        sampler = torch.utils.data.WeightedRandomSampler(w, len(w), replacement=True)
        loader = torch.utils.data.DataLoader(train_set, cfg["batch_size"], sampler=sampler,
                                             num_workers=own.workers, drop_last=True,
                                             persistent_workers=own.workers > 0,
                                             worker_init_fn=worker_init)
    else:
        loader = torch.utils.data.DataLoader(train_set, cfg["batch_size"], shuffle=True,
                                             num_workers=own.workers, drop_last=True,
                                             persistent_workers=own.workers > 0,
                                             worker_init_fn=worker_init)
    eval_loader = torch.utils.data.DataLoader(
        ReferenceDataset(ev, num_classes, cfg, False, mean, std), cfg["eval_batch_size"],
        shuffle=False, num_workers=0)
    targets = np.zeros((len(ev), num_classes), np.float32)
    for i, c in enumerate(ev):
        targets[i, c["labels"]] = 1.0

    trainables = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainables, cfg["lr"], weight_decay=5e-7, betas=(0.95, 0.999))
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, list(range(cfg["lrscheduler_start"], 1000, cfg["lrscheduler_step"])),
        gamma=cfg["lrscheduler_decay"])
    loss_fn = torch.nn.BCELoss()
    history, ens_sum, wa_states, step = [], None, [], 0
    t0 = time.time()
    for epoch in range(1, cfg["n_epochs"] + 1):
        model.train()
        losses = []
        for x, y in loader:
            if cfg["warmup_steps"] and step <= cfg["warmup_steps"] and \
                    step % cfg["warmup_every"] == 0:
                for g in opt.param_groups:
                    g["lr"] = step / cfg["warmup_steps"] * cfg["lr"]
            out = torch.clamp(model(x), 1e-7, 1.0 - 1e-7)
            loss = loss_fn(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
        scores = evaluate(model, eval_loader)
        ens_sum = scores if ens_sum is None else ens_sum + scores
        row = {"epoch": epoch, **scalars(targets, scores),
               "train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0,
               "ensemble_mAP": scalars(targets, ens_sum / epoch)["mAP"]}
        history.append(row)
        print(json.dumps(row), flush=True)
        if cfg["wa"] and cfg["wa_start"] <= epoch <= cfg["wa_end"]:
            wa_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        sched.step()
    seconds = time.time() - t0
    summary = {"implementation": "pytorch-reference", "seconds": seconds,
               "epochs": cfg["n_epochs"], "per_epoch": history,
               "train_examples": len(train), "eval_examples": len(ev)}
    last = history[-5:]
    summary["single"] = {k: float(np.mean([h[k] for h in last]))
                         for k in ("mAP", "AUC", "d_prime")} | {
                             "epochs": [h["epoch"] for h in last]}
    summary["ensemble"] = scalars(targets, ens_sum / cfg["n_epochs"]) | {
        "epochs": list(range(1, cfg["n_epochs"] + 1))}
    if wa_states:
        avg = {}
        for k, v in wa_states[0].items():
            if v.is_floating_point():
                avg[k] = sum(s[k] for s in wa_states) / len(wa_states)
            else:
                avg[k] = wa_states[-1][k]
        model.load_state_dict(avg)
        summary["weight_averaging"] = scalars(targets, evaluate(model, eval_loader)) | {
            "epochs": list(range(cfg["wa_start"], cfg["wa_start"] + len(wa_states)))}
        torch.save(avg, os.path.join(cfg["exp_dir"], "models", "wa_model.pth"))
    else:
        summary["weight_averaging"] = None
    with open(os.path.join(cfg["exp_dir"], "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    for row in ("single", "weight_averaging", "ensemble"):
        if summary[row]:
            print(f"{row:20s} mAP {summary[row]['mAP']:.4f}")
    print(f"wall {seconds:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
