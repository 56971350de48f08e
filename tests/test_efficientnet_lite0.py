"""The plain-torch EfficientNet-Lite0 against timm's: same parameters, same stages, the same features to the bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from engine.backbones import _bundled_lite0_state, stage_info
from engine.efficientnet_lite0 import FEATURE_STAGES, EfficientNetLite0, EfficientNetLite0Features, init_random_


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


@pytest.mark.parametrize("weights", ["auto", "random"])
def test_default_backbone_does_not_import_timm(weights: str) -> None:
    """Neither the pretrained teacher nor a random student (STFPM, Uninformed Students) imports timm."""
    code = ("import sys\nfrom engine.backbones import FeatureExtractor\nimport torch\n"
            f"fe = FeatureExtractor(layers=('blocks.2', 'blocks.4'), weights={weights!r})\n"
            "fe(torch.rand(1, 3, 64, 64))\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_random_initialisation_follows_timms_scheme() -> None:
    """`init_random_` against timm's own random efficientnet_lite0: every tensor drawn from the same distribution
    (BatchNorm exactly 1 / 0; each weight's spread within a few percent of timm's draw and of the scheme's
    sqrt(2 / fan_out)), and the caller's generator left where it was by a random FeatureExtractor."""
    torch.manual_seed(0)
    theirs = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    ours_model = init_random_(EfficientNetLite0())
    ours = ours_model.state_dict()
    convs = {n + ".weight": m for n, m in ours_model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for k, v in ours.items():
        t = theirs[k]
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")) or v.dim() == 1:
            assert torch.equal(v, t), k  # BatchNorm 1 / 0, biases 0, running statistics at their start
            continue
        if v.numel() < 10000:
            continue  # too few draws to compare spreads (at 10k the spread's own error is ~0.7 %)
        assert abs(v.mean().item()) < 0.1 * v.std().item(), k
        assert v.std().item() == pytest.approx(t.std().item(), rel=0.06), k
        if k in convs:
            c = convs[k]
            fan_out = c.kernel_size[0] * c.kernel_size[1] * c.out_channels // c.groups
            assert v.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.06), k
    from engine.backbones import FeatureExtractor

    torch.manual_seed(1)
    a = FeatureExtractor(layers=("blocks.2",), weights="random")
    after = torch.rand(1)
    torch.manual_seed(1)
    b = FeatureExtractor(layers=("blocks.2",), weights="random")
    assert torch.equal(torch.rand(1), after)  # not moved on: the same next draw as without building
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
