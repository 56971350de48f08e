"""Neural batch sampler (Chu & Kitani, "Neural Batch Sampling with Reinforcement Learning for Semi-Supervised
Anomaly Detection", ECCV 2020).

Key observation of the paper: while an autoencoder is trained by SGD on mostly normal data, the reconstruction
loss of a normal sample keeps falling while that of an anomalous sample fluctuates or stays high. The sequence of
a sample's losses over training (its *loss profile*) is therefore a feature for a classifier that separates the
two. A reinforcement-learning policy (the neural batch sampler) chooses the autoencoder's training batches so as
to amplify the difference between the loss profiles of anomalous and normal data.

Here, on image patches (so the classifier's patch outputs form the anomaly map):
  1. Patches of the normal training images form the autoencoder's pool; a quarter of the normal images is held
     out, as is every labelled anomaly (neither is ever trained on, like the images scored later).
  2. Each step the policy (an MLP on each pool patch's state: its current log loss and its log-loss change since
     the last refresh) gives a softmax over the pool; a batch is drawn from it and the autoencoder takes one step.
     Reward = the change, over that step, of the gap between the mean log loss of labelled anomalous patches and
     that of held-out normal patches. The policy is updated by REINFORCE with a moving-average baseline.
  3. The autoencoder's weights are saved at T evenly spaced steps; a patch's loss profile is its T losses under
     those weights (so new images get a profile after fit, too).
  4. A classifier (MLP on the standardised log loss profile) is trained on held-out normal patches (label 0) and
     patches of labelled anomalies inside their masks (label 1; every patch when an anomaly has no mask), at most
     `max_profile_patches` of each.
Score: the largest patch logit of an image; map: the patch logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.nets import ConvDecoder, ConvEncoder
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.components.weak_training import augmented_anomalies, seeded_module, virtual_pool
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# --- the paper's pieces ---------------------------------------------------------------------------------------


def loss_gap(anomalous_losses: torch.Tensor, normal_losses: torch.Tensor) -> torch.Tensor:
    """Mean log loss of anomalous patches minus that of normal patches (scalar); what the sampler amplifies."""
    return anomalous_losses.clamp_min(1e-12).log().mean() - normal_losses.clamp_min(1e-12).log().mean()


def sampler_reward(gap_before: float, gap_after: float) -> float:
    """The sampler's reward for one autoencoder step: how much the step widened the anomalous-normal loss gap."""
    return gap_after - gap_before


def reinforce_loss(log_probs: torch.Tensor, reward: float, baseline: float) -> torch.Tensor:
    """REINFORCE surrogate: −(reward − baseline) · mean log π(chosen). log_probs (B,) of the drawn batch.

    Its gradient step raises the probability of the chosen samples when the reward beat the baseline.
    """
    return -(reward - baseline) * log_probs.mean()


class SamplerPolicy(nn.Module):
    """Scores every pool item from its state; forward: (P, S) states -> (P,) log-probabilities (softmax)."""

    def __init__(self, state_dim: int = 2, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(states)[:, 0], 0)


class PatchAE(nn.Module):
    """Small convolutional autoencoder on patches: (N, 3, p, p) -> (N, 3, p, p) in [0, 1]."""

    def __init__(self, widths: tuple[int, ...], latent_channels: int):
        super().__init__()
        self.enc = ConvEncoder(3, widths, latent_channels)
        self.dec = ConvDecoder(3, widths, latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class ProfileClassifier(nn.Module):
    """MLP on standardised log loss profiles: (N, T) -> (N,) anomaly logits."""

    def __init__(self, t: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(t, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


def to_patches(x: torch.Tensor, patch: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, C, H, W) -> ((N·h·w, C, patch, patch), (h, w)), patches in row-major grid order per image."""
    n, c = x.shape[:2]
    u = x.unfold(2, patch, stride).unfold(3, patch, stride)          # (N, C, h, w, p, p)
    h, w = u.shape[2], u.shape[3]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(n * h * w, c, patch, patch).contiguous(), (h, w)


@register(
    family="weakly_supervised", name="neural_batch_sampler", localises=True, supervision="weak",
    paper="Chu & Kitani, ECCV 2020",
    summary="An autoencoder trained on patches while a reinforcement-learning policy picks its batches to widen the "
            "gap between the losses of anomalous and normal patches; a classifier on each patch's loss profile "
            "(its losses over training) gives the map and the score.",
    notes="Built from the paper's description (loss profiles, an RL batch sampler that amplifies their difference, "
          "a classifier on profiles); the exact networks, state, reward and schedule of the paper are not "
          "reproduced. Ours: 16×16 patches at stride 8 of 64 px images (quality: 32×32 at stride 16 of 128 px), "
          "small conv autoencoder, policy = MLP over each pool patch's (log loss, change since last refresh) with "
          "a softmax over the pool, reward = change of the anomalous–normal mean log-loss gap over one step, "
          "REINFORCE with a moving-average baseline. The paper's profile is the sequence of losses recorded while "
          "training; here the autoencoder is saved at T = 10 steps and a profile is the T losses under those "
          "weights, so images never seen in training get one after fit like in every adlab method; the sampler "
          "draws from normal patches only, and held-out normal images (a quarter) and the labelled anomalies "
          "stay unseen by the autoencoder so the classifier learns on profiles like those of new images. fast "
          "(reduced): a pool of at most 4096 patches, 64 per class for the reward, 2048 per class for the "
          "classifier (the full pool took 10 min to fit on mvtec screw on this CPU).",
    faithful=False, trained=True, uses_backbone=False,
    presets={"test": {"epochs": 8, "steps_per_epoch": 8, "eval_patches": 64, "max_profile_patches": 256,
                      "cls_epochs": 30},
             "fast": {"epochs": 20, "steps_per_epoch": 20, "eval_patches": 64, "max_pool_patches": 4096,
                      "max_profile_patches": 2048},
             "quality": {"size": 128, "patch": 32, "stride": 16, "widths": (32, 64, 128), "epochs": 100,
                         "steps_per_epoch": 50}},
    reduced_presets=("test", "fast"),
)
class NeuralBatchSampler(BaseDetector):
    """Loss-profile classifier over an autoencoder trained with an RL batch sampler (see the module docstring)."""

    requires_anomalies = True

    def __init__(self, size: int = 64, patch: int = 16, stride: int = 8, widths: tuple[int, ...] = (32, 64),
                 latent_channels: int = 32, n_checkpoints: int = 10, holdout: float = 0.25, policy_hidden: int = 16,
                 baseline_decay: float = 0.9, eval_patches: int = 256, max_profile_patches: int = 4096,
                 max_pool_patches: int | None = None, augment: bool = True, epochs: int = 20,
                 steps_per_epoch: int = 20, batch_size: int = 32, lr: float = 1e-3, policy_lr: float = 1e-2,
                 cls_epochs: int = 50, cls_batch_size: int = 256, seed: int = 0):
        self.size = size
        self.patch = patch
        self.stride = stride
        self.widths = tuple(widths)
        self.latent_channels = latent_channels
        self.n_checkpoints = n_checkpoints
        self.holdout = holdout
        self.policy_hidden = policy_hidden
        self.baseline_decay = baseline_decay
        self.eval_patches = eval_patches
        self.max_profile_patches = max_profile_patches
        self.max_pool_patches = max_pool_patches
        self.augment = augment
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.lr = lr
        self.policy_lr = policy_lr
        self.cls_epochs = cls_epochs
        self.cls_batch_size = cls_batch_size
        self.seed = seed

    # --- data ----------------------------------------------------------------------------------------------
    def _working(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float -> (N, C, size, size)."""
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=x.shape[-1] > self.size).clamp(0, 1)

    def _patches(self, images: ImageSet) -> tuple[torch.Tensor, tuple[int, int]]:
        return to_patches(self._working(images.float_images()), self.patch, self.stride)

    def _anomaly_labels(self, views: ImageSet, grid: tuple[int, int]) -> torch.Tensor:
        """(Na·h·w,) bool: a patch of a labelled anomaly is positive when it overlaps its mask (all without one)."""
        n = len(views)
        lab = torch.ones(n, grid[0] * grid[1], dtype=torch.bool)
        if views.masks is not None and views.has_mask is not None:
            m = self._working(views.masks.float()[:, None])
            frac, _ = to_patches(m, self.patch, self.stride)
            inside = frac.flatten(1).amax(1).view(n, -1) > 0.5
            has = views.has_mask.view(-1, 1)
            lab = torch.where(has, inside, lab)
        return lab.flatten()

    @staticmethod
    def _losses(ae: nn.Module, patches: torch.Tensor, device: str, chunk: int = 2048) -> torch.Tensor:
        """Per-patch mean squared reconstruction error (P,), in eval mode (BatchNorm's running statistics, as the
        saved weights are used later) and without gradients; the module's mode is restored."""
        was_training = ae.training
        ae.eval()
        out = []
        with torch.no_grad():
            for i in range(0, patches.shape[0], chunk):
                x = patches[i:i + chunk].to(device)
                out.append((ae(x).float() - x).pow(2).flatten(1).mean(1).cpu())
        ae.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def _profiles(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, 3, p, p) -> (P, T) log losses under the T saved autoencoder weights."""
        ae = PatchAE(self.widths, self.latent_channels).to(self.device_).eval()
        cols = []
        for t in range(self.n_checkpoints):
            load_module_state(f"ae{t}", ae, self.checkpoints_)
            cols.append(self._losses(ae, patches, self.device_).clamp_min(1e-12).log())
        return torch.stack(cols, 1)

    # --- fit -------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        g = self.generator_
        dev = self.device_
        n_img = len(train)
        n_hold = max(1, int(round(self.holdout * n_img))) if n_img > 1 else 0
        perm = torch.randperm(n_img, generator=g)
        held, fitted = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        if len(fitted) == 0:
            fitted = held
        pool, grid = self._patches(train.subset(fitted.tolist()))                  # AE's pool (P, 3, p, p)
        if self.max_pool_patches is not None and pool.shape[0] > self.max_pool_patches:
            # The policy scores, and every refresh re-evaluates, the whole pool: bound it by a seeded subset.
            pool = pool[torch.randperm(pool.shape[0], generator=g)[: self.max_pool_patches]]
        held_p, _ = self._patches(train.subset(held.tolist()))                     # unseen normal patches
        views = augmented_anomalies(anomalies, self.augment)
        anom_p, _ = self._patches(views)
        anom_lab = self._anomaly_labels(views, grid)
        pos = anom_p[anom_lab] if bool(anom_lab.any()) else anom_p
        eval_a = pos[torch.randperm(pos.shape[0], generator=g)[: self.eval_patches]]
        eval_n = held_p[torch.randperm(held_p.shape[0], generator=g)[: self.eval_patches]]

        ae = seeded_module(lambda: PatchAE(self.widths, self.latent_channels), self.seed).to(dev)
        policy = seeded_module(lambda: SamplerPolicy(2, self.policy_hidden), self.seed + 1).to(dev)
        total = self.epochs * self.steps_per_epoch
        save_at: dict[int, list[int]] = {}  # step -> checkpoints taken after it (several when steps < T)
        for t in range(self.n_checkpoints):
            save_at.setdefault(max(1, round((t + 1) * total / self.n_checkpoints)), []).append(t)
        checkpoints: dict[str, torch.Tensor] = {}
        st: dict[str, Any] = {"step": 0, "baseline": 0.0, "rewards": []}

        def refresh() -> None:
            cur = self._losses(ae, pool, dev).clamp_min(1e-12).log()
            st["prev"] = st.get("cur", cur)
            st["cur"] = cur
            st["gap"] = float(loss_gap(self._losses(ae, eval_a, dev), self._losses(ae, eval_n, dev)))

        def ae_loss(idx: torch.Tensor) -> torch.Tensor:
            if st["step"] % self.steps_per_epoch == 0:
                refresh()
            states = torch.stack([st["cur"], st["cur"] - st["prev"]], 1).to(dev)
            logp = policy(states)                                                   # (P,)
            chosen = torch.multinomial(logp.detach().exp().cpu(), len(idx), replacement=True, generator=g)
            st["logp"] = logp[chosen.to(dev)]
            x = pool[chosen].to(dev)
            err = (ae(x).float() - x).pow(2).flatten(1).mean(1)
            with torch.no_grad():
                st["cur"][chosen] = err.detach().clamp_min(1e-12).log().cpu()
            return err.mean()

        def policy_loss(idx: torch.Tensor) -> torch.Tensor:
            gap = float(loss_gap(self._losses(ae, eval_a, dev), self._losses(ae, eval_n, dev)))
            reward = sampler_reward(st["gap"], gap)
            st["gap"] = gap
            loss = reinforce_loss(st.pop("logp"), reward, st["baseline"])
            st["baseline"] = self.baseline_decay * st["baseline"] + (1 - self.baseline_decay) * reward
            st["rewards"].append(reward)
            st["step"] += 1
            for t in save_at.get(st["step"], []):
                checkpoints.update({f"ae{t}.{k}": v.detach().cpu().clone() for k, v in ae.state_dict().items()})
            return loss

        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=0.0, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed)
        train_loop([Objective(ae.parameters(), ae_loss, name="reconstruction"),
                    Objective(policy.parameters(), policy_loss, name="sampler", lr=self.policy_lr)],
                   virtual_pool(self.steps_per_epoch, self.batch_size), cfg, modules=[ae, policy], device=dev,
                   progress=progress)
        for t in range(self.n_checkpoints):  # fewer steps ran than planned: the rest take the last weights
            if not any(k.startswith(f"ae{t}.") for k in checkpoints):
                checkpoints.update({f"ae{t}.{k}": v.detach().cpu().clone() for k, v in ae.state_dict().items()})
        self.checkpoints_ = checkpoints

        # Classifier on loss profiles: unseen normal patches (0) vs labelled anomalous patches (1), at most
        # `max_profile_patches` of each (a seeded subset; profiles cost T autoencoder passes each).
        cap = self.max_profile_patches
        cls_n = held_p[torch.randperm(held_p.shape[0], generator=g)[:cap]]
        cls_a = pos[torch.randperm(pos.shape[0], generator=g)[:cap]]
        prof = torch.cat([self._profiles(cls_n), self._profiles(cls_a)])
        y = torch.cat([torch.zeros(cls_n.shape[0]), torch.ones(cls_a.shape[0])])
        normal_rows = prof[: cls_n.shape[0]]
        self.prof_mean_, self.prof_std_ = normal_rows.mean(0), normal_rows.std(0).clamp_min(1e-4)
        xs = ((prof - self.prof_mean_) / self.prof_std_).to(dev)
        y = y.to(dev)
        pos_weight = (y == 0).sum().clamp_min(1) / (y == 1).sum().clamp_min(1)
        self.cls_ = seeded_module(lambda: ProfileClassifier(self.n_checkpoints), self.seed + 2).to(dev)

        def cls_loss(idx: torch.Tensor) -> torch.Tensor:
            i = idx.to(dev)
            return F.binary_cross_entropy_with_logits(self.cls_(xs[i]).float(), y[i], pos_weight=pos_weight)

        ccfg = TrainConfig(epochs=self.cls_epochs, lr=1e-3, weight_decay=1e-4, batch_size=self.cls_batch_size,
                           cuda_batch_size=self.cls_batch_size, val_fraction=0.0, seed=self.seed)
        res = train_loop(Objective(self.cls_.parameters(), cls_loss, name="profile_bce"), xs.shape[0], ccfg,
                         modules=[self.cls_], device=dev)
        rewards = st["rewards"]
        self.run_notes_ = {"pool_patches": int(pool.shape[0]), "held_out_images": int(n_hold),
                           "anomalous_patches": int(anom_lab.sum()),
                           "mean_reward": round(sum(rewards) / max(1, len(rewards)), 5),
                           "final_profile_bce": round(res.history[-1]["profile_bce"], 4) if res.history else None}

    # --- predict ---------------------------------------------------------------------------------------------
    def _predict(self, images: ImageSet) -> Prediction:
        patches, grid = self._patches(images)
        prof = (self._profiles(patches) - self.prof_mean_) / self.prof_std_
        with torch.no_grad():
            logits = torch.cat([self.cls_(prof[i:i + 4096].to(self.device_)).float().cpu()
                                for i in range(0, prof.shape[0], 4096)])
        cells = logits.view(len(images), *grid)
        return Prediction(scores=cells.flatten(1).amax(1), maps=to_pixel_map(cells, images.size, 4.0))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"prof_mean": self.prof_mean_, "prof_std": self.prof_std_, **self.checkpoints_,
                **module_state("cls", self.cls_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.prof_mean_, self.prof_std_ = tensors["prof_mean"], tensors["prof_std"]
        self.checkpoints_ = {k: v for k, v in tensors.items() if k.startswith("ae")}
        self.cls_ = ProfileClassifier(self.n_checkpoints)
        load_module_state("cls", self.cls_, tensors)
        self.cls_.to(self.device_).eval()
