"""Normalizing-flow components (engine.components.flows) and the distribution family (FastFlow, CFLOW-AD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.components.flows import (
    AffineCoupling,
    CouplingFlow,
    conv_subnet,
    gaussian_nll,
    log_likelihood,
    mlp_subnet,
    positional_encoding_2d,
    soft_clamp,
)


def _randomise(module: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """Non-trivial weights (the subnets start as identity couplings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _conv_flow(cond: int = 0) -> CouplingFlow:
    return _randomise(CouplingFlow(4, 4, [conv_subnet(3), conv_subnet(1)], cond_channels=cond, clamp=1.5)).double()


def _mlp_flow(cond: int = 0) -> CouplingFlow:
    return _randomise(CouplingFlow(5, 4, [mlp_subnet(2.0)], cond_channels=cond, clamp=1.9, clamp_kind="atan")).double()


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_inverse_recovers_input(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv":
        flow, x, c = _conv_flow(2), torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 2, 5, 6).double()
    else:
        flow, x, c = _mlp_flow(3), torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    z, log_det = flow(x, c)
    assert z.shape == x.shape and log_det.shape == (x.shape[0], *x.shape[2:])
    assert not torch.allclose(z, x)
    torch.testing.assert_close(flow.inverse(z, c), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_log_det_matches_autograd_jacobian(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "conv":
        flow = _conv_flow()
        x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    else:
        flow = _mlp_flow()
        x = torch.randn(1, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0].reshape(-1), x).reshape(x.numel(), x.numel())
    _, expected = torch.linalg.slogdet(jac)
    _, log_det = flow(x)
    torch.testing.assert_close(log_det.sum(), expected, rtol=1e-8, atol=1e-8)


def test_clamping_bounds_the_scales() -> None:
    s = torch.linspace(-1e4, 1e4, 1001, dtype=torch.float64)
    for kind, slope in (("tanh", 1.0), ("atan", 2 / np.pi)):
        c = soft_clamp(s, 2.0, kind)
        assert c.abs().max() <= 2.0
        small = torch.tensor([1e-4], dtype=torch.float64)
        torch.testing.assert_close(soft_clamp(small, 2.0, kind), small * slope, rtol=1e-6, atol=0)
        assert torch.all(torch.diff(c) >= 0)  # monotone
    # A block whose subnet outputs enormous scales still changes log-det by at most clamp per channel.
    block = AffineCoupling(6, mlp_subnet(zero_init=False), clamp=2.0).double()
    with torch.no_grad():
        block.subnet[-1].bias.fill_(1e6)
    x = torch.randn(4, 6, dtype=torch.float64)
    y, log_det = block(x)
    assert torch.isfinite(y).all()
    assert (log_det.abs() <= 2.0 * block.c2 + 1e-9).all()


def test_conditioning_changes_the_output() -> None:
    flow = _mlp_flow(3)
    x = torch.randn(6, 5, dtype=torch.float64)
    c1, c2 = torch.zeros(6, 3, dtype=torch.float64), torch.ones(6, 3, dtype=torch.float64)
    z1, ld1 = flow(x, c1)
    z2, ld2 = flow(x, c2)
    assert not torch.allclose(z1, z2) and not torch.allclose(ld1, ld2)
    with pytest.raises(ValueError):
        flow(x)


def test_permutation_is_seeded_and_saved() -> None:
    a = CouplingFlow(8, 3, [mlp_subnet()], seed=5)
    b = CouplingFlow(8, 3, [mlp_subnet()], seed=5)
    for ba, bb in zip(a.blocks, b.blocks, strict=True):
        assert torch.equal(ba.perm, bb.perm)
    assert any("perm" in k for k in a.state_dict())


def test_fresh_flow_is_identity_and_nll_is_standard_normal() -> None:
    flow = CouplingFlow(4, 2, [conv_subnet(3)])
    x = torch.randn(2, 4, 5, 5)
    z, log_det = flow(x)
    torch.testing.assert_close(z.sort(1).values, x.sort(1).values)  # a channel permutation of x
    assert torch.count_nonzero(log_det) == 0
    # identity up to a permutation: the per-position NLL equals the standard-normal NLL of x
    nll = gaussian_nll(z, log_det, per_dim=False)
    ref = -torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_likelihood(z, log_det), -ref / 4, rtol=1e-5, atol=1e-5)


def test_positional_encoding() -> None:
    pe = positional_encoding_2d(16, 5, 7)
    assert pe.shape == (16, 5, 7)
    assert torch.equal(pe[:8, 0], pe[:8, 4])  # column channels do not depend on the row
    assert torch.equal(pe[8:, :, 0], pe[8:, :, 6])  # row channels do not depend on the column
    flat = pe.reshape(16, -1).T
    assert torch.unique(flat, dim=0).shape[0] == 35  # every position gets its own code
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 2, 2)


# --- methods ------------------------------------------------------------------------------------------------

FLOW_METHODS = ["fastflow", "cflow"]


def _region_means(maps: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    m = masks.bool()
    return float(maps[m].mean()), float(maps[~m].mean())


@pytest.mark.parametrize("name", FLOW_METHODS)
def test_loss_decreases_deterministic_and_localises(name: str, sample_brick) -> None:
    from engine import registry

    train, test = sample_brick
    params = {**registry.info(name).presets["test"]}
    det = registry.create(name, **params).fit(train)
    hist = det.train_history_
    assert len(hist) >= 2
    assert hist[-1]["loss"] < hist[0]["loss"], hist
    pred = det.predict(test)
    again = registry.create(name, **params).fit(train).predict(test)
    np.testing.assert_allclose(again.scores.numpy(), pred.scores.numpy(), rtol=1e-5, atol=1e-6)
    assert pred.maps is not None
    bad = test.labels == 1
    inside, outside = _region_means(pred.maps[bad], test.masks[bad])
    assert inside > outside, (inside, outside)
