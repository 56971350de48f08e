"""GANomaly (Akçay, Atapour-Abarghouei and Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018).

Generator: encoder G_E -> decoder G_D -> encoder E, so an image x gives a latent z = G_E(x), a
reconstruction x̂ = G_D(z) and a re-encoded latent ẑ = E(x̂). A discriminator D (a conv encoder and a
classifier) is trained with binary cross-entropy to tell x from x̂; the generator minimises
    w_adv · ‖f(x) − f(x̂)‖²  (feature matching on D's last conv features)
  + w_con · ‖x − x̂‖₁        (contextual loss)
  + w_enc · ‖z − ẑ‖²        (encoder loss).
Anomaly score: mean over latent dimensions of (z − ẑ)²; kept raw (no per-call min-max scaling) so scores
from different predict calls are comparable.

Images are resized internally to `size`×`size` (GANomaly works at 32–128 px; default 64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from engine.api import ConfigError, ImageSet, MethodFailure, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.nets import ConvDecoder, ConvEncoder, down_block
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


class GANomalyGenerator(nn.Module):
    """Encoder-decoder-encoder: x (N, 3, S, S) -> (x̂ (N, 3, S, S) in [0, 1], z (N, nz), ẑ (N, nz))."""

    def __init__(self, size: int, widths: tuple[int, ...], nz: int):
        super().__init__()
        kw: dict[str, Any] = {"widths": widths, "latent_channels": widths[-1], "latent": "vector",
                              "latent_dim": nz, "image_size": size}
        self.encoder1 = ConvEncoder(3, **kw)
        self.decoder = ConvDecoder(3, out_activation="sigmoid", **kw)
        self.encoder2 = ConvEncoder(3, **kw)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, nz) -> x̂ (N, 3, S, S)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decode(z)
        return fake, z, self.encoder2(fake)


class GANomalyDiscriminator(nn.Module):
    """Conv encoder (same down blocks as the generator's encoders) + a classifier conv over the last map.

    x (N, 3, S, S) -> (logits (N,), features (N, widths[-1], S / 2^d, S / 2^d)).
    """

    def __init__(self, size: int, widths: tuple[int, ...], spectral: bool = True):
        super().__init__()
        chans = [3, *widths]
        self.features = nn.Sequential(*[down_block(chans[i], chans[i + 1]) for i in range(len(widths))])
        h = size >> len(widths)
        self.classifier = nn.Conv2d(widths[-1], 1, h)
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
    notes="Images are resized to `size`×`size` (default 64; the paper uses 32-128). Score as in the paper "
          "(latent distance), raw rather than min-max scaled over the test set. The paper has no pixel map: the "
          "map here is the smoothed |x − x̂| reconstruction error (an addition, weak on textures). Stabilisers: "
          "spectral norm on D (not in the paper), the paper's feature-matching adversarial loss, and the paper's "
          "re-initialisation of D when its loss falls below 1e-5. Encoders use nets.ConvEncoder (strided conv + "
          "BN + LeakyReLU, a linear layer to the latent) and the decoder nearest-upsample + conv instead of "
          "transposed convs, narrower (16-128 channels vs the paper's 64-512) and trained with lr 1e-3 (paper 2e-4) "
          "for tens of epochs, because the datasets here are tiny. `score='reconstruction'` (mean |x − x̂|) is an "
          "option outside the paper. Mode collapse and a runaway discriminator are reported in the run notes; "
          "all-equal or non-finite scores fail the run.",
    faithful=False, trained=True, uses_backbone=False,
    presets={
        "test": {"epochs": 40},
        "fast": {"max_steps": 200, "epochs": 40},
        "quality": {"max_steps": 800, "epochs": 200, "size": 128, "widths": (32, 64, 128, 256, 512), "lr": 5e-4},
    },
)
class GANomaly(BaseDetector):
    """GANomaly: adversarially trained encoder-decoder-encoder; anomaly score = ‖G_E(x) − E(G_D(G_E(x)))‖²."""

    def __init__(self, size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 128), nz: int = 100,
                 w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0, spectral_norm: bool = True,
                 score: str = "latent", epochs: int = 40, lr: float = 1e-3, batch_size: int = 8, sigma: float = 2.0,
                 max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.widths = tuple(widths)
        self.nz = nz
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
        if self.size % (1 << len(self.widths)):
            raise ConfigError(f"ganomaly: size {self.size} must be divisible by 2**len(widths) "
                              f"= {1 << len(self.widths)}")
        self.netg_ = GANomalyGenerator(self.size, self.widths, self.nz).to(self.device_)

    def _prepare(self, images: ImageSet) -> torch.Tensor:
        """(N, 3, size, size) float in [0, 1] on the working device."""
        return resize_images(images.float_images(), self.size).to(self.device_)

    # --- training ---------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        with torch.random.fork_rng(devices=[]):  # spectral norm draws its start vectors from the global RNG
            torch.manual_seed(self.seed)
            self._build()
            netd = GANomalyDiscriminator(self.size, self.widths, self.spectral_norm).to(self.device_)
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
                          seed=self.seed,
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
        """(N,) scores: mean (z − ẑ)² over the nz latent dims ("latent", the paper's) or mean |x − x̂|."""
        if self.score == "latent":
            return (z - zo).pow(2).mean(1)
        return (x - fake).abs().flatten(1).mean(1)

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._prepare(images)
        fake, z, zo = self._forward_batches(x)
        scores = self._scores(x, fake, z, zo).cpu()
        residual = (x - fake).abs().mean(1).cpu()  # (N, S, S)
        return Prediction(scores=scores, maps=to_pixel_map(residual, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return module_state("netg", self.netg_)

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build()
        load_module_state("netg", self.netg_, tensors)
        self.netg_.eval()
