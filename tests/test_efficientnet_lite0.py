"""The plain-torch EfficientNet-Lite0 against timm's: same parameters, same stages, the same features to the bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from engine.backbones import _bundled_lite0_state, stage_info
from engine.efficientnet_lite0 import FEATURE_STAGES, EfficientNetLite0, EfficientNetLite0Features


def test_state_dict_keys_order_and_shapes_are_timms() -> None:
    ours = EfficientNetLite0().state_dict()
    theirs = timm.create_model("efficientnet_lite0").state_dict()
    assert list(ours) == list(theirs)
    assert [tuple(v.shape) for v in ours.values()] == [tuple(v.shape) for v in theirs.values()]


def test_feature_stages_are_timms() -> None:
    fi = timm.create_model("efficientnet_lite0", features_only=True).feature_info
    assert FEATURE_STAGES == tuple(zip(fi.module_name(), fi.channels(), fi.reduction(), strict=True))
    assert [(s.name, s.channels, s.stride) for s in stage_info("efficientnet_lite0")] == list(FEATURE_STAGES)


@pytest.mark.parametrize("out_indices", [(2, 3), (1, 2, 3), (4,), (0,)])
def test_features_equal_timms_to_the_bit(out_indices: tuple[int, ...]) -> None:
    state = _bundled_lite0_state()
    ref = timm.create_model("efficientnet_lite0", features_only=True, out_indices=out_indices).eval()
    ref.load_state_dict({k: state[k] for k in ref.state_dict()})
    ours = EfficientNetLite0Features(out_indices).eval()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()})
    x = torch.randn(2, 3, 72, 100, generator=torch.Generator().manual_seed(0))  # odd sizes: padding, rounding
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert len(a) == len(b) == len(out_indices)
    for fa, fb in zip(a, b, strict=True):
        assert fa.shape == fb.shape
        assert torch.equal(fa, fb)


def test_default_backbone_does_not_import_timm() -> None:
    code = ("import sys\nfrom engine.backbones import FeatureExtractor\nimport torch\n"
            "fe = FeatureExtractor(layers=('blocks.2', 'blocks.4'))\nfe(torch.rand(1, 3, 64, 64))\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
