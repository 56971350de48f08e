"""Neural batch sampler (Chu & Kitani, "Neural Batch Sampling with Reinforcement Learning for Semi-Supervised
Anomaly Detection", ECCV 2020).

Key observation of the paper: while an autoencoder is trained by SGD on mostly normal data, the reconstruction
loss of a normal sample keeps falling after each gradient update while that of an anomalous sample fluctuates or
stays high. The sequence of a sample's losses during training (its *loss profile*) is the input of a predictor
that separates anomalous from non-anomalous regions. A reinforcement-learning policy (the neural batch sampler)
picks the sequence of training patches p1 … pN so that the profiles it produces are the most discriminative for
the predictor; credit goes to the sampling actions from the reward at the end of the sequence,
R_pred1 = −(the predictor's loss).

What of that is in the stored text of the paper (abstract; the §3 passage on the sampler) is followed; the rest
(networks, sizes, state, schedule) is ours, listed in the registry notes. Here:
  1. Patches of the normal training images form the sampler's pool; a quarter of the normal images is held
     out, as is every labelled anomaly: the autoencoder never trains on them, like on the images scored later,
     and their per-pixel loss profiles are what the predictor learns from.
  2. An episode: a freshly initialised autoencoder takes `steps_per_episode` SGD steps on batches the policy
     draws from the pool (a softmax over the pool from an MLP on each patch's state, see `sampler_states`);
     after every `steps_per_episode / n_records` updates the reconstruction loss around every pixel of the
     held-out and labelled images is recorded (each image passed as a grid of non-overlapping patches, the
     squared error averaged over a `region`×`region` window), so each pixel gets a profile of `n_records` losses.
  3. End of episode: the predictor (a small fully convolutional net on the standardised log profiles) is scored
     on them with a class-balanced pixel BCE; reward = −that loss; the policy takes one REINFORCE step on the sum
     of the episode's log-probabilities with a moving-average baseline, then the predictor trains on the
     episode's profiles.
  4. A last episode with the learned policy keeps the autoencoder's weights at the `n_records` recording points;
     a new image's profile is its per-pixel losses under those weights (the losses it would have had, evaluated
     after each of those updates), so images unseen in training get one after fit, like in every adlab method.
     The predictor is fine-tuned on that episode's profiles.
Map: the predictor's pixel logits (smoothed); score: the map's maximum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.nets import ConvDecoder, ConvEncoder, evaluating
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.components.weak_training import augmented_anomalies, seeded_module, virtual_pool
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# --- the paper's pieces ---------------------------------------------------------------------------------------


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class-balanced pixel BCE (scalar): the mean BCE of the positive pixels and that of the negative pixels,
    averaged; a class absent from `targets` is left out. logits, targets: the same shape, targets in {0, 1}.

    Anomalous regions are a small share of the pixels; without the balance the predictor's loss (and so the
    sampler's reward) would barely notice them.
    """
    per = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    pos = targets > 0.5
    terms = [per[m].mean() for m in (pos, ~pos) if bool(m.any())]
    return torch.stack(terms).mean()


def prediction_reward(prediction_loss: float) -> float:
    """The paper's R_pred1: the negative of the predictor's loss on the profiles an episode produced."""
    return -prediction_loss


def reinforce_loss(log_probs: torch.Tensor, reward: float, baseline: float) -> torch.Tensor:
    """REINFORCE surrogate: −(reward − baseline) · mean log π(drawn). log_probs (B,): every draw of an episode.

    Its gradient step raises the probability of the drawn samples when the reward beat the baseline.
    """
    return -(reward - baseline) * log_probs.mean()


def sampler_states(current: torch.Tensor, start: torch.Tensor, progress: float) -> torch.Tensor:
    """The policy's input for every pool patch: (P,) current and episode-start log losses -> (P, 3) rows of
    (current log loss, its fall since the episode began, fraction of the episode done)."""
    return torch.stack([current, start - current, torch.full_like(current, progress)], 1)


def standardise_profiles(log_profiles: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, T, H, W) log loss profiles -> the same, each time step standardised by mean/std (T,) of normal pixels."""
    return (log_profiles - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def profile_stats(log_profiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-time-step mean and std (T,) over the images and pixels of (N, T, H, W) normal log profiles."""
    flat = log_profiles.transpose(0, 1).reshape(log_profiles.shape[1], -1)
    return flat.mean(1), flat.std(1).clamp_min(1e-4)


class SamplerPolicy(nn.Module):
    """Scores every pool item from its state; forward: (P, S) states -> (P,) log-probabilities (softmax)."""

    def __init__(self, state_dim: int = 3, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(states)[:, 0], 0)


class PatchAE(nn.Module):
    """Small convolutional autoencoder on patches: (N, 3, p, p) -> (N, 3, p, p) in [0, 1] (p divisible by
    2^len(widths)); images are scored as a grid of such patches."""

    def __init__(self, widths: tuple[int, ...], latent_channels: int):
        super().__init__()
        self.enc = ConvEncoder(3, widths, latent_channels)
        self.dec = ConvDecoder(3, widths, latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class ProfilePredictor(nn.Module):
    """Per-pixel anomaly logits from standardised log loss profiles: (N, T, H, W) -> (N, H, W)."""

    def __init__(self, t: int, hidden: int = 16):
        super().__init__()
        # One 3×3 layer lets a pixel see its neighbours' profiles; the rest is per pixel (1×1), which keeps the
        # many predictor updates of a fit cheap.
        self.net = nn.Sequential(nn.Conv2d(t, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                 nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


def to_patches(x: torch.Tensor, patch: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, C, H, W) -> ((N·h·w, C, patch, patch), (h, w)), patches in row-major grid order per image."""
    n, c = x.shape[:2]
    u = x.unfold(2, patch, stride).unfold(3, patch, stride)          # (N, C, h, w, p, p)
    h, w = u.shape[2], u.shape[3]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(n * h * w, c, patch, patch).contiguous(), (h, w)


def from_patches(patches: torch.Tensor, n: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_patches` for non-overlapping patches: (n·h·w, C, p, p) -> (n, C, h·p, w·p)."""
    h, w = grid
    c, p = patches.shape[1], patches.shape[-1]
    return patches.view(n, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h * p, w * p)


def region_mean(err: torch.Tensor, region: int) -> torch.Tensor:
    """(N, 1, H, W) -> the same: the mean over the `region`×`region` window centred on each pixel (windows cut at
    the border average what lies inside). A single pixel's squared error is too noisy a loss for a profile."""
    if region <= 1:
        return err
    return F.avg_pool2d(err, region, stride=1, padding=region // 2, count_include_pad=False)


def record_points(steps: int, n_records: int) -> dict[int, list[int]]:
    """Updates done -> the profile entries recorded then: `n_records` points evenly over `steps` updates (several
    at one point when steps < n_records), the last after the final update."""
    at: dict[int, list[int]] = {}
    for t in range(n_records):
        at.setdefault(max(1, round((t + 1) * steps / n_records)), []).append(t)
    return at


@register(
    family="weakly_supervised", name="neural_batch_sampler", localises=True, supervision="weak",
    paper="Chu & Kitani, ECCV 2020",
    summary="Autoencoders trained on patches that a reinforcement-learning policy picks, rewarded by how well a "
            "predictor separates anomalous from normal pixels by their loss profiles (their reconstruction "
            "losses during training); the predictor gives the map and the score.",
    notes="Follows what the stored text of the paper states (the abstract; the §3 passage on the sampler, known "
          "only as quoted in public notes): an autoencoder trained by SGD, a loss profile = the sequence of "
          "reconstruction losses during training, a predictor on the profiles of anomalous and non-anomalous "
          "regions, and an RL sampler choosing the sequence of training patches with reward R_pred1 = −(the "
          "predictor's loss), credited at the end of the sequence. Not faithful because the paper's full text "
          "was not found in any stored copy, so these are not from the paper: the autoencoder's architecture, "
          "patch and input size and optimiser; the profile's length and spacing; the sampler's state, actions, "
          "network and RL details (baseline, episode length, whether the autoencoder restarts per episode), any "
          "reward besides R_pred1; the predictor's architecture; the image score; training lengths; the reported "
          "numbers. Ours: 64 px images, a pool of 16×16 patches at stride 8 (quality: 128 px, 32×32 at stride 16), "
          "small conv autoencoder, one fresh autoencoder per episode; policy = MLP on each pool patch's (log "
          "loss, its fall since the episode began, episode fraction) with a softmax over the pool of normal "
          "patches; a profile of 10 losses evenly spaced over the episode for every pixel, each loss the squared "
          "error averaged over the 7×7 window around it (quality: 13×13); predictor = 3-layer conv net on the "
          "standardised log profiles, class-balanced pixel BCE; REINFORCE (plain SGD) with a moving-average "
          "baseline; profiles of new images from the last episode's saved weights, each image passed as a grid of "
          "non-overlapping patches; score = max of the smoothed map. Held-out normal images (a quarter) and the "
          "labelled anomalies stay unseen by the autoencoder so the predictor learns on profiles like those of "
          "new images. fast (reduced): 8 episodes of 50 steps, a pool of at most 4096 patches, at most 48 images "
          "per class for the profiles.",
    faithful=False, trained=True, uses_backbone=False,
    presets={"test": {"episodes": 2, "steps_per_episode": 8, "n_records": 4, "max_pool_patches": 1024,
                      "max_profile_images": 8, "pred_epochs": 2, "cls_epochs": 30},
             "fast": {"episodes": 8, "steps_per_episode": 50, "max_pool_patches": 4096, "max_profile_images": 48},
             "quality": {"size": 128, "patch": 32, "stride": 16, "widths": (32, 64, 128), "region": 13,
                         "episodes": 40, "steps_per_episode": 200, "n_records": 20}},
    reduced_presets=("test", "fast"),
)
class NeuralBatchSampler(BaseDetector):
    """Loss-profile predictor over autoencoders trained with an RL batch sampler (see the module docstring)."""

    requires_anomalies = True

    def __init__(self, size: int = 64, patch: int = 16, stride: int = 8, widths: tuple[int, ...] = (32, 64),
                 latent_channels: int = 32, region: int = 7, n_records: int = 10, holdout: float = 0.25,
                 policy_hidden: int = 16,
                 baseline_decay: float = 0.8, max_profile_images: int | None = None,
                 max_pool_patches: int | None = None, augment: bool = True, episodes: int = 20,
                 steps_per_episode: int = 50, refresh_every: int = 25, batch_size: int = 32, lr: float = 1e-3,
                 policy_lr: float = 0.1, pred_epochs: int = 5, cls_epochs: int = 50, pred_batch_size: int = 16,
                 seed: int = 0):
        self.size = size
        self.patch = patch
        self.stride = stride
        self.widths = tuple(widths)
        self.latent_channels = latent_channels
        self.region = region
        self.n_records = n_records
        self.holdout = holdout
        self.policy_hidden = policy_hidden
        self.baseline_decay = baseline_decay
        self.max_profile_images = max_profile_images
        self.max_pool_patches = max_pool_patches
        self.augment = augment
        self.episodes = episodes
        self.steps_per_episode = steps_per_episode
        self.refresh_every = refresh_every
        self.batch_size = batch_size
        self.lr = lr
        self.policy_lr = policy_lr
        self.pred_epochs = pred_epochs
        self.cls_epochs = cls_epochs
        self.pred_batch_size = pred_batch_size
        self.seed = seed

    # --- data ----------------------------------------------------------------------------------------------
    def _working(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float -> (N, C, size, size)."""
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=x.shape[-1] > self.size).clamp(0, 1)

    def _pixel_targets(self, views: ImageSet) -> torch.Tensor:
        """(Na, size, size) float: a labelled anomaly's mask at the working size (every pixel without a mask).

        Shrinking keeps every cell that holds a defect pixel (max pooling): thresholding an interpolated mask
        erased thin cracks, leaving some labelled anomalies without a positive pixel.
        """
        n = len(views)
        y = torch.ones(n, self.size, self.size)
        if views.masks is not None and views.has_mask is not None:
            m = views.masks.float()[:, None]
            if m.shape[-1] >= self.size and m.shape[-2] >= self.size:
                m = F.adaptive_max_pool2d(m, (self.size, self.size))
            else:
                m = F.interpolate(m, size=(self.size, self.size), mode="nearest")
            y = torch.where(views.has_mask.view(-1, 1, 1), (m[:, 0] > 0.5).float(), y)
        return y

    def _capped(self, n: int, g: torch.Generator) -> list[int]:
        """Indices of a seeded subset of at most `max_profile_images` of n images (all of them when unset)."""
        cap = self.max_profile_images
        if cap is None or n <= cap:
            return list(range(n))
        return torch.randperm(n, generator=g)[:cap].sort().values.tolist()

    @staticmethod
    def _losses(ae: nn.Module, patches: torch.Tensor, device: str, chunk: int = 2048) -> torch.Tensor:
        """Per-patch mean squared reconstruction error (P,), in eval mode (BatchNorm's running statistics, as the
        saved weights are used later) and without gradients; the module's mode is restored."""
        out = []
        with evaluating(ae):
            for i in range(0, patches.shape[0], chunk):
                x = patches[i:i + chunk].to(device)
                out.append((ae(x).float() - x).pow(2).flatten(1).mean(1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _pixel_log_losses(self, ae: nn.Module, images: torch.Tensor, device: str, chunk: int = 64) -> torch.Tensor:
        """(N, 3, H, W) -> (N, H, W) log reconstruction loss of the region around every pixel: the squared error
        averaged over channels and a `region`×`region` window, in eval mode and without gradients (the module's
        mode is restored)."""
        out = []
        with evaluating(ae):
            for i in range(0, images.shape[0], chunk):
                x = images[i:i + chunk].to(device)
                # The autoencoder sees patches as in training (on whole images, pixels far from a patch border
                # met context it never trained with); the tiles do not overlap, so each pixel is reconstructed once.
                tiles, grid = to_patches(x, self.patch, self.patch)
                err = from_patches((ae(tiles).float() - tiles).pow(2).mean(1, keepdim=True), x.shape[0], grid)
                out.append(region_mean(err, self.region)[:, 0].clamp_min(1e-12).log().cpu())
        return torch.cat(out)

    # --- one episode -----------------------------------------------------------------------------------------
    def _episode(self, pool: torch.Tensor, images: torch.Tensor, policy: SamplerPolicy, episode: int,
                 keep_weights: bool) -> dict[str, Any]:
        """A fresh autoencoder trained for `steps_per_episode` steps on policy-drawn pool batches.

        Returns "profiles" (N, T, H, W) log losses of `images` at the T recording points, "draws" (the states
        (P, 3) and drawn indices (B,) of every step, for the policy's update) and, with keep_weights,
        "weights": the autoencoder's state at each recording point (keys ae{t}.*).
        """
        g, dev = self.generator_, self.device_
        steps = self.steps_per_episode
        ae = seeded_module(lambda: PatchAE(self.widths, self.latent_channels), self.seed + 1000 + episode).to(dev)
        record_at = record_points(steps, self.n_records)
        profiles = torch.empty(images.shape[0], self.n_records, images.shape[-2], images.shape[-1])
        weights: dict[str, torch.Tensor] = {}
        draws: list[tuple[torch.Tensor, torch.Tensor]] = []
        st: dict[str, Any] = {"done": 0}

        def record() -> None:
            for t in record_at.get(st["done"], []):
                profiles[:, t] = self._pixel_log_losses(ae, images, dev)
                if keep_weights:
                    weights.update({f"ae{t}.{k}": v.detach().cpu().clone() for k, v in ae.state_dict().items()})

        def ae_loss(idx: torch.Tensor) -> torch.Tensor:
            record()  # the state after the previous update
            if st["done"] % self.refresh_every == 0:
                cur = self._losses(ae, pool, dev).clamp_min(1e-12).log()
                st.setdefault("start", cur.clone())
                st["cur"] = cur
            states = sampler_states(st["cur"], st["start"], st["done"] / steps)
            with torch.no_grad():
                logp = policy(states.to(dev))
            chosen = torch.multinomial(logp.exp().cpu(), len(idx), replacement=True, generator=g)
            draws.append((states, chosen))
            x = pool[chosen].to(dev)
            err = (ae(x).float() - x).pow(2).flatten(1).mean(1)
            st["cur"][chosen] = err.detach().clamp_min(1e-12).log().cpu()
            st["done"] += 1
            return err.mean()

        cfg = TrainConfig(epochs=1, lr=self.lr, weight_decay=0.0, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed + episode)
        train_loop(Objective(ae.parameters(), ae_loss, name="reconstruction"), virtual_pool(steps, self.batch_size),
                   cfg, modules=[ae], device=dev)
        record()  # after the last update
        return {"profiles": profiles, "draws": draws, "weights": weights}

    def _train_predictor(self, predictor: ProfilePredictor, z: torch.Tensor, y: torch.Tensor, epochs: int,
                         seed: int) -> float:
        """Train on standardised profiles z (N, T, H, W) against pixel targets y (N, H, W); the last epoch's loss."""
        dev = self.device_
        zd, yd = z.to(dev), y.to(dev)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            i = idx.to(dev)
            return balanced_bce(predictor(zd[i]), yd[i])

        cfg = TrainConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, batch_size=self.pred_batch_size,
                          cuda_batch_size=self.pred_batch_size, val_fraction=0.0, seed=seed)
        res = train_loop(Objective(predictor.parameters(), loss, name="profile_bce"), z.shape[0], cfg,
                         modules=[predictor], device=dev)
        return res.history[-1]["profile_bce"] if res.history else float("nan")

    # --- fit -------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        if self.size % self.patch:
            raise ConfigError(f"neural_batch_sampler: size {self.size} must be a multiple of patch {self.patch} "
                              "(images are scored as a grid of whole patches)")
        g, dev = self.generator_, self.device_
        n_img = len(train)
        n_hold = max(1, int(round(self.holdout * n_img))) if n_img > 1 else 0
        perm = torch.randperm(n_img, generator=g)
        held, fitted = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        if len(fitted) == 0:
            fitted = held
        pool, _ = to_patches(self._working(train.subset(fitted.tolist()).float_images()), self.patch, self.stride)
        if self.max_pool_patches is not None and pool.shape[0] > self.max_pool_patches:
            # The policy scores, and every refresh re-evaluates, the whole pool: bound it by a seeded subset.
            pool = pool[torch.randperm(pool.shape[0], generator=g)[: self.max_pool_patches]]
        held = held[self._capped(len(held), g)]
        normal_x = self._working(train.subset(held.tolist()).float_images())
        views = augmented_anomalies(anomalies, self.augment)
        views = views.subset(self._capped(len(views), g))
        anom_x = self._working(views.float_images())
        images = torch.cat([normal_x, anom_x])                                       # the profiled images
        targets = torch.cat([torch.zeros(normal_x.shape[0], self.size, self.size), self._pixel_targets(views)])
        n_normal = normal_x.shape[0]

        policy = seeded_module(lambda: SamplerPolicy(3, self.policy_hidden), self.seed + 1).to(dev)
        predictor = seeded_module(lambda: ProfilePredictor(self.n_records), self.seed + 2).to(dev)
        baseline: float | None = None
        rewards: list[float] = []
        total = self.episodes + 1
        for e in range(self.episodes):
            ep = self._episode(pool, images, policy, e, keep_weights=False)
            z = standardise_profiles(ep["profiles"], *profile_stats(ep["profiles"][:n_normal]))
            with torch.no_grad():
                predictor.eval()
                reward = prediction_reward(float(balanced_bce(predictor(z.to(dev)), targets.to(dev))))
            b = reward if baseline is None else baseline
            draws = ep["draws"]

            def policy_loss(idx: torch.Tensor, draws: list = draws, reward: float = reward,
                            b: float = b) -> torch.Tensor:
                logp = torch.cat([policy(s.to(dev))[c.to(dev)] for s, c in draws])
                return reinforce_loss(logp, reward, b)

            pcfg = TrainConfig(epochs=1, lr=self.policy_lr, weight_decay=0.0, batch_size=1, cuda_batch_size=1,
                               val_fraction=0.0, optimizer="sgd", momentum=0.0, seed=self.seed)
            train_loop(Objective(policy.parameters(), policy_loss, name="sampler"), 1, pcfg, modules=[policy],
                       device=dev)
            baseline = reward if baseline is None else \
                self.baseline_decay * baseline + (1 - self.baseline_decay) * reward
            rewards.append(reward)
            self._train_predictor(predictor, z, targets, self.pred_epochs, self.seed + e)
            progress("train", (e + 1) / total, {"episode": e + 1, "of": self.episodes, "reward": round(reward, 4)})

        final = self._episode(pool, images, policy, self.episodes, keep_weights=True)
        self.checkpoints_ = final["weights"]
        self.prof_mean_, self.prof_std_ = profile_stats(final["profiles"][:n_normal])
        z = standardise_profiles(final["profiles"], self.prof_mean_, self.prof_std_)
        last = self._train_predictor(predictor, z, targets, self.cls_epochs, self.seed + self.episodes)
        progress("train", 1.0, {"episode": total, "of": self.episodes})
        self.predictor_ = predictor.eval()
        self.run_notes_ = {"pool_patches": int(pool.shape[0]), "held_out_images": int(n_hold),
                           "profiled_images": {"normal": n_normal, "anomalous": int(anom_x.shape[0])},
                           "rewards_first_last": [round(rewards[0], 4), round(rewards[-1], 4)] if rewards else None,
                           "final_profile_bce": round(last, 4)}

    # --- predict ---------------------------------------------------------------------------------------------
    def _profiles(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) -> (N, T, size, size) log losses under the T saved autoencoder weights."""
        ae = PatchAE(self.widths, self.latent_channels).to(self.device_).eval()
        out = torch.empty(images.shape[0], self.n_records, images.shape[-2], images.shape[-1])
        for t in range(self.n_records):
            load_module_state(f"ae{t}", ae, self.checkpoints_)
            out[:, t] = self._pixel_log_losses(ae, images, self.device_)
        return out

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._working(images.float_images())
        z = standardise_profiles(self._profiles(x), self.prof_mean_, self.prof_std_)
        logits = torch.cat([self.predictor_(z[i:i + 64].to(self.device_)).float().cpu()
                            for i in range(0, z.shape[0], 64)])
        maps = to_pixel_map(logits, images.size, 4.0)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"prof_mean": self.prof_mean_, "prof_std": self.prof_std_, **self.checkpoints_,
                **module_state("predictor", self.predictor_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.prof_mean_, self.prof_std_ = tensors["prof_mean"], tensors["prof_std"]
        self.checkpoints_ = {k: v for k, v in tensors.items() if k.startswith("ae")}
        self.predictor_ = ProfilePredictor(self.n_records)
        load_module_state("predictor", self.predictor_, tensors)
        self.predictor_.to(self.device_).eval()
