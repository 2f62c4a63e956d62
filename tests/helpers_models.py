"""A tiny trained-looking tagger on disk (for the after-training tools' tests)."""
from __future__ import annotations

import os

import numpy as np

TARGET_LENGTH = 64                                   # 0.65 s of audio at 16 kHz
CLIP_SAMPLES = (TARGET_LENGTH - 1) * 160 + 400       # 10480
# The tests' backbone where the assertion is about machinery, not EfficientNet: the
# quarter-width cnn (PANNs CNN10 layout) traces ~7x faster than EfficientNet-B0.
SMALL_MODEL = {"model": "cnn", "cnn_width": 0.25}
SMALL_MODEL_FLAGS = ["--model=cnn", "--cnn_width=0.25"]


def make_tagger(num_classes: int = 5, seed: int = 0, att_head: int = 2,
                model: str = "cnn", target_length: int = TARGET_LENGTH,
                single_label: bool = False):
    """A tagger on ``target_length`` frames with seeded random weights (BN statistics
    randomised too, so averaging them is visible): ``SMALL_MODEL`` (``model="cnn"``) or EfficientNet-B0."""
    import keras
    from psla_tf.models.tagger import build_tagger
    keras.utils.set_random_seed(seed)
    arch = SMALL_MODEL if model == "cnn" else {"model": model, "eff_b": 0}
    model = build_tagger(num_classes, **arch, att_head=att_head, target_length=target_length,
                         freqm=0, timem=0, pretrained="none", single_label=single_label)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif "moving_mean" in v.path:
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    return model


def save_tagger(model, folder: str, name: str = "model.keras") -> str:
    """Save ``model`` with a labels.csv beside it; returns the .keras path."""
    from psla_tf.data.records import write_label_csv
    os.makedirs(folder, exist_ok=True)
    c = int(model.outputs[0].shape[-1])
    write_label_csv(os.path.join(folder, "labels.csv"), [f"/m/c{k}" for k in range(c)],
                    [f"class {k}" for k in range(c)])
    path = os.path.join(folder, name)
    model.save(path)
    return path


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> str:
    import soundfile as sf
    sf.write(path, samples, sample_rate, subtype="PCM_16")
    return path


def assert_training_twins_step_alike(option: str) -> list:
    """Two EfficientNet-B0 taggers (3 classes, 32 frames), ``build_tagger`` option ``option``
    off and on, the same weights, drop-connect off: one SGD step on one batch moves every
    weight alike (float rounding). Returns the two models (off, on)."""
    import keras
    from psla_tf.models.tagger import build_tagger
    keras.utils.set_random_seed(0)
    models = [build_tagger(3, eff_b=0, att_head=2, target_length=32, seed=0, freqm=0, timem=0,
                           **{option: on}) for on in (False, True)]
    models[1].set_weights(models[0].get_weights())
    for m in models:   # drop-connect draws differ between the two models: off for the check
        for layer in m.get_layer("classifier").get_layer("backbone").layers:
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
    rng = np.random.default_rng(4)
    x = {"waveform": rng.uniform(-0.3, 0.3, (4, 32 * 160 + 240)).astype(np.float32),
         "num_samples": np.full((4,), 32 * 160 + 240, np.int32)}
    y = (rng.uniform(size=(4, 3)) < 0.5).astype(np.float32)
    for m in models:
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
        m.train_on_batch(x, y)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    return models
