"""The shared training loop: step caps, stopping reasons, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import registry
from engine.components.train_loop import Objective, TrainConfig, batches_per_epoch, planned_epochs, train_loop


def _problem(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    torch.manual_seed(seed)
    return nn.Linear(4, 1), x, y


def _fit(cfg: TrainConfig) -> tuple[nn.Linear, object, list[int]]:
    net, x, y = _problem()
    seen: list[int] = []

    def loss(idx: torch.Tensor) -> torch.Tensor:
        seen.append(len(idx))
        return ((net(x[idx])[:, 0] - y[idx]) ** 2).mean()

    res = train_loop(Objective(net.parameters(), loss), len(x), cfg, modules=[net])
    return net, res, seen


@pytest.mark.parametrize(("n", "bs", "want"), [(36, 8, 5), (33, 8, 4), (1, 8, 1), (16, 8, 2), (17, 8, 2)])
def test_batches_per_epoch_skips_a_lone_last_item(n: int, bs: int, want: int) -> None:
    assert batches_per_epoch(n, bs) == want


def test_max_steps_caps_the_optimiser_steps() -> None:
    # 40 items, 4 held out -> 36 train, batch 8 -> 5 batches/epoch; 12 steps = 2 full epochs + 2 batches.
    cfg = TrainConfig(epochs=50, max_steps=12, batch_size=8, patience=1000, seed=0)
    _, res, _ = _fit(cfg)
    assert res.steps == 12
    assert res.stopped == "max_steps"
    assert len(res.history) == planned_epochs(36, 8, 50, 12) == 3


def test_a_cap_inside_the_only_epoch_is_reported() -> None:
    _, res, _ = _fit(TrainConfig(epochs=1, max_steps=2, batch_size=8, patience=1000))
    assert (res.steps, res.stopped, len(res.history)) == (2, "max_steps", 1)


def test_epochs_bind_when_the_cap_is_larger() -> None:
    _, res, _ = _fit(TrainConfig(epochs=2, max_steps=1000, batch_size=8, patience=1000))
    assert (res.steps, res.stopped, len(res.history)) == (10, "epochs", 2)


def test_training_is_deterministic_with_a_seed() -> None:
    cfg = TrainConfig(epochs=3, max_steps=11, batch_size=8, seed=3)
    a, _, _ = _fit(cfg)
    b, _, _ = _fit(cfg)
    assert torch.equal(a.weight, b.weight)


def test_fast_and_quality_presets_bound_every_epoch_trained_method() -> None:
    """A large dataset must not make the fast preset run for hours: every trained method either caps its steps
    or trains a fixed number of steps per epoch; the quality preset trains at least as long as fast."""
    for info in registry.available():
        if not info.trained:
            continue
        fast = info.presets["fast"]
        if "steps_per_epoch" in fast:
            continue
        if "steps_per_episode" in fast:  # episodes of a fixed length (the neural batch sampler): bounded too
            q = registry.create(info.name, preset="quality").get_params()
            assert fast["episodes"] * fast["steps_per_episode"] <= q["episodes"] * q["steps_per_episode"], info.name
            continue
        assert fast.get("max_steps"), f"{info.name}: fast preset has no max_steps"
        # quality may be the paper's uncapped schedule (max_steps None); a cap must not be below fast's
        q_steps = registry.create(info.name, preset="quality").get_params().get("max_steps")
        assert q_steps is None or q_steps >= fast["max_steps"], info.name


def test_the_loop_uses_the_optimiser_a_method_asks_for() -> None:
    import pytest
    import torch

    from engine.components import optim
    from engine.components.train_loop import Objective, TrainConfig, _optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    sgd = _optimizer(Objective([p], lambda i: p.sum()), TrainConfig(optimizer="sgd", lr=0.4, momentum=0.9,
                                                                    weight_decay=1e-4))
    grp = sgd.param_groups[0]
    assert isinstance(sgd, optim.SGD) and grp["momentum"] == 0.9 and grp["lr"] == 0.4 and grp["weight_decay"] == 1e-4
    assert isinstance(_optimizer(Objective([p], lambda i: p.sum()), TrainConfig()), optim.AdamW)
    with pytest.raises(ValueError, match="use 'adamw' or 'sgd'"):
        _optimizer(Objective([p], lambda i: p.sum()), TrainConfig(optimizer="adam"))


def test_evaluating_switches_to_eval_without_gradients_and_restores_the_mode() -> None:
    from engine.components.nets import evaluating

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    with evaluating(net) as m:
        assert m is net and not net.training and not torch.is_grad_enabled()
        assert not net(torch.ones(1, 2)).requires_grad
    assert net.training and torch.is_grad_enabled()
    net.eval()
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("boom")
    assert not net.training and torch.is_grad_enabled()
