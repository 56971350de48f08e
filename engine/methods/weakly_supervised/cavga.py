"""CAVGA (Venkataramanan, Peng, Singh & Mahalanobis, "Attention Guided Anomaly Localization in Images", ECCV 2020).

A convolutional adversarial variational autoencoder: the encoder gives a *convolutional* latent z (a map, so
the latent keeps where things are), the decoder reconstructs the image from z, and a discriminator judges the
reconstructions. Attention maps are computed on z with Grad-CAM (Selvaraju et al. 2017):
A^c = ReLU(Σ_k α_k^c z_k), α_k^c = mean over positions of ∂y^c/∂z_k, scaled to [0, 1] by its maximum.

- CAVGA-Du (unsupervised) adds the *attention expansion loss* L_ae = mean(1 − A): the attention of a normal
  image should cover all of it, so at test time the regions it leaves out are the anomaly.
- CAVGA-Wu (weakly supervised, what this module registers) adds a binary classifier on z (normal vs anomalous)
  trained on the normal images and the few labelled anomalies, and the *complementary guided attention loss*
  on the normal images the classifier gets right: L_cga = mean(1 − A^{normal} + A^{anomalous}); the normal
  class's attention should cover the whole image and the anomalous class's none of it.
  At test time the score is the classifier's anomalous log-odds. The map is 1 − A^{normal} (what the normal
  class's attention leaves out, CAVGA-Du's test map), times the anomalous probability: A^{anomalous} itself came
  out zero everywhere in our runs (L_cga drives Σ α_k z_k below the ReLU on every image), a constant map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.nets import ConvDecoder
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.components.weak_training import (
    NormalCycler,
    augmented_anomalies,
    backbone_input,
    channel_stats,
    seeded_module,
    standardise,
    virtual_pool,
)
from engine.methods.autoencoder.vae import kl_to_prior
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.methods.gan.ganomaly import GANomalyDiscriminator
from engine.registry import register

# --- the paper's pieces ---------------------------------------------------------------------------------------


def grad_cam(z: torch.Tensor, class_score: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM attention of one class on the latent map, scaled to [0, 1] per image.

    z (N, K, h, w) requires grad, class_score (N,) computed from z. Returns (N, h, w):
    ReLU(Σ_k α_k z_k) / max, α_k = mean_{ij} ∂score/∂z_{k,ij}. `create_graph` keeps it differentiable (training).
    """
    grads = torch.autograd.grad(class_score.sum(), z, create_graph=create_graph)[0]
    alpha = grads.mean((2, 3), keepdim=True)
    cam = torch.relu((alpha * z).sum(1))
    return cam / (cam.flatten(1).amax(1).view(-1, 1, 1) + 1e-8)


def attention_expansion_loss(attention: torch.Tensor) -> torch.Tensor:
    """CAVGA-Du's L_ae: mean over images and positions of (1 − A). attention (N, h, w) in [0, 1]."""
    return (1.0 - attention.float()).mean()


def complementary_guided_attention_loss(att_normal: torch.Tensor, att_anomalous: torch.Tensor,
                                        keep: torch.Tensor) -> torch.Tensor:
    """CAVGA-Wu's L_cga on the normal images the classifier labels normal (`keep` (N,) bool).

    att_normal, att_anomalous (N, h, w) in [0, 1] -> mean over kept images and positions of (1 − A_n + A_a);
    0 when no image is kept.
    """
    if not bool(keep.any()):
        return att_normal.sum() * 0.0
    return (1.0 - att_normal[keep].float() + att_anomalous[keep].float()).mean()


class CAVGANet(nn.Module):
    """Encoder head, convolutional latent, decoder and classifier.

    encode: backbone features (N, C, h, w) -> μ, log σ² (N, K, h, w); decode: z (N, K, h, w) -> (N, 3, 16h, 16w)
    in [0, 1]; classify: z -> (N, 2) logits (normal, anomalous).
    """

    def __init__(self, in_channels: int, latent_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(in_channels, 2 * latent_channels, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1))
        self.dec = ConvDecoder(out_channels=3, widths=widths, latent_channels=latent_channels)
        self.cls = nn.Sequential(nn.Conv2d(latent_channels, latent_channels, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(latent_channels, 2))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(x).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)


@register(
    family="weakly_supervised", name="cavga", localises=True, supervision="weak",
    paper="Venkataramanan et al., ECCV 2020",
    summary="Convolutional adversarial VAE whose latent map carries Grad-CAM attention; a classifier on the latent "
            "learns from the labelled anomalies, and the complementary guided attention loss makes the normal "
            "class attend everywhere and the anomalous class nowhere on normal images.",
    notes="CAVGA-Wu, the paper's weakly supervised variant: convolutional latent (VAE, reparameterised), decoder, "
          "discriminator on reconstructions, binary classifier on the latent, Grad-CAM attention on the latent, "
          "complementary guided attention loss on correctly classified normal images; score = the classifier's "
          "anomalous log-odds, map = 1 − the normal class's attention (CAVGA-Du's test map; the anomalous class's "
          "attention came out zero everywhere here, L_cga pushes it below Grad-CAM's ReLU), times the anomalous "
          "probability so maps compare across images. K = 0: the paper's unsupervised CAVGA-Du (attention "
          "expansion loss instead of a classifier) is not registered; adlab's cavga needs labelled anomalies and "
          "K = 0 is the same error as DevNet's (the expansion loss is implemented and tested). Differences: the "
          "encoder is frozen ImageNet EfficientNet-Lite0 (blocks.4, stride 16) plus a trainable conv head, not a "
          "fine-tuned ResNet-18; the decoder is the shared convolutional decoder and the discriminator GANomaly's "
          "DCGAN one; loss weights 1 for reconstruction (MSE), adversarial, per-pixel KL, classification and "
          "L_cga (ours); balanced batches with flip/rotation views of the anomalies (as DevNet); AdamW. fast "
          "(reduced): 8-times narrower decoder and discriminator, 300 steps.",
    faithful=True, trained=True, uses_backbone=True,
    presets={"test": {"epochs": 12, "steps_per_epoch": 10, "batch_size": 8, "widths": (8, 16, 32, 64), "ngf": 8},
             "fast": {"epochs": 20, "steps_per_epoch": 15, "batch_size": 8, "widths": (8, 16, 32, 64), "ngf": 8},
             "quality": {"epochs": 100, "steps_per_epoch": 20, "batch_size": 16}},
    reduced_presets=("test", "fast"),
)
class CAVGA(BaseDetector):
    """CAVGA-Wu on frozen backbone features (see the module docstring)."""

    requires_anomalies = True

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.4",),
                 latent_channels: int = 64, widths: tuple[int, ...] = (64, 128, 256, 512), ngf: int = 64,
                 w_rec: float = 1.0, w_adv: float = 1.0, w_kl: float = 1.0, w_cls: float = 1.0, w_cga: float = 1.0,
                 augment: bool = True, epochs: int = 100, steps_per_epoch: int = 20, batch_size: int = 16,
                 lr: float = 2e-4, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.latent_channels = latent_channels
        self.widths = tuple(widths)
        self.ngf = ngf
        self.w_rec = w_rec
        self.w_adv = w_adv
        self.w_kl = w_kl
        self.w_cls = w_cls
        self.w_cga = w_cga
        self.augment = augment
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def _input(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        return backbone_input(images, self.layers, self.backbone, self.weights, self.device_, progress)

    def _target(self, images: ImageSet, grid: tuple[int, int]) -> torch.Tensor:
        """Images resized to the decoder's output (2^depth · grid): (N, 3, H', W') in [0, 1]."""
        m = 1 << len(self.widths)
        size = (grid[0] * m, grid[1] * m)
        x = images.float_images()
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        normal = self._input(train, progress)                              # (Nn, C, h, w)
        anom = self._input(augmented_anomalies(anomalies, self.augment))   # (Na, C, h, w)
        grid = (normal.shape[-2], normal.shape[-1])
        target = self._target(train, grid)                                 # (Nn, 3, H', W')
        self.mean_, self.std_ = channel_stats(normal)
        dev = self.device_
        self.net_ = seeded_module(lambda: CAVGANet(normal.shape[1], self.latent_channels, self.widths),
                                  self.seed).to(dev)
        # The DCGAN discriminator wants a square power-of-two input; reconstructions are resized to one.
        d_size = 1 << max(4, min(target.shape[-2:]).bit_length() - 1)  # largest power of two ≤ the side
        disc = seeded_module(lambda: GANomalyDiscriminator(d_size, self.ngf), self.seed + 1).to(dev)
        g = self.generator_
        n_anom = anom.shape[0]
        normals = NormalCycler(normal.shape[0], g)
        cache: dict[str, Any] = {}
        log: dict[str, float] = {}

        def to_d(x: torch.Tensor) -> torch.Tensor:
            return x if tuple(x.shape[-2:]) == (d_size, d_size) else \
                F.interpolate(x, size=(d_size, d_size), mode="bilinear", align_corners=False)

        def forward(idx: torch.Tensor) -> None:
            b = len(idx)
            a_idx = torch.randint(n_anom, (b,), generator=g)
            n_idx = normals.take(b)
            x = standardise(torch.cat([normal[n_idx], anom[a_idx]]).to(dev), self.mean_, self.std_)
            mu, logvar = self.net_.encode(x)
            eps = torch.randn(mu.shape, generator=g).to(dev)
            z = mu + eps * (0.5 * logvar).exp()
            rec = self.net_.dec(z[:b])
            cache.update(idx=idx, b=b, z=z, mu=mu, logvar=logvar, rec=rec, real=target[n_idx].to(dev))

        def d_loss(idx: torch.Tensor) -> torch.Tensor:
            forward(idx)
            real_logit, _ = disc(to_d(cache["real"]))
            fake_logit, _ = disc(to_d(cache["rec"].detach()))
            real_logit, fake_logit = real_logit.float(), fake_logit.float()
            return 0.5 * (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                          + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))

        def g_loss(idx: torch.Tensor) -> torch.Tensor:
            if cache.get("idx") is not idx:
                forward(idx)
            b, z, mu, logvar, rec, real = (cache[k] for k in ("b", "z", "mu", "logvar", "rec", "real"))
            cache.clear()
            l_rec = F.mse_loss(rec.float(), real.float())
            l_kl = (kl_to_prior(mu[:b].float(), logvar[:b].float()) / real[0].numel()).mean()
            fake_logit, _ = disc(to_d(rec))
            l_adv = F.binary_cross_entropy_with_logits(fake_logit.float(), torch.ones_like(fake_logit.float()))
            logits = self.net_.cls(z).float()                                    # (2b, 2)
            y = torch.cat([torch.zeros(b), torch.ones(b)]).long().to(dev)
            l_cls = F.cross_entropy(logits, y)
            zn = z[:b]
            ln = self.net_.cls(zn).float()
            att_n = grad_cam(zn, ln[:, 0], create_graph=True)
            att_a = grad_cam(zn, ln[:, 1], create_graph=True)
            l_cga = complementary_guided_attention_loss(att_n, att_a, ln.argmax(1) == 0)
            log.update(rec=float(l_rec.detach()), cls=float(l_cls.detach()), cga=float(l_cga.detach()))
            return (self.w_rec * l_rec + self.w_kl * l_kl + self.w_adv * l_adv + self.w_cls * l_cls
                    + self.w_cga * l_cga)

        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=0.0, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed)
        train_loop([Objective(disc.parameters(), d_loss, name="discriminator", betas=(0.5, 0.999)),
                    Objective(self.net_.parameters(), g_loss, name="cavga", betas=(0.5, 0.999))],
                   virtual_pool(self.steps_per_epoch, self.batch_size), cfg, modules=[self.net_, disc], device=dev,
                   progress=progress)
        self.run_notes_ = {"final_losses": {k: round(v, 4) for k, v in log.items()},
                           "labelled_anomalies": len(anomalies), "anomaly_views": n_anom}

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._input(images)
        scores, maps = [], []
        # Grad-CAM needs gradients, which BaseDetector.predict turns off.
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(0, feats.shape[0], 32):
                x = standardise(feats[i:i + 32].clone().to(self.device_), self.mean_, self.std_)
                z = self.net_.encode(x)[0].detach().requires_grad_(True)
                logits = self.net_.cls(z).float()
                att_n = grad_cam(z, logits[:, 0])
                odds = (logits[:, 1] - logits[:, 0]).detach()
                scores.append(odds.cpu())
                maps.append(((1.0 - att_n) * torch.sigmoid(odds).view(-1, 1, 1)).detach().float().cpu())
        return Prediction(scores=torch.cat(scores), maps=torch.cat(maps))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "std": self.std_, **module_state("net", self.net_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_, self.std_ = tensors["mean"], tensors["std"]
        self.net_ = CAVGANet(self.mean_.shape[0], self.latent_channels, self.widths)
        load_module_state("net", self.net_, tensors)
        self.net_.to(self.device_).eval()
