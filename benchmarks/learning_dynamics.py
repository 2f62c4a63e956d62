"""Training dynamics, separated from initialisation: the reference model (efficientnet_pytorch
+ the reference's attention heads, PyTorch) and psla_tf's classifier start from the *same*
weights (the checkpoint importer maps every tensor) and take the same Adam steps on the same
fixed batches (real normalised fbank of the given shards; no mixup, masking or drop-connect,
so nothing random is left). If the implementations train alike, their loss curves agree.

Variants (rows): ``pytorch`` (the reference), ``psla_tf/ref-pad`` (imported weights, the
reference's static padding: the same function as the reference), ``psla_tf`` (imported
weights, Keras' "same" padding: the model psla_tf trains), and psla_tf from its own random
draws with ``--backbone_init=pytorch`` / ``keras`` (residual blocks as the reference starts
them, ``--nozero_init_residual``: the rows compare initialisations of the same function).

    python benchmarks/learning_dynamics.py --data='data/fsddmix/shards/train-*.tfrecord' \\
        --steps=40 --batch_size=32 --target_length=300

Needs torch + efficientnet_pytorch (requirements-import.txt) beside TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fixed_batches(pattern: str, steps: int, batch: int, target_length: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``[steps, batch, T, 128]`` normalised fbank and ``[steps, batch, C]`` labels."""
    import tensorflow as tf
    from psla_tf import features
    from psla_tf.data import records
    spec = records.load_data_spec(pattern)
    clips = list(records.iter_examples(spec.files, spec.compression))
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(clips), steps * batch, replace=len(clips) < steps * batch)
    mean = spec.manifests[0].fbank_mean or -4.6476
    std = spec.manifests[0].fbank_std or 4.5699
    num_classes = spec.num_classes
    x = np.zeros((steps * batch, target_length, 128), np.float32)
    y = np.zeros((steps * batch, num_classes), np.float32)
    for n, i in enumerate(idx):
        w = clips[i]["waveform_int16"][:clips[i]["num_samples"]].astype(np.float32) / 32768
        w = w - w.mean()
        fb = features.kaldi_fbank(tf.constant(w)).numpy()[:target_length]
        x[n, :len(fb)] = fb
        x[n] = (x[n] - mean) / std
        y[n, clips[i]["labels"]] = 1.0
    return (x.reshape(steps, batch, target_length, 128),
            y.reshape(steps, batch, num_classes))


def train_torch(model, x, y, lr: float) -> list[float]:
    import torch
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr,
                           weight_decay=5e-7, betas=(0.95, 0.999))
    loss_fn = torch.nn.BCELoss()
    losses = []
    for xb, yb in zip(x, y):
        out = torch.clamp(model(torch.from_numpy(xb)), 1e-7, 1 - 1e-7)
        loss = loss_fn(out, torch.from_numpy(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return losses


def train_keras(model, x, y, lr: float) -> list[float]:
    import keras
    from psla_tf.training import optim
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0                       # no drop-connect: nothing random left
    model.compile(optimizer=optim.TorchAdam(lr), loss=optim.psla_bce)
    return [float(model.train_on_batch(xb, yb)) for xb, yb in zip(x, y)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="shards (train set)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--target_length", type=int, default=300)
    ap.add_argument("--eff_b", type=int, default=0)
    ap.add_argument("--att_head", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="pytorch,psla_tf/ref-pad,psla_tf,init=pytorch,"
                    "init=keras")
    ap.add_argument("--out", default=None, help="write the curves as JSON here")
    a = ap.parse_args()
    import keras
    import torch
    from psla_tf.models import torch_import
    from psla_tf.models.tagger import build_classifier
    import torch_reference_train as ref

    x, y = fixed_batches(a.data, a.steps, a.batch_size, a.target_length, a.seed)
    num_classes = y.shape[-1]
    torch.manual_seed(a.seed)
    torch.set_num_threads(os.cpu_count())
    reference = ref.build_model(num_classes, a.eff_b, a.att_head)
    reference.effnet._global_params = reference.effnet._global_params._replace(
        drop_connect_rate=None)
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    curves: dict[str, list[float]] = {}
    for variant in a.variants.split(","):
        t0 = time.time()
        keras.utils.set_random_seed(a.seed)
        if variant == "pytorch":
            curves[variant] = train_torch(reference, x, y, a.lr)
        else:
            init = variant.split("=", 1)[1] if variant.startswith("init=") else "pytorch"
            clf = build_classifier(num_classes, eff_b=a.eff_b, att_head=a.att_head,
                                   target_length=a.target_length, backbone_init=init,
                                   zero_init_residual=False)
            if variant == "psla_tf/ref-pad":
                clf = torch_import.with_reference_padding(clf, a.eff_b)
            if not variant.startswith("init="):
                torch_import.load_state_dict(clf, state, "the reference's initial weights")
            curves[variant] = train_keras(clf, x, y, a.lr)
        print(f"{variant}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    marks = [s for s in (1, 2, 5, 10, 20, 40, 80, 160) if s <= a.steps]
    print("| variant | " + " | ".join(f"step {s}" for s in marks) + " | mean of last 10 |")
    print("|---" * (len(marks) + 2) + "|")
    for name, c in curves.items():
        print(f"| {name} | " + " | ".join(f"{c[s - 1]:.4f}" for s in marks)
              + f" | {np.mean(c[-10:]):.4f} |")
    if "pytorch" in curves:
        for name, c in curves.items():
            if name != "pytorch":
                d = np.abs(np.array(c) - np.array(curves["pytorch"]))
                print(f"{name} vs pytorch: max |d loss| {d.max():.2e} "
                      f"(first 10 steps {d[:10].max():.2e})")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "curves": curves}, f, indent=1)


if __name__ == "__main__":
    main()
