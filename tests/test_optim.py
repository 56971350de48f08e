"""engine.components.optim against torch.optim: the same parameters, to the bit, step after step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.components import optim


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(6, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(t) for t in (conv, torch.randn(6, generator=g), torch.randn(4, 5, generator=g))]


def _run(make, seed: int, steps: int = 12) -> list[torch.Tensor]:
    ps = _params(seed)
    opt = make(ps)
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            if i == 1 and t in (3, 4):  # a parameter without a gradient is skipped, as torch skips it
                continue
            p.grad = torch.randn(p.shape, generator=g).contiguous(memory_format=torch.preserve_format)
        if t == 6:  # the loop's schedule changes the learning rate through param_groups
            for grp in opt.param_groups:
                grp["lr"] *= 0.2
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.999)])
def test_adamw_takes_torchs_steps(wd: float, betas: tuple[float, float]) -> None:
    ours = _run(lambda ps: optim.AdamW(ps, lr=2e-3, betas=betas, weight_decay=wd), seed=1)
    ref = _run(lambda ps: torch.optim.AdamW(ps, lr=2e-3, betas=betas, weight_decay=wd), seed=1)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params(1)[0]), "it moved"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_sgd_takes_torchs_steps(momentum: float, wd: float) -> None:
    ours = _run(lambda ps: optim.SGD(ps, lr=0.4, momentum=momentum, weight_decay=wd), seed=2)
    ref = _run(lambda ps: torch.optim.SGD(ps, lr=0.4, momentum=momentum, weight_decay=wd), seed=2)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_zero_grad_and_no_parameters() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = optim.SGD([p], lr=0.1)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(2))
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # nothing to do without gradients
    assert torch.equal(p.detach(), torch.ones(2))
    with pytest.raises(ValueError, match="no parameters"):
        optim.AdamW([])


def test_training_does_not_import_the_compiler() -> None:
    """The point of the module: a training run never imports torch._dynamo (1.9 s and ~150 MB per process)."""
    code = ("import sys, torch\n"
            "from engine.components.train_loop import Objective, TrainConfig, train_loop\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
            "x = torch.randn(8, 3, 16, 16)\n"
            "loss = lambda idx: net(x[idx]).square().mean()\n"
            "for opt in ('adamw', 'sgd'):\n"
            "    train_loop(Objective(net.parameters(), loss), 8, TrainConfig(epochs=2, batch_size=4,\n"
            "               optimizer=opt, momentum=0.9), modules=[net])\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
