"""Method-specific checks for STFPM, Reverse Distillation (teacher–student) and Deep SVDD on patches (one-class).

Short trainings at 64 px check determinism and that the trainable part learns; the registry "test"
preset at 128 px checks that defects light up in the anomaly map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engine import registry
from engine.api import ImageSet
from engine.methods.one_class.deep_svdd import SVDDProjector, guard_centre
from engine.methods.teacher_student.stfpm import TrainableStudent

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
METHODS = ["stfpm", "reverse_distillation", "deep_svdd"]
SHORT = {"stfpm": {"epochs": 4, "lr": 5e-3}, "reverse_distillation": {"epochs": 4}, "deep_svdd": {"epochs": 6}}


@pytest.fixture(scope="module")
def brick64() -> tuple[ImageSet, ImageSet]:
    from engine.data import discover, load_split

    ds = discover(SAMPLE / "brick")
    return load_split(ds, "train", 64), load_split(ds, "test", 64)


_runs: dict[tuple[str, int], tuple[Any, np.ndarray]] = {}


def _short_run(name: str, seed: int, data: tuple[ImageSet, ImageSet]) -> tuple[Any, np.ndarray]:
    """A short training (no early stop) at 64 px; (detector, test scores), memoised per (method, seed)."""
    if (name, seed) not in _runs:
        train, test = data
        det = registry.info(name).factory(**SHORT[name], patience=100, seed=seed)
        det.fit(train)
        _runs[(name, seed)] = (det, det.predict(test).scores.numpy())
    return _runs[(name, seed)]


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_training(name: str, brick64) -> None:
    a, sa = _short_run(name, 0, brick64)
    _runs.pop((name, 0))
    b, sb = _short_run(name, 0, brick64)
    assert [h["loss"] for h in a.history_] == [h["loss"] for h in b.history_]
    np.testing.assert_array_equal(sa, sb)


@pytest.mark.parametrize("name", METHODS)
def test_other_seed_other_training(name: str, brick64) -> None:
    a, sa = _short_run(name, 0, brick64)
    b, sb = _short_run(name, 1, brick64)
    assert [h["loss"] for h in a.history_] != [h["loss"] for h in b.history_]
    assert not np.array_equal(sa, sb)


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases(name: str, brick64) -> None:
    det, _ = _short_run(name, 0, brick64)
    losses = [h["loss"] for h in det.history_]
    assert len(losses) == SHORT[name]["epochs"]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_defect_region_scores_higher(name: str, sample_brick) -> None:
    train, test = sample_brick
    det = registry.info(name).factory(**registry.info(name).presets["test"]).fit(train)
    maps = det.predict(test).maps
    assert test.masks is not None and maps is not None
    wins, n = 0, 0
    for i in range(len(test)):
        m = test.masks[i].bool()
        if int(test.labels[i]) == 1 and m.any():
            n += 1
            wins += int(maps[i][m].mean() > maps[i][~m].mean())
    assert n > 0 and wins >= 0.8 * n, f"{name}: defect brighter than background in only {wins}/{n} images"
    normal = maps[test.labels == 0]
    defect = torch.stack([maps[i][test.masks[i].bool()].mean() for i in range(len(test)) if test.masks[i].any()])
    assert float(defect.median()) > float(normal.flatten().quantile(0.9))


def test_stfpm_student_is_trainable_and_follows_mode() -> None:
    s = TrainableStudent.build("efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), seed=0)
    assert all(p.requires_grad for p in s.parameters())
    bns = [m for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    s.train()
    assert bns and all(m.training for m in bns)
    s.eval()
    assert not any(m.training for m in bns)
    again = TrainableStudent.build("efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), seed=0)
    other = TrainableStudent.build("efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), seed=1)
    w0, w1, w2 = (next(iter(m.parameters())) for m in (s, again, other))
    assert torch.equal(w0, w1) and not torch.equal(w0, w2)


def test_centre_eps_guard() -> None:
    c = torch.tensor([0.0, 0.05, -0.05, -0.2, 0.3, 1e-9, -1e-9])
    g = guard_centre(c, eps=0.1)
    assert g.tolist() == pytest.approx([0.1, 0.1, -0.1, -0.2, 0.3, 0.1, -0.1])
    assert torch.equal(c, torch.tensor([0.0, 0.05, -0.05, -0.2, 0.3, 1e-9, -1e-9])), "input must not change"


def test_fitted_centre_respects_eps(brick64) -> None:
    det, _ = _short_run("deep_svdd", 0, brick64)
    assert bool((det.centre_.abs() >= det.centre_eps - 1e-7).all())


def test_svdd_network_has_no_bias() -> None:
    net = SVDDProjector(152, hidden=32, rep_dim=8, depth=3)
    names = [n for n, _ in net.named_parameters()]
    assert names and not any("bias" in n for n in names)
    assert all(p.ndim == 4 for p in net.parameters()), "only 1x1 conv weights may be learnable"
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not m.affine
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
    # No offsets anywhere: with BatchNorm statistics at their defaults, zero input gives exactly zero output.
    net.eval()
    assert torch.equal(net(torch.zeros(1, 152, 2, 2)), torch.zeros(1, 8, 2, 2))
