"""The backbone's random initialisation against the reference's (learning issue): with
``init='pytorch'`` every EfficientNet convolution kernel and bias is drawn as torch.nn draws
it in efficientnet_pytorch's ``EfficientNet.from_name`` — compared tensor by tensor (paired
through the checkpoint importer's mapping) with a freshly built PyTorch model: same bound
U(±1/sqrt(fan_in)), standard deviations within 10 % (tensors of >= 256 values), and a
Kolmogorov-Smirnov test against the uniform law. ``init='keras'`` keeps keras.applications'.
BatchNorm epsilon / momentum and the drop-connect rates, layer by layer, are the reference's.

Skipped when torch / efficientnet_pytorch (requirements-import.txt) are not installed.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip(
    "torch", reason="torch not installed (pip install -r requirements-import.txt)")
efficientnet_pytorch = pytest.importorskip(
    "efficientnet_pytorch",
    reason="efficientnet_pytorch not installed (pip install -r requirements-import.txt)")

import keras  # noqa: E402

from psla_tf.models import backbones, torch_import  # noqa: E402
from psla_tf.models.tagger import build_classifier  # noqa: E402


def _pairs(init: str):
    keras.utils.set_random_seed(0)
    clf = build_classifier(10, eff_b=0, att_head=4, target_length=128, backbone_init=init)
    torch.manual_seed(0)
    ref = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", in_channels=1)
    state = {f"effnet.{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
    values = {v.path: v.numpy() for v in clf.weights}
    for m in torch_import.tensor_mapping(clf):
        if m.layout in ("conv", "depthwise") or (m.layout == "vector" and
                                                 m.torch_key.endswith("_se_reduce.bias") or
                                                 m.torch_key.endswith("_se_expand.bias")):
            if m.keras_path in values and m.torch_key in state:
                weight = state[m.torch_key.replace(".bias", ".weight")]
                bound = 1.0 / np.sqrt(np.prod(weight.shape[1:]))    # torch's fan_in
                yield m, m.to_keras(state[m.torch_key]), values[m.keras_path], bound


def test_pytorch_init_matches_efficientnet_pytorch():
    pairs = list(_pairs("pytorch"))
    assert len(pairs) > 100                     # every conv of B0 (+ SE biases)
    for m, ref, ours, bound in pairs:
        assert ours.shape == ref.shape, m.torch_key
        assert np.abs(ref).max() <= bound                   # the oracle itself
        assert np.abs(ours).max() <= bound * (1 + 1e-6), m.torch_key
        if ref.size >= 256:
            assert np.std(ours) == pytest.approx(np.std(ref), rel=0.10), m.torch_key
    # the largest tensor follows the uniform law of its bound
    m, ref, ours, b = max(pairs, key=lambda p: p[1].size)
    assert stats.kstest(ours.ravel()[:20000], stats.uniform(-b, 2 * b).cdf).pvalue > 1e-3


def test_keras_init_is_keras_applications():
    # the squeeze-excite reduction kernels: VarianceScaling(2, fan_out) is ~10x larger
    ratios = [np.std(ours) / np.std(ref) for m, ref, ours, _ in _pairs("keras")
              if m.torch_key.endswith("_se_reduce.weight") and ref.size >= 256]
    assert ratios and min(ratios) > 4


def test_init_choice_is_checked():
    with pytest.raises(ValueError, match="init must be one of"):
        backbones.build_backbone("efficientnet", eff_b=0, input_shape=(128, 64, 1),
                                 init="xavier")


@pytest.mark.parametrize("b", [0, 2])
def test_batchnorm_and_drop_connect_match_efficientnet_pytorch(b):
    # every BN's epsilon and momentum (Keras m ≡ PyTorch 1 − m), and the drop-connect rate
    # of every residual block, block by block, as efficientnet_pytorch's from_name sets them
    bb = backbones.build_backbone("efficientnet", eff_b=b, input_shape=(128, 64, 1))
    ref = efficientnet_pytorch.EfficientNet.from_name(f"efficientnet-b{b}", in_channels=1)
    ours_bn = [l for l in bb.layers if isinstance(l, keras.layers.BatchNormalization)]
    ref_bn = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(ours_bn) == len(ref_bn) > 40
    for k, r in zip(ours_bn, ref_bn):
        assert k.epsilon == pytest.approx(r.eps), k.name
        assert k.momentum == pytest.approx(1.0 - r.momentum), k.name
    rate = ref._global_params.drop_connect_rate
    ref_drop = [rate * i / len(ref._blocks) for i, blk in enumerate(ref._blocks)
                if blk.id_skip and blk._block_args.stride == 1
                and blk._block_args.input_filters == blk._block_args.output_filters]
    ours_drop = [l.rate for l in bb.layers if isinstance(l, keras.layers.Dropout)]
    assert rate == 0.2 and len(ref_drop) >= 9
    np.testing.assert_allclose(ours_drop, ref_drop, rtol=1e-6)
