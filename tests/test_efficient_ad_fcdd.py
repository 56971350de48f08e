"""EfficientAD and FCDD: method-specific checks (the shared contract suite covers the rest)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import registry
from engine.api import ImageSet
from engine.components.synthetic_anomalies import default_source, make_anomalies
from engine.components.train_loop import split_indices
from engine.methods.one_class.fcdd import FCDD, fcdd_loss, pseudo_huber
from engine.methods.teacher_student.efficient_ad import (
    PDN,
    EfficientAD,
    hard_feature_loss,
    pdn_out_size,
    penalty_images,
    quantile_normalise,
    student_loss,
)

TINY_EA = {"width": 8, "ae_width": 8, "batch_size": 2, "teacher_batch_size": 2, "teacher_epochs": 2, "epochs": 3,
           "lr": 3e-3, "teacher_lr": 1e-2}


def _preset(name: str) -> dict:
    return dict(registry.info(name).presets["test"])


@pytest.fixture(scope="module")
def small_train(sample_brick) -> ImageSet:
    return sample_brick[0].subset(list(range(10)))


@pytest.fixture(scope="module")
def fitted_ea(sample_brick) -> EfficientAD:
    return EfficientAD(**_preset("efficient_ad")).fit(sample_brick[0])


@pytest.fixture(scope="module")
def fitted_fcdd(sample_brick) -> FCDD:
    return FCDD(**_preset("fcdd")).fit(sample_brick[0])


# --- EfficientAD ------------------------------------------------------------------------------------------
def test_pdn_output_size() -> None:
    assert pdn_out_size(256) == 56 and pdn_out_size(128) == 24
    y = PDN(5, width=4)(torch.rand(1, 3, 100, 132))
    assert y.shape == (1, 5, pdn_out_size(100), pdn_out_size(132))


def test_pdn_small_and_medium_are_the_papers_layers() -> None:
    """PDN-S (Table 6) and PDN-M (Table 7) with 384 output channels: conv kernels and widths."""
    def convs(net: PDN) -> list[tuple[int, int, int]]:
        return [(m.out_channels, m.in_channels, m.kernel_size[0]) for m in net.modules()
                if isinstance(m, torch.nn.Conv2d)]
    assert convs(PDN(384, 128, "small")) == [(128, 3, 4), (256, 128, 4), (256, 256, 3), (384, 256, 4)]
    assert convs(PDN(384, 256, "medium")) == [(256, 3, 4), (512, 256, 4), (512, 512, 1), (512, 512, 3),
                                               (384, 512, 4), (384, 384, 1)]
    y = PDN(6, 4, "medium")(torch.rand(1, 3, 100, 132))
    assert y.shape == (1, 6, pdn_out_size(100), pdn_out_size(132))  # same grid as PDN-S


def test_efficient_ad_defaults_are_the_papers_training() -> None:
    d = EfficientAD()
    assert (d.max_steps, d.batch_size, d.lr, d.lr_milestones) == (70_000, 1, 1e-4, (0.95,))
    assert (d.hard_quantile, d.q_a, d.q_b, d.ae_width, d.penalty) == (0.999, 0.9, 0.995, 64, True)
    assert registry.create("efficient_ad", preset="quality").get_params() == d.get_params()
    assert registry.is_reduced("efficient_ad", "fast")


def test_student_loss_adds_the_penalty_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    p = torch.randn(1, 4, 5, 5, generator=g)
    d = ((t - s) ** 2).flatten()
    hard = d[d >= torch.quantile(d, 0.9)].mean()  # 144 values: the top ceil(0.1·144) = 15
    assert float(hard_feature_loss(t, s, 0.9)) == pytest.approx(float(hard), rel=1e-6)
    assert float(student_loss(t, s, p, 0.9)) == pytest.approx(float(hard) + float((p ** 2).mean()), rel=1e-6)


def test_penalty_images_are_centre_crops_of_the_2x_pictures() -> None:
    """Resized to twice the side, centre-cropped (the paper's ImageNet transform); greyscale with grey_prob."""
    idx = torch.randint(0, len(default_source(128)), (5,), generator=torch.Generator().manual_seed(0))
    colour = penalty_images((64, 48), torch.Generator().manual_seed(0), 5, grey_prob=0.0)
    assert torch.equal(colour, default_source(128)[idx, :, 32:96, 40:88])
    grey = penalty_images((64, 48), torch.Generator().manual_seed(0), 5, grey_prob=1.0)
    assert grey.shape == (5, 3, 64, 48) and torch.equal(grey[:, 0], grey[:, 2])
    assert torch.allclose(grey[:, 0], 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2])


def test_hard_feature_loss_uses_only_top_quantile() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 10, 10, generator=g)
    s = torch.randn(2, 8, 10, 10, generator=g).requires_grad_(True)
    q = 0.99
    loss = hard_feature_loss(t, s, q)
    d = (t - s.detach()).pow(2).flatten()
    k = math.ceil((1 - q) * d.numel())
    top = torch.topk(d, k).values
    assert torch.allclose(loss.detach(), top.mean())
    loss.backward()
    assert int((s.grad != 0).sum()) == k  # gradient only through the hardest k elements


def test_quantile_normalise_values() -> None:
    m = torch.linspace(0, 1, 1001)
    out = quantile_normalise(m, torch.quantile(m, 0.9), torch.quantile(m, 0.995))
    assert torch.quantile(out, 0.9).abs() < 1e-6
    assert abs(float(torch.quantile(out, 0.995)) - 0.1) < 1e-6


def test_efficient_ad_heldout_quantiles_map_to_0_and_0_1(fitted_ea: EfficientAD, sample_brick) -> None:
    train = sample_brick[0]
    _, val = split_indices(len(train), fitted_ea.val_fraction, torch.Generator().manual_seed(fitted_ea.seed))
    assert len(val) >= 1
    st, ae = fitted_ea.normalised_maps(train.images[val])
    for m in (st, ae):
        assert abs(float(torch.quantile(m.flatten().double(), 0.9))) < 1e-4
        assert abs(float(torch.quantile(m.flatten().double(), 0.995)) - 0.1) < 1e-4


def test_efficient_ad_losses_decrease(fitted_ea: EfficientAD) -> None:
    for key, name in (("teacher", "distillation"), ("student", "loss")):
        h = [r[name] for r in fitted_ea.history_[key]]
        assert h[-1] < h[0], f"{key} loss did not decrease: {h}"


def test_efficient_ad_deterministic(small_train: ImageSet) -> None:
    a = EfficientAD(**TINY_EA).fit(small_train).predict(small_train.images[:3])
    b = EfficientAD(**TINY_EA).fit(small_train).predict(small_train.images[:3])
    np.testing.assert_allclose(a.scores.numpy(), b.scores.numpy(), rtol=1e-5, atol=1e-6)
    c = EfficientAD(**{**TINY_EA, "seed": 1}).fit(small_train).predict(small_train.images[:3])
    assert not np.allclose(a.scores.numpy(), c.scores.numpy())


def test_efficient_ad_other_size(small_train: ImageSet) -> None:
    det = EfficientAD(**TINY_EA).fit(small_train)
    p = det.predict(torch.rand(2, 3, 96, 112))
    assert p.maps is not None and p.maps.shape == (2, 96, 112) and torch.isfinite(p.maps).all()


def _region_contrast(maps: torch.Tensor, test: ImageSet) -> tuple[float, float]:
    assert test.masks is not None and test.labels is not None
    bad = test.labels == 1
    m, masks = maps[bad], test.masks[bad].bool()
    return float(m[masks].mean()), float(m[~masks].mean())


def test_efficient_ad_anomalous_region_above_normal(fitted_ea: EfficientAD, sample_brick) -> None:
    test = sample_brick[1]
    inside, outside = _region_contrast(fitted_ea.predict(test).maps, test)
    assert inside > outside


# --- FCDD -------------------------------------------------------------------------------------------------
def test_synthetic_outlier_masks_match_changed_pixels(small_train: ImageSet) -> None:
    x = small_train.float_images()[:4]
    out, masks = make_anomalies(x, torch.Generator().manual_seed(0), p=1.0)
    changed = (out - x).abs().amax(1) > 1e-6
    assert masks.shape == (4, *small_train.size)
    assert not (changed & (masks == 0)).any(), "pixels outside the mask changed"
    assert changed.sum() >= 0.5 * masks.sum() and masks.flatten(1).sum(1).min() > 0


def test_fcdd_loss_terms() -> None:
    a = pseudo_huber(torch.tensor([[[0.0, 3.0]]]))
    assert torch.allclose(a, torch.tensor([[[0.0, math.sqrt(10) - 1]]]))
    hm = torch.full((2, 4, 4), 0.5)
    loss = fcdd_loss(hm, torch.tensor([0, 1]))
    assert torch.allclose(loss, torch.tensor((0.5 - math.log(1 - math.exp(-0.5))) / 2))
    # larger heatmaps lower the loss of anomalies and raise that of normal images
    assert fcdd_loss(hm * 2, torch.tensor([1])) < fcdd_loss(hm, torch.tensor([1]))
    assert fcdd_loss(hm * 2, torch.tensor([0])) > fcdd_loss(hm, torch.tensor([0]))


def test_fcdd_loss_decreases(fitted_fcdd: FCDD) -> None:
    h = [r["fcdd"] for r in fitted_fcdd.history_]
    assert h[-1] < h[0]


def test_fcdd_deterministic(small_train: ImageSet) -> None:
    kw = {"epochs": 3, "outliers_per_image": 1}
    a = FCDD(**kw).fit(small_train).predict(small_train.images[:3])
    b = FCDD(**kw).fit(small_train).predict(small_train.images[:3])
    np.testing.assert_allclose(a.scores.numpy(), b.scores.numpy(), rtol=1e-5, atol=1e-6)


def test_fcdd_accepts_labelled_anomalies(small_train: ImageSet, sample_brick) -> None:
    test = sample_brick[1]
    assert test.labels is not None
    anomalies = test.subset(torch.nonzero(test.labels == 1)[:2, 0])
    det = FCDD(epochs=2, outliers_per_image=0).fit(small_train, anomalies=anomalies)
    assert torch.isfinite(det.predict(test.images[:2]).scores).all()
    assert registry.info("fcdd").supervision == "none"


def test_fcdd_anomalous_region_above_normal(fitted_fcdd: FCDD, sample_brick) -> None:
    test = sample_brick[1]
    inside, outside = _region_contrast(fitted_fcdd.predict(test).maps, test)
    assert inside > outside
