"""The recipes say what they reproduce (issue 15.5).

* TrainConfig's defaults are configs/full.flags (the paper's full-AudioSet recipe, ImageNet
  initialisation), as the flag help says; the normalisation is the one exception: the default
  takes the train manifest's statistics, the recipe pins the reference's AudioSet constants;
* each paper recipe quotes the paper's number for exactly its setting: original labels
  0.3108 (balanced) / 0.4397, 0.4435 (full); label-enhanced 0.3192 (balanced_enhanced, whose
  training flags equal balanced.flags) and 0.5535 / 0.5571 / 0.5671 (FSD50K).
"""
from __future__ import annotations

import dataclasses
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(recipe: str, *extra: str):
    from absl import flags
    from psla_tf.training.flags import config_from_flags, define_flags
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["main.py", f"--flagfile={os.path.join(ROOT, 'configs', recipe + '.flags')}",
        "--train_data=t", "--eval_data=e", "--exp_dir=x", *extra])
    return config_from_flags(fv)


def test_defaults_are_the_full_audioset_recipe():
    from psla_tf.training.trainer import TrainConfig
    full = _cfg("full")
    default = dataclasses.replace(TrainConfig(), train_data="t", eval_data="e", exp_dir="x")
    differ = {f.name for f in dataclasses.fields(TrainConfig)
              if getattr(full, f.name) != getattr(default, f.name)}
    assert differ == {"dataset_mean", "dataset_std"}, differ
    assert default.pretrained == "imagenet" and default.sampling_order == "iid"


def test_every_config_field_is_a_flag_with_its_default():
    """main.py's flags and TrainConfig's fields are the same names with the same defaults
    (a field without a flag could not be set from the command line)."""
    from absl import flags

    from psla_tf.training import flags as train_flags
    from psla_tf.training.trainer import TrainConfig
    fv = flags.FlagValues()
    train_flags.define_flags(fv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(fv), (fields ^ set(fv))
    default = TrainConfig()
    assert {n: fv[n].default for n in fields} == {n: getattr(default, n) for n in fields}


def _comment(recipe: str) -> str:
    with open(os.path.join(ROOT, "configs", recipe + ".flags")) as f:
        return " ".join(line[1:].strip() for line in f if line.startswith("#"))


@pytest.mark.parametrize("recipe,numbers,absent", [
    ("balanced", ["0.3108"], []),
    ("balanced_enhanced", ["0.3192", "enhance_labels.py", "configs/full.flags"], []),
    ("full", ["0.4397", "0.4435"], []),
    ("fsd50k", ["0.5535", "0.5571", "0.5671", "--target_length=3000"], []),
])
def test_recipes_quote_their_setting(recipe, numbers, absent):
    from psla_tf.training.plan import check_config
    text = _comment(recipe)
    for n in numbers:
        assert n in text, (recipe, n)
    cfg = _cfg(recipe)
    check_config(cfg)
    if recipe == "balanced":
        # 0.3192 is the label-enhanced result: quoted as the other recipe's, not this one's
        assert "0.3192" in text and "balanced_enhanced" in text
        assert dataclasses.asdict(cfg) == dataclasses.asdict(_cfg("balanced_enhanced"))
