"""Weakly supervised family: DevNet and mixed supervision (labelled anomalies, the runner's K split)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import registry
from engine.api import ConfigError, ImageSet
from engine.components import weak_training
from engine.components.weak_training import dihedral_views
from engine.methods.weakly_supervised import devnet as devnet_mod
from engine.methods.weakly_supervised.devnet import deviation_loss, top_k_mean
from engine.methods.weakly_supervised.mixed_supervision import SegDecNet, seg_targets
from engine.runner import RunConfig, run_methods, split_labeled

WEAK = ["devnet", "mixed_supervision", "neural_batch_sampler", "cavga", "liac"]
TINY = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4}
# The neural batch sampler counts its training in episodes of autoencoder steps, not in epochs.
TINY_BY_NAME = {"neural_batch_sampler": {"episodes": 2, "steps_per_episode": 3, "batch_size": 4, "n_records": 3,
                                         "pred_epochs": 1, "cls_epochs": 5}}


def small(name: str) -> dict:
    """A method's tiny training parameters for these tests."""
    return dict(TINY_BY_NAME.get(name, TINY))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(train, evaluation test, labelled anomalies) of a tiny synthetic brick set at 64 px, K = 2."""
    from engine.data import discover, load_split, make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("ws"), "brick", n_train=8, n_test_good=4,
                                  n_defect_per_type=3, size=64)
    ds = discover(root)
    train, test = load_split(ds, "train", 64), load_split(ds, "test", 64)
    lab, rest = split_labeled(test, 2, seed=0)
    return train, test.subset(rest), test.subset(lab)


# --- DevNet pieces ----------------------------------------------------------------------------------------


def test_deviation_loss_matches_hand_computation() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0])              # mean 2, population std sqrt(2/3)
    sd = math.sqrt(2.0 / 3.0)
    scores = torch.tensor([2.5, 1.0, 4.0, 9.0])
    labels = torch.tensor([0, 0, 1, 1])
    devs = [(s - 2.0) / sd for s in (2.5, 1.0, 4.0, 9.0)]
    expected = (abs(devs[0]) + abs(devs[1]) + max(0.0, 5.0 - devs[2]) + max(0.0, 5.0 - devs[3])) / 4
    got = float(deviation_loss(scores, labels, ref, margin=5.0))
    assert got == pytest.approx(expected, rel=1e-6)
    # A standard-normal reference of l = 2 points {-1, 1}: dev = score; margin respected exactly.
    assert float(deviation_loss(torch.tensor([0.5, 3.0]), torch.tensor([0, 1]), torch.tensor([-1.0, 1.0]))) == \
        pytest.approx((0.5 + 2.0) / 2)


def test_top_k_mean() -> None:
    patch = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert float(top_k_mean(patch, 0.25)[0]) == pytest.approx((15 + 14 + 13 + 12) / 4)
    assert float(top_k_mean(patch, 0.0)[0]) == pytest.approx(15.0)  # at least one patch


def test_dihedral_views_move_masks_with_images() -> None:
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    img[:, :, 1, 5] = 255
    masks = (img[:, 0] > 0).to(torch.uint8)
    v_img, v_mask, v_has = dihedral_views(img, masks, torch.tensor([True, False]))
    assert v_img.shape == (16, 3, 8, 8) and v_mask is not None and v_mask.shape == (16, 8, 8)
    assert torch.equal(v_mask.bool(), v_img[:, 0] > 0)            # every view keeps image and mask aligned
    assert v_has.tolist() == [True, False] * 8
    assert len({tuple(v.nonzero()[0].tolist()) for v in v_mask[::2]}) == 8  # 8 distinct placements
    rect, _, _ = dihedral_views(torch.zeros(1, 3, 8, 6, dtype=torch.uint8))
    assert rect.shape == (4, 3, 8, 6)                              # no 90° turns for non-square images


def test_devnet_batches_are_balanced(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    train, _, anomalies = tiny
    seen: list[torch.Tensor] = []
    real = devnet_mod.deviation_loss

    def spy(scores: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, margin: float = 5.0):
        seen.append(labels.detach().cpu())
        assert reference.numel() == 5000
        return real(scores, labels, reference, margin)

    monkeypatch.setattr(devnet_mod, "deviation_loss", spy)
    det = registry.create("devnet", **TINY).fit(train, anomalies=anomalies)
    assert len(seen) == TINY["epochs"] * TINY["steps_per_epoch"]
    for labels in seen:
        assert len(labels) == 2 * TINY["batch_size"] and int(labels.sum()) == TINY["batch_size"]
    assert det.run_notes_["anomaly_views"] == 8 * len(anomalies)


# --- mixed supervision pieces ----------------------------------------------------------------------------


def test_seg_targets_distance_weighting() -> None:
    m = torch.zeros(1, 32, 32, dtype=torch.uint8)
    m[0, 8:25, 8:25] = 1
    tgt, w = seg_targets(m, (32, 32), dilate=1, p=2.0)    # same grid: no pooling, weights visible per pixel
    assert torch.equal(tgt[0] > 0.5, m[0].bool())
    assert float(w[0, 0, 0]) == 1.0                        # negatives weigh 1
    assert float(w[0, 16, 16]) == pytest.approx(1.0)       # the mask's centre: D = D_max
    edge = float(w[0, 8, 16])                              # on the border: D = 1 of D_max = 9 -> (1/9)^2
    assert edge == pytest.approx((1 / 9) ** 2, rel=1e-4)
    tgt4, w4 = seg_targets(m, (4, 4), dilate=7, p=2.0)     # output grid (stride 8), dilated mask
    assert tgt4.shape == w4.shape == (1, 4, 4) and float(tgt4.max()) > 0.5


def test_loss_schedule_and_gradient_stop() -> None:
    det = registry.create("mixed_supervision", epochs=10, delta=0.01)
    assert det.loss_weights(0) == (1.0, 0.0)
    lam, w = det.loss_weights(5)
    assert lam == pytest.approx(0.5) and w == pytest.approx(0.005)
    net = SegDecNet(6, 8, 8, stop_gradient=True)
    cls, seg = net(torch.randn(2, 6, 16, 16))
    assert cls.shape == (2,) and seg.shape == (2, 16, 16)
    cls.sum().backward()
    seg_params = [*net.seg.parameters(), *net.seg_out.parameters()]
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in seg_params)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.fc.parameters())


def test_mixed_supervision_masks_subset(tiny) -> None:
    train, test, anomalies = tiny
    assert bool(anomalies.has_mask.all())
    full = registry.create("mixed_supervision", **TINY).fit(train, anomalies=anomalies)
    assert full.run_notes_["with_masks"] == len(anomalies)
    weak = registry.create("mixed_supervision", n_masks=1, **TINY).fit(train, anomalies=anomalies)
    assert weak.run_notes_["with_masks"] == 1
    none = registry.create("mixed_supervision", n_masks=0, **TINY).fit(train, anomalies=anomalies)
    pred = none.predict(test)
    assert none.run_notes_["with_masks"] == 0 and torch.isfinite(pred.scores).all()
    assert pred.maps is not None and pred.maps.shape == (len(test), 64, 64)


# --- both methods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEAK)
def test_fit_without_anomalies_raises(name: str, tiny) -> None:
    train, _, anomalies = tiny
    with pytest.raises(ConfigError):
        registry.create(name, **small(name)).fit(train)
    with pytest.raises(ConfigError):
        registry.create(name, **small(name)).fit(train, anomalies=anomalies.subset([]))


@pytest.mark.parametrize("name", WEAK)
def test_deterministic_with_seed(name: str, tiny) -> None:
    train, test, anomalies = tiny
    a = registry.create(name, **small(name)).fit(train, anomalies=anomalies).predict(test)
    b = registry.create(name, **small(name)).fit(train, anomalies=anomalies).predict(test)
    np.testing.assert_array_equal(a.scores.numpy(), b.scores.numpy())
    np.testing.assert_array_equal(a.maps.numpy(), b.maps.numpy())
    c = registry.create(name, seed=1, **small(name)).fit(train, anomalies=anomalies).predict(test)
    assert not np.array_equal(a.scores.numpy(), c.scores.numpy())


@pytest.mark.parametrize("name", WEAK)
def test_deterministic_whether_features_are_cached_or_not(name: str, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A feature-cache miss builds the backbone, which draws from the global RNG; weights must not depend on it."""
    train, test, anomalies = tiny
    a = registry.create(name, **small(name)).fit(train, anomalies=anomalies).predict(test)
    real = weak_training.extract_features

    def miss(*args, **kwargs):
        torch.rand(123)  # what building a backbone on a cache miss does to the global RNG
        return real(*args, **kwargs)

    monkeypatch.setattr(weak_training, "extract_features", miss)
    b = registry.create(name, **small(name)).fit(train, anomalies=anomalies).predict(test)
    np.testing.assert_array_equal(a.scores.numpy(), b.scores.numpy())


@pytest.mark.parametrize("name", WEAK)
def test_more_labelled_anomalies(name: str, tiny) -> None:
    train, test, anomalies = tiny
    extra = test.subset([i for i, y in enumerate(test.labels.tolist()) if y == 1])  # every other defect image
    more = ImageSet(images=torch.cat([anomalies.images, extra.images]),
                    labels=torch.ones(len(anomalies) + len(extra), dtype=torch.int64),
                    masks=torch.cat([anomalies.masks, extra.masks]),
                    has_mask=torch.cat([anomalies.has_mask, torch.zeros(len(extra), dtype=torch.bool)]),
                    defect_types=anomalies.defect_types + extra.defect_types)  # the extra ones without masks
    for labelled in (anomalies.subset([0]), anomalies, more):
        pred = registry.create(name, **small(name)).fit(train, anomalies=labelled).predict(test)
        assert pred.scores.shape == (len(test),) and torch.isfinite(pred.scores).all()
        assert pred.maps is not None and torch.isfinite(pred.maps).all()


# --- the runner's labelled split -------------------------------------------------------------------------


def test_runner_removes_labelled_images_from_every_evaluation(tmp_path) -> None:
    from engine.data import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path, "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64)
    tiny_params = {name: small(name) for name in WEAK}
    cfg = RunConfig(methods=["devnet", "mixed_supervision", "patchcore"], image_size=64, device="cpu",
                    labeled_anomalies=2, params=tiny_params, use_cache=False)
    res = run_methods(root, cfg)
    labelled = set(res["labeled_anomalies"]["paths"])
    n_types = len(res["dataset"]["defect_types"])
    assert res["labeled_anomalies"]["k"] == 2 and len(labelled) == 2 * n_types
    assert all("/good/" not in p.replace("\\", "/") for p in labelled)
    evaluated = []
    for run in res["runs"]:
        assert run["status"] == "ok", run["error"]
        paths = [im["path"] for im in run["images"]]
        assert not labelled & set(paths), f"{run['method']} was evaluated on labelled images"
        evaluated.append(sorted(paths))
    assert evaluated[0] == evaluated[1] == evaluated[2]        # patchcore (unsupervised) sees the same images
    assert len(evaluated[0]) == res["dataset"]["n_test"] == 4 + n_types * 3 - len(labelled)


def test_runner_weak_method_without_k_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="labelled anomalies"):
        run_methods(tmp_path, RunConfig(methods=["devnet"], labeled_anomalies=0))
