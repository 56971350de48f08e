"""The two optimisers the training loop uses, AdamW and SGD with momentum, as plain classes.

Why not `torch.optim`: its optimisers import `torch._dynamo` (and sympy) on construction, 1.9 s and about 150 MB
in every process that trains, the dashboard's job workers and `--jobs` workers included, for a compiler adlab
never uses. These take the same steps as `torch.optim.AdamW` / `torch.optim.SGD` (their default, non-fused
form), to the bit on CPU (tests/test_optim.py), with the parts the loop uses: `param_groups` (whose "lr" the
loop's schedule sets), `zero_grad` and `step`. Each update is a few `torch._foreach_*` calls over all
parameters of a group, so a step is a handful of kernels on CUDA, not a handful per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class _Optimizer:
    """One parameter group, and per-parameter state."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **defaults: Any):
        ps = list(params)
        if not ps:
            raise ValueError("the optimiser got no parameters")
        self.param_groups: list[dict[str, Any]] = [{"params": ps, **defaults}]
        self.state: dict[torch.Tensor, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (the others are skipped, as torch skips them)."""
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                self._update(group, ps, [p.grad for p in ps])

    def _update(self, group: dict[str, Any], ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        raise NotImplementedError


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter): per parameter θ, with gradient g at step t,
    θ ← θ(1 − lr·wd); m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²;
    θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _update(self, group: dict[str, Any], ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state.setdefault(p, {}) for p in ps]
        for p, st in zip(ps, states, strict=True):
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                          exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            st["step"] += 1
        m = [st["exp_avg"] for st in states]
        v = [st["exp_avg_sq"] for st in states]
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        steps = [float(st["step"]) for st in states]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - b2**t) ** 0.5 for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, m, denom, [-(lr / (1 - b1**t)) for t in steps])


class SGD(_Optimizer):
    """SGD with L2 weight decay and (non-Nesterov) momentum without dampening: g ← g + wd·θ;
    b ← g on the first step, else momentum·b + g; θ ← θ − lr·b (b = g when momentum is 0)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _update(self, group: dict[str, Any], ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd != 0:
            grads = torch._foreach_add(grads, ps, alpha=wd)
        if mom != 0:
            old: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, gradient) of parameters stepped before
            for p, g in zip(ps, grads, strict=True):
                st = self.state.setdefault(p, {})
                if "momentum_buffer" in st:
                    old.append((st["momentum_buffer"], g))
                else:
                    st["momentum_buffer"] = g.detach().clone()
            if old:
                torch._foreach_mul_([b for b, _ in old], mom)
                torch._foreach_add_([b for b, _ in old], [g for _, g in old])
            grads = [self.state[p]["momentum_buffer"] for p in ps]
        torch._foreach_add_(ps, grads, alpha=-lr)
