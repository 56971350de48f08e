"""The one training loop every gradient-trained method uses (DESIGN §2).

A method describes what to optimise as one or more `Objective`s (parameters + a loss over a batch of
item indices); the loop owns epochs or a time budget, shuffling with the run's seed, a held-out slice
of the normal images for early stopping, AdamW, mixed precision (CUDA; bf16 on CPUs with AMX for the methods
that allow it) and progress reports. Several objectives are stepped in order on every batch (e.g. a GAN's
discriminator then its generator).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.api import MethodFailure, Progress, no_progress
from engine.components import optim
from engine.device import conv_layout, train_autocast, train_precision
from engine.threads import refresh as refresh_threads


@dataclass
class TrainConfig:
    """epochs: passes over the training slice; max_steps caps the optimiser steps (so a large dataset
    trains for a bounded time, DESIGN §2 presets); time_budget_s stops earlier when set.
    val_fraction of the items is held out (at least 1 item when there are ≥ 4) for early stopping
    with `patience` epochs; batch_size is for CPU, cuda_batch_size on CUDA. lr_milestones are fractions of
    the planned optimiser steps at which every learning rate is multiplied by lr_gamma (a paper's step
    schedule, e.g. DRAEM's (0.8, 0.9) with γ = 0.2); empty: a constant learning rate."""

    epochs: int = 20
    max_steps: int | None = None
    time_budget_s: float | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 8
    cuda_batch_size: int = 32
    val_fraction: float = 0.1
    patience: int = 5
    min_delta: float = 1e-4
    grad_clip: float | None = 5.0
    seed: int = 0
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    optimizer: str = "adamw"  # "adamw" (betas from each Objective) or "sgd" (with `momentum`, a paper's choice)
    momentum: float = 0.9


@dataclass
class Objective:
    """`loss(idx)` returns a scalar loss for the items `idx` (int64 tensor of positions)."""

    params: Iterable[nn.Parameter]
    loss: Callable[[torch.Tensor], torch.Tensor]
    name: str = "loss"
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = "epochs"  # "epochs" | "max_steps" | "early_stop" | "time_budget"
    steps: int = 0
    precision: str = "fp32"  # engine.device.train_precision: "fp32" | "bf16-mixed" | "fp16-mixed"

    def summary(self) -> str:
        """One line for the run's notes, e.g. '600 steps in 2 epochs; stopped at the step cap (best epoch 2)'."""
        why = {"epochs": "all epochs run", "max_steps": "stopped at the preset's step cap",
               "early_stop": "stopped early (held-out loss no longer improving)",
               "time_budget": "stopped at the time budget"}.get(self.stopped, self.stopped)
        best = f", best epoch {self.best_epoch} kept" if self.best_epoch > 0 else ""
        prec = "" if self.precision == "fp32" else f" ({self.precision})"
        return f"{self.steps} steps in {len(self.history)} epochs{prec}, {self.seconds:.0f} s; {why}{best}"
    seconds: float = 0.0


def split_indices(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of range(n) into (train, val); val is empty when n < 4 or val_fraction is 0."""
    perm = torch.randperm(n, generator=generator)
    n_val = 0 if n < 4 or val_fraction <= 0 else max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def batch_starts(n_train: int, bs: int) -> range:
    """Start offsets of the batches an epoch takes from `n_train` items. A lone last item is skipped unless it
    is the only one: it would give BatchNorm a batch of one."""
    end = n_train - 1 if n_train >= 2 and n_train % bs == 1 else n_train
    return range(0, end, bs)


def batches_per_epoch(n_train: int, bs: int) -> int:
    """Batches the loop takes from `n_train` items per epoch."""
    return len(batch_starts(n_train, bs))


def planned_epochs(n_train: int, bs: int, epochs: int, max_steps: int | None) -> int:
    """Epochs the loop will run at most: `epochs`, fewer when `max_steps` is reached first."""
    if max_steps is None:
        return epochs
    return max(1, min(epochs, math.ceil(max_steps / max(1, batches_per_epoch(n_train, bs)))))


def lr_factor(step: int, total_steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """The learning-rate multiplier at optimiser step `step` (0-based) of `total_steps`: gamma^k, k = the number
    of milestones (fractions of total_steps) already reached."""
    return gamma ** sum(step >= round(m * total_steps) for m in milestones)


def _optimizer(o: Objective, cfg: TrainConfig) -> optim.AdamW | optim.SGD:
    lr = o.lr or cfg.lr
    if cfg.optimizer == "sgd":
        return optim.SGD(list(o.params), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return optim.AdamW(list(o.params), lr=lr, weight_decay=cfg.weight_decay, betas=o.betas)
    raise ValueError(f"optimizer {cfg.optimizer!r}: use 'adamw' or 'sgd'")


def train_loop(objectives: Objective | list[Objective], n_items: int, cfg: TrainConfig, *,
               modules: list[nn.Module], device: str = "cpu", progress: Progress = no_progress,
               val_loss: Callable[[torch.Tensor], float] | None = None) -> TrainResult:
    """Train `modules` by stepping each objective on every batch of item indices.

    Early stopping watches `val_loss(val_idx)` (default: the first objective's loss on the held-out
    slice, without gradients) and restores the best weights at the end. Raises MethodFailure when a
    loss becomes non-finite.
    """
    objs = objectives if isinstance(objectives, list) else [objectives]
    for m in modules:
        conv_layout(m, device)
    g = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = split_indices(n_items, cfg.val_fraction, g)
    bs = cfg.cuda_batch_size if device.startswith("cuda") else cfg.batch_size
    opts = [_optimizer(o, cfg) for o in objs]
    all_params = [p for o in opts for grp in o.param_groups for p in grp["params"]]
    res = TrainResult(precision=train_precision(device))
    best = math.inf
    best_state: list[dict[str, torch.Tensor]] | None = None
    since_best = 0
    n_epochs = planned_epochs(len(train_idx), bs, cfg.epochs, cfg.max_steps)
    total_steps = n_epochs * batches_per_epoch(len(train_idx), bs)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    base_lrs = [[grp["lr"] for grp in opt.param_groups] for opt in opts]
    t0 = time.perf_counter()
    for epoch in range(n_epochs):
        refresh_threads()  # other adlab jobs may have started or ended since the last epoch
        for m in modules:
            m.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        sums = [0.0] * len(objs)
        batches = 0
        for s in batch_starts(len(perm), bs):
            if cfg.max_steps is not None and res.steps >= cfg.max_steps:
                break
            idx = perm[s:s + bs]
            if cfg.lr_milestones:
                f = lr_factor(res.steps, total_steps, cfg.lr_milestones, cfg.lr_gamma)
                for opt, lrs in zip(opts, base_lrs, strict=True):
                    for grp, lr in zip(opt.param_groups, lrs, strict=True):
                        grp["lr"] = lr * f
            for k, (o, opt) in enumerate(zip(objs, opts, strict=True)):
                opt.zero_grad(set_to_none=True)
                with train_autocast(device):
                    loss = o.loss(idx)
                if not torch.isfinite(loss):
                    value = float(loss.detach())
                    raise MethodFailure(f"training diverged: {o.name} became {value} in epoch {epoch + 1}")
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip)
                opt.step()
                sums[k] += float(loss.detach())
            batches += 1
            res.steps += 1
        for m in modules:
            m.eval()
        rec: dict[str, Any] = {"epoch": epoch + 1}
        for o, sm in zip(objs, sums, strict=True):
            rec[o.name] = sm / max(1, batches)
        if len(val_idx):
            with torch.no_grad(), train_autocast(device):
                v = float(val_loss(val_idx)) if val_loss else float(objs[0].loss(val_idx))
            rec["val_loss"] = v
            if v < best - cfg.min_delta:
                best, since_best, res.best_epoch = v, 0, epoch + 1
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            else:
                since_best += 1
        elapsed = time.perf_counter() - t0
        rec["seconds"] = round(elapsed, 3)
        res.history.append(rec)
        eta = elapsed / (epoch + 1) * (n_epochs - epoch - 1)
        progress("train", (epoch + 1) / n_epochs, {**rec, "of": n_epochs, "eta_s": round(eta, 1)})
        if len(val_idx) and since_best >= cfg.patience:
            res.stopped = "early_stop"
            break
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            res.stopped = "time_budget"
            break
    else:
        if cfg.max_steps is not None and res.steps >= cfg.max_steps \
                and res.steps < cfg.epochs * batches_per_epoch(len(train_idx), bs):
            res.stopped = "max_steps"
    if best_state is not None:
        for m, sd in zip(modules, best_state, strict=True):
            m.load_state_dict(sd)
    for m in modules:
        m.eval()
    res.seconds = time.perf_counter() - t0
    return res
