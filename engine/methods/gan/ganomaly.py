"""GANomaly (Akçay, Atapour-Abarghouei and Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018).

Generator: encoder G_E -> decoder G_D -> encoder E, so an image x gives a latent z = G_E(x), a
reconstruction x̂ = G_D(z) and a re-encoded latent ẑ = E(x̂). A discriminator D (a DCGAN encoder and a
classifier) is trained with binary cross-entropy to tell x from x̂; the generator minimises
    w_adv · ‖f(x) − f(x̂)‖²  (feature matching on D's last conv features)
  + w_con · ‖x − x̂‖₁        (contextual loss)
  + w_enc · ‖z − ẑ‖²        (encoder loss),  w_adv = 1, w_con = 50, w_enc = 1.
The networks are the paper's DCGAN ones: encoders of 4x4 stride-2 convs from `ngf` channels, doubling until a
4x4 map, then a 4x4 conv to the nz = 100 latent; the decoder mirrors them with transposed convs, BN + ReLU,
and a tanh output (images scaled to [−1, 1]).
Anomaly score, as the paper's Eq. 8: A(x) = ‖G_E(x) − E(G(x))‖₁ (here its mean over the latent dimensions),
kept raw (the paper min-max scales it over the test set, which does not change any ranking).

Images are resized internally to `size`×`size` (a power of two ≥ 16; the paper's 32 px for CIFAR-10).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from engine.api import ConfigError, ImageSet, MethodFailure, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# Below this fraction of the real images' spread across the batch, reconstructions count as collapsed.
COLLAPSE_RATIO = 0.05
# The paper's code re-initialises D when its loss falls below this.
D_REINIT_BELOW = 1e-5


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] -> (N, 3, size, size), antialiased bilinear."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def dcgan_init_(module: nn.Module, generator: torch.Generator) -> None:
    """DCGAN initialisation in place: conv/linear weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0.

    Works on spectrally normalised layers too (initialises the parametrisation's `original` weight).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                w.copy_(torch.randn(w.shape, generator=generator) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * 0.02)
                m.bias.zero_()
                m.reset_running_stats()


def dcgan_encoder(size: int, nc: int, ngf: int, nz: int, extra_layers: int = 0) -> tuple[nn.Sequential, nn.Conv2d]:
    """The paper's DCGAN encoder as (features, final conv): (N, nc, size, size) -> features (N, C, 4, 4) ->
    (N, nz, 1, 1). Conv 4x4/2 (nc -> ngf) + LeakyReLU(0.2); `extra_layers` Conv 3x3 + BN + LeakyReLU; then
    Conv 4x4/2 + BN + LeakyReLU doubling the channels until the map is 4x4; a final Conv 4x4 (no padding) to nz."""
    layers: list[nn.Module] = [nn.Conv2d(nc, ngf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    c, s = ngf, size // 2
    for _ in range(extra_layers):
        layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
    while s > 4:
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, inplace=True)]
        c, s = 2 * c, s // 2
    return nn.Sequential(*layers), nn.Conv2d(c, nz, 4, 1, 0, bias=False)


class DCGANEncoder(nn.Module):
    """(N, nc, size, size) -> (N, nz) (see dcgan_encoder)."""

    def __init__(self, size: int, nc: int, ngf: int, nz: int, extra_layers: int = 0):
        super().__init__()
        self.features, self.final = dcgan_encoder(size, nc, ngf, nz, extra_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(x)).flatten(1)


class DCGANDecoder(nn.Module):
    """The paper's DCGAN decoder: (N, nz) -> (N, nc, size, size) in [−1, 1]. ConvT 4x4 (nz -> C, 1 -> 4 px) + BN
    + ReLU, ConvT 4x4/2 + BN + ReLU halving the channels up to size/2, `extra_layers` Conv 3x3 + BN + ReLU, a
    final ConvT 4x4/2 to nc and tanh. C = ngf · size / 8 mirrors the encoder's last width."""

    def __init__(self, size: int, nc: int, ngf: int, nz: int, extra_layers: int = 0):
        super().__init__()
        c = ngf * size // 8
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        s = 4
        while s < size // 2:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c, s = c // 2, s * 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.ConvTranspose2d(c, nc, 4, 2, 1, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.body(z[:, :, None, None])))


class GANomalyGenerator(nn.Module):
    """Encoder-decoder-encoder: x (N, 3, S, S) in [−1, 1] -> (x̂ (N, 3, S, S) in [−1, 1], z (N, nz), ẑ (N, nz))."""

    def __init__(self, size: int, ngf: int, nz: int, extra_layers: int = 0):
        super().__init__()
        self.encoder1 = DCGANEncoder(size, 3, ngf, nz, extra_layers)
        self.decoder = DCGANDecoder(size, 3, ngf, nz, extra_layers)
        self.encoder2 = DCGANEncoder(size, 3, ngf, nz, extra_layers)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, nz) -> x̂ (N, 3, S, S)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decode(z)
        return fake, z, self.encoder2(fake)


class GANomalyDiscriminator(nn.Module):
    """The DCGAN encoder with a single output: x (N, 3, S, S) -> (logits (N,), features (N, C, 4, 4)).

    `spectral`: spectral norm on every conv (not in the paper; off by default)."""

    def __init__(self, size: int, ngf: int, extra_layers: int = 0, spectral: bool = False):
        super().__init__()
        self.features, self.classifier = dcgan_encoder(size, 3, ngf, 1, extra_layers)
        if spectral:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    _spectral_norm(m)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f).flatten(), f


@register(
    family="gan", name="ganomaly", localises=True, paper="Akçay et al., ACCV 2018",
    summary="Encoder-decoder-encoder generator trained adversarially on normal images; score = distance "
            "between the image's latent code and the re-encoded reconstruction's.",
    notes="Follows the paper: DCGAN encoder-decoder-encoder and discriminator (4x4 convs from ngf = 64 channels "
          "doubling to a 4x4 map, nz = 100, BN, LeakyReLU 0.2 / ReLU, tanh output), losses w_adv = 1 (feature "
          "matching on D's last features), w_con = 50 (L1), w_enc = 1 (L2), D trained with BCE and re-initialised "
          "when its loss falls below 1e-5 (the authors' code), Adam lr 2e-4, β = (0.5, 0.999), batch 64, DCGAN "
          "initialisation; score = mean |G_E(x) − E(G(x))| (Eq. 8, L1), raw rather than min-max scaled over the "
          "test set (same ranking). Images are resized to `size` = 64 px. Training length: the paper's 15 epochs "
          "are over thousands of images; on the tens of images here quality trains up to 3000 steps. fast "
          "(reduced): ngf 16 and 300 steps. Additions outside the paper: the pixel map (smoothed |x − x̂|, the "
          "paper has none; weak on textures) and `score='reconstruction'`. Mode collapse and a runaway "
          "discriminator are reported in the run notes; all-equal or non-finite scores fail the run. Known "
          "weakness: on textures the latent score is near chance (the paper evaluates on objects).",
    trained=True, uses_backbone=False,
    presets={
        "test": {"ngf": 16, "epochs": 60, "max_steps": 120, "batch_size": 8, "lr": 2e-3},
        "fast": {"ngf": 16, "epochs": 300, "max_steps": 300, "batch_size": 16},
        "quality": {"epochs": 3000, "max_steps": 3000},
    },
    reduced_presets=("test", "fast"),
)
class GANomaly(BaseDetector):
    """GANomaly: adversarially trained encoder-decoder-encoder; anomaly score = mean |G_E(x) − E(G_D(G_E(x)))|."""

    square_input = True  # resizes every image to size x size

    def __init__(self, size: int = 64, ngf: int = 64, nz: int = 100, extra_layers: int = 0, w_adv: float = 1.0,
                 w_con: float = 50.0, w_enc: float = 1.0, spectral_norm: bool = False, score: str = "latent",
                 epochs: int = 15, lr: float = 2e-4, batch_size: int = 64, sigma: float = 2.0,
                 max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.ngf = ngf
        self.nz = nz
        self.extra_layers = extra_layers
        self.w_adv = w_adv
        self.w_con = w_con
        self.w_enc = w_enc
        self.spectral_norm = spectral_norm
        self.score = score
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> None:
        if self.score not in ("latent", "reconstruction"):
            raise ConfigError(f"ganomaly: score must be 'latent' (the paper's) or 'reconstruction', not {self.score!r}")
        if self.size < 16 or self.size & (self.size - 1):
            raise ConfigError(f"ganomaly: size must be a power of two ≥ 16 (the DCGAN networks halve it down to "
                              f"4 px), got {self.size}")
        self.netg_ = GANomalyGenerator(self.size, self.ngf, self.nz, self.extra_layers).to(self.device_)

    def _prepare(self, images: ImageSet) -> torch.Tensor:
        """(N, 3, size, size) float in [−1, 1] on the working device."""
        return (resize_images(images.float_images(), self.size) * 2 - 1).to(self.device_)

    # --- training ---------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        with torch.random.fork_rng(devices=[]):  # spectral norm draws its start vectors from the global RNG
            torch.manual_seed(self.seed)
            self._build()
            netd = GANomalyDiscriminator(self.size, self.ngf, self.extra_layers, self.spectral_norm).to(self.device_)
        g = self.generator_
        dcgan_init_(self.netg_, g)
        dcgan_init_(netd, g)
        x_all = self._prepare(train)
        cache: dict[str, Any] = {}
        log: list[tuple[float, float, float, float]] = []  # per batch: d, adv, con, enc
        reinits = [0]
        last_d = [1.0]

        def d_loss(idx: torch.Tensor) -> torch.Tensor:
            if last_d[0] < D_REINIT_BELOW:  # the paper's code: restart a discriminator that has won outright
                dcgan_init_(netd, g)
                reinits[0] += 1
            x = x_all[idx.to(self.device_)]
            fake, z, zo = self.netg_(x)
            cache.update(idx=idx, x=x, fake=fake, z=z, zo=zo)
            real_logit, _ = netd(x)
            fake_logit, _ = netd(fake.detach())
            loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logit.float(), torch.ones_like(real_logit.float()))
                          + F.binary_cross_entropy_with_logits(fake_logit.float(),
                                                               torch.zeros_like(fake_logit.float())))
            last_d[0] = float(loss.detach())
            return loss

        def g_terms(x: torch.Tensor, fake: torch.Tensor, z: torch.Tensor, zo: torch.Tensor,
                    adversarial: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            adv = F.mse_loss(netd(fake)[1].float(), netd(x)[1].float().detach()) if adversarial else x.new_zeros(())
            return adv, F.l1_loss(fake.float(), x.float()), F.mse_loss(zo.float(), z.float())

        def g_loss(idx: torch.Tensor) -> torch.Tensor:
            if cache.get("idx") is idx:
                x, fake, z, zo = cache["x"], cache["fake"], cache["z"], cache["zo"]
            else:
                x = x_all[idx.to(self.device_)]
                fake, z, zo = self.netg_(x)
            cache.clear()
            adv, con, enc = g_terms(x, fake, z, zo)
            log.append((last_d[0], float(adv.detach()), float(con.detach()), float(enc.detach())))
            return self.w_adv * adv + self.w_con * con + self.w_enc * enc

        def val_loss(idx: torch.Tensor) -> float:
            x = x_all[idx.to(self.device_)]
            _, con, enc = g_terms(x, *self.netg_(x), adversarial=False)
            return float(self.w_con * con + self.w_enc * enc)

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, weight_decay=0.0, grad_clip=None, seed=self.seed,
                          patience=max(5, self.epochs // 3))
        objectives = [Objective(netd.parameters(), d_loss, name="discriminator", betas=(0.5, 0.999)),
                      Objective(self.netg_.parameters(), g_loss, name="generator", betas=(0.5, 0.999))]
        res = train_loop(objectives, len(train), cfg, modules=[self.netg_, netd], device=self.device_,
                         progress=progress, val_loss=val_loss)
        self.history_ = res.history
        self.run_notes_ = {"training": self._diagnose(x_all, log, reinits[0], res.summary()),
                           "resolution": f"trained and scored at {self.size}×{self.size} px"}

    def _diagnose(self, x_all: torch.Tensor, log: list[tuple[float, float, float, float]], reinits: int,
                  summary: str) -> str:
        """Check for mode collapse and a runaway discriminator; raise MethodFailure when scores are unusable."""
        with torch.no_grad():
            fake, z, zo = self._forward_batches(x_all)
        scores = self._scores(x_all, fake, z, zo)
        if not torch.isfinite(scores).all() or not torch.isfinite(fake).all():
            raise MethodFailure("ganomaly: training diverged (non-finite latents or reconstructions); "
                                "try a lower lr or fewer epochs")
        spread = float(scores.max() - scores.min())
        if len(scores) > 1 and spread <= 1e-9 * max(1.0, float(scores.abs().max())):
            raise MethodFailure(f"ganomaly: the generator collapsed: every training image gets the same {self.score} "
                                "score, so its scores cannot rank anomalies; try another seed, a lower lr or "
                                "fewer epochs")
        msgs: list[str] = [summary]
        if len(x_all) > 1:
            real_sd = float(x_all.std(0).mean())
            fake_sd = float(fake.std(0).mean())
            if real_sd > 0 and fake_sd < COLLAPSE_RATIO * real_sd:
                msgs.append(f"WARNING mode collapse: reconstructions are nearly identical across images (spread "
                            f"{fake_sd:.2e} vs {real_sd:.2e} for the inputs); scores may be unreliable")
        if log:
            k = max(1, len(log) // 5)
            first, last = log[:k], log[-k:]
            d_last = sum(r[0] for r in last) / k
            adv_first = sum(r[1] for r in first) / k
            adv_last = sum(r[1] for r in last) / k
            if d_last < 1e-3 and adv_last > 10 * max(adv_first, 1e-8):
                msgs.append(f"WARNING divergence: the discriminator loss went to {d_last:.1e} while the "
                            f"adversarial loss grew {adv_last / max(adv_first, 1e-8):.0f}×")
            msgs.append(f"last losses: D {d_last:.3g}, adv {adv_last:.3g}, con {sum(r[2] for r in last) / k:.3g}, "
                        f"enc {sum(r[3] for r in last) / k:.3g}")
        if reinits:
            msgs.append(f"discriminator re-initialised {reinits}× (its loss fell below {D_REINIT_BELOW:g})")
        return "; ".join(msgs)

    # --- inference ----------------------------------------------------------------------------------
    def _forward_batches(self, x: torch.Tensor, bs: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, 3, S, S) -> (x̂ (N, 3, S, S), z (N, nz), ẑ (N, nz)), in eval mode, batched."""
        self.netg_.eval()
        outs = [self.netg_(x[s:s + bs]) for s in range(0, x.shape[0], bs)]
        return tuple(torch.cat([o[i].float() for o in outs]) for i in range(3))  # type: ignore[return-value]

    def _scores(self, x: torch.Tensor, fake: torch.Tensor, z: torch.Tensor, zo: torch.Tensor) -> torch.Tensor:
        """(N,) scores: mean |z − ẑ| over the nz latent dims ("latent", the paper's Eq. 8) or mean |x − x̂|."""
        if self.score == "latent":
            return (z - zo).abs().mean(1)
        return (x - fake).abs().flatten(1).mean(1)

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._prepare(images)
        fake, z, zo = self._forward_batches(x)
        scores = self._scores(x, fake, z, zo).cpu()
        residual = (x - fake).abs().mean(1).cpu() / 2  # (N, S, S), on the [0, 1] scale
        return Prediction(scores=scores, maps=to_pixel_map(residual, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return module_state("netg", self.netg_)

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build()
        load_module_state("netg", self.netg_, tensors)
        self.netg_.eval()
