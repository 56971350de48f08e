"""Paper-specific pieces of CS-Flow (the cross-scale coupling's inverse and joint log-determinant) and of
Uninformed Students (regression error and predictive variance of the student ensemble)."""

from __future__ import annotations

import pytest
import torch

from engine.methods.distribution.cs_flow import CrossScaleFlow, cs_flow_nll


def _random_flow(channels: int = 4) -> CrossScaleFlow:
    torch.manual_seed(0)
    flow = CrossScaleFlow(channels, n_blocks=2, hidden=6, kernel_size=3, clamp=3.0, n_scales=3).double()
    with torch.no_grad():
        for p in flow.parameters():  # away from the identity start (zero gains)
            p.normal_(0.0, 0.4)
    return flow


def _scales(n: int = 2, channels: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, channels, s, s, generator=g, dtype=torch.float64) for s in (4, 2, 1)]


def test_cross_scale_flow_inverts_exactly() -> None:
    flow = _random_flow()
    xs = _scales()
    with torch.no_grad():
        zs, _ = flow(xs)
        back = flow.inverse(zs)
    assert [z.shape for z in zs] == [x.shape for x in xs]
    assert max(float((z - x).abs().max()) for z, x in zip(zs, xs, strict=True)) > 0.1  # not the identity
    for b, x in zip(back, xs, strict=True):
        torch.testing.assert_close(b, x, rtol=1e-9, atol=1e-9)


def test_cross_scale_log_det_is_the_joint_jacobian() -> None:
    # The flow mixes scales, so the Jacobian of all three maps together is not block-diagonal per scale;
    # the per-position log-dets summed over every scale must still equal log|det J| of the joint map.
    flow = _random_flow()
    xs = _scales(n=1)
    shapes = [x.shape for x in xs]
    sizes = [x.numel() for x in xs]

    def joint(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        zs, _ = flow([p.reshape(s) for p, s in zip(parts, shapes, strict=True)])
        return torch.cat([z.flatten() for z in zs])

    v = torch.cat([x.flatten() for x in xs])
    jac = torch.autograd.functional.jacobian(joint, v)
    sign, logabs = torch.linalg.slogdet(jac)
    with torch.no_grad():
        _, lds = flow(xs)
    assert float(sign) != 0
    assert float(sum(d.sum() for d in lds)) == pytest.approx(float(logabs), rel=1e-8, abs=1e-8)
    # The coarse scale's output depends on the fine scale's input (cross-scale coupling).
    fine_to_coarse = jac[sizes[0] + sizes[1]:, : sizes[0]]
    assert float(fine_to_coarse.abs().max()) > 1e-6


def test_cs_flow_nll_per_dimension() -> None:
    zs = [torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    lds = [torch.full((1, 2, 2), 0.5), torch.zeros(1, 1, 1)]
    # ½·8 − 4·0.5 over 10 dims
    assert float(cs_flow_nll(zs, lds)[0]) == pytest.approx((4.0 - 2.0) / 10)


def test_students_error_and_predictive_variance_hand_example() -> None:
    from engine.methods.teacher_student.uninformed_students import ensemble_error_variance, standardise

    # M = 2 students, one image, C = 2 channels, 1×2 positions; teacher target 0 everywhere.
    preds = torch.zeros(2, 1, 2, 1, 2)
    preds[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0])
    preds[1, 0, :, 0, 0] = torch.tensor([3.0, 0.0])  # position 0: students disagree
    preds[:, 0, :, 0, 1] = torch.tensor([2.0, 2.0])  # position 1: students agree, both wrong by (2, 2)
    e, v = ensemble_error_variance(preds, torch.zeros(1, 2, 1, 2))
    # position 0: mean (2, 0) -> e = 4; v = (1 + 9) / 2 − 4 = 1.  position 1: e = 8, v = 8 − 8 = 0.
    torch.testing.assert_close(e, torch.tensor([[[4.0, 8.0]]]))
    torch.testing.assert_close(v, torch.tensor([[[1.0, 0.0]]]))
    torch.testing.assert_close(standardise(torch.tensor([3.0]), torch.tensor([1.0, 2.0])), torch.tensor([1.0]))


def test_students_score_combines_standardised_error_and_variance(sample_brick) -> None:
    from engine import registry
    from engine.methods.teacher_student.uninformed_students import standardise

    train, test = sample_brick
    det = registry.create("uninformed_students", preset="test", epochs=1).fit(train.subset(list(range(6))))
    assert len(det.students_) == 2 and det.stats_.shape == (3, 2, 2)
    # The students start from different weights, so they disagree somewhere.
    preds = det._predictions(test.subset([0]))
    assert float((preds[0][0] - preds[0][1]).abs().max()) > 0
    # The map is the mean over stages of standardised error + variance (before smoothing).
    det.sigma = 0.0
    from engine.components.anomaly_map import upsample

    imgs = test.subset([0, 1])
    expected = sum(upsample(standardise(e, st[0]) + standardise(v, st[1]), imgs.size)
                   for (e, v), st in zip(det._signals(imgs), det.stats_, strict=True)) / 3
    torch.testing.assert_close(det.predict(imgs).maps, expected, rtol=1e-4, atol=1e-4)
