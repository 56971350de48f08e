"""DRAEM (Zavrtanik et al., "DRAEM – A discriminatively trained reconstruction embedding for surface anomaly
detection", ICCV 2021).

Shapes (H, W divisible by 32):
    ReconstructiveSubNetwork   (N, 3, H, W) -> (N, 3, H, W)          encoder-decoder without skips, base width 128
    DiscriminativeSubNetwork   (N, 6, H, W) -> (N, 2, H, W) logits   U-Net on [augmented image, reconstruction], base 64
    maps                       (N, H, W)                             softmax probability of the anomalous class
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur
from engine.components.nets import ssim_map
from engine.components.synthetic_anomalies import make_anomalies, rotate_images
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.autoencoder.autoencoder import ReconstructionDetector
from engine.registry import register

# The paper's training schedule (authors' code): Adam, lr 1e-4, ×0.2 at 80 % and 90 % of the 700 epochs, batch 8.
PAPER_EPOCHS = 700
PAPER_LR_MILESTONES = (0.8, 0.9)
PAPER_LR_GAMMA = 0.2


def _double_conv(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 -> BN -> ReLU -> Conv 3x3 -> BN -> ReLU (DRAEM's block); keeps H, W."""
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
                         nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _up_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Bilinear ×2 upsampling -> Conv 3x3 -> BN -> ReLU: (N, c_in, h, w) -> (N, c_out, 2h, 2w)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ReconstructiveSubNetwork(nn.Module):
    """The paper's reconstructive sub-network, base width b (paper: 128).

    Encoder: five double-conv blocks of b, 2b, 4b, 8b, 8b channels with a 2x2 max-pool before each of the last
    four (bottleneck 8b x H/16 x W/16). Decoder: four times (bilinear up-conv, double conv) back to b channels,
    then a 3x3 conv to 3 channels, linear output; no skip connections. (N, 3, H, W) -> (N, 3, H, W).
    """

    def __init__(self, base: int = 128, channels: int = 3):
        super().__init__()
        enc = [base, 2 * base, 4 * base, 8 * base, 8 * base]
        self.encoder = nn.Sequential(_double_conv(channels, enc[0], enc[0]), *[
            nn.Sequential(nn.MaxPool2d(2), _double_conv(enc[i - 1], enc[i], enc[i])) for i in range(1, 5)])
        dec = [8 * base, 4 * base, 2 * base, base, base]
        self.decoder = nn.Sequential(*[nn.Sequential(_up_conv(dec[j], dec[j]), _double_conv(dec[j], dec[j], dec[j + 1]))
                                       for j in range(4)], nn.Conv2d(base, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, H, W)."""
        return self.decoder(self.encoder(x))


class DiscriminativeSubNetwork(nn.Module):
    """The paper's discriminative sub-network, a U-Net of base width b (paper: 64).

    Encoder: six double-conv blocks of b, 2b, 4b, 8b, 8b, 8b channels with a max-pool before each of the last five
    (deepest map H/32). Decoder: five times (bilinear up-conv, concatenate the encoder map of that scale, double
    conv) with b·(8, 4, 2, 1, 1) channels, then a 3x3 conv to 2 logits. (N, 6, H, W) -> (N, 2, H, W).
    """

    def __init__(self, base: int = 64, in_channels: int = 6, out_channels: int = 2):
        super().__init__()
        enc = [base, 2 * base, 4 * base, 8 * base, 8 * base, 8 * base]
        self.encoder = nn.ModuleList([_double_conv(in_channels, enc[0], enc[0]), *[
            nn.Sequential(nn.MaxPool2d(2), _double_conv(enc[i - 1], enc[i], enc[i])) for i in range(1, 6)]])
        # decoder level i joins the encoder map i (i = 4 .. 0); its up-conv outputs enc[i - 1] (b at the top)
        ups, fuses = [], []
        c = enc[5]
        for i in range(4, -1, -1):
            out = enc[max(i - 1, 0)]
            ups.append(_up_conv(c, out))
            fuses.append(_double_conv(out + enc[i], out, out))
            c = out
        self.ups = nn.ModuleList(ups)
        self.fuses = nn.ModuleList(fuses)
        self.head = nn.Conv2d(base, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 6, H, W) -> (N, 2, H, W) logits; channel 1 = anomalous."""
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        y = skips.pop()
        for up, fuse in zip(self.ups, self.fuses, strict=True):
            y = fuse(torch.cat([up(y), skips.pop()], 1))
        return self.head(y)


class DraemNet(nn.Module):
    """Both sub-networks: (N, 3, H, W) -> (reconstruction (N, 3, H, W), logits (N, 2, H, W))."""

    def __init__(self, rec_base: int = 128, disc_base: int = 64):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(rec_base)
        self.discriminative = DiscriminativeSubNetwork(disc_base)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.reconstructive(x)
        return rec, self.discriminative(torch.cat([x, rec], 1))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017; α = 1 as DRAEM) of 2-class logits (N, 2, H, W) against a {0,1} mask (N, H, W):
    mean over pixels of −(1 − p_t)^γ log p_t."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.long()[:, None])[:, 0]
    return (-(1 - logp_t.exp()).pow(gamma) * logp_t).mean()


def draem_loss(rec: torch.Tensor, clean: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
               gamma: float = 2.0) -> torch.Tensor:
    """The paper's loss: L2(rec, clean) + (1 − SSIM(rec, clean)) for the reconstructive network (λ = 1, 11 px
    window) + focal loss of the predicted mask. rec, clean: (N, 3, H, W); logits (N, 2, H, W); mask (N, H, W)."""
    return F.mse_loss(rec.float(), clean) + (1 - ssim_map(rec.float(), clean).mean()) + focal_loss(logits, mask, gamma)


@register(
    family="autoencoder", name="draem", localises=True, trained=True, cpu_bf16=True, uses_backbone=False,
    paper="Zavrtanik et al., ICCV 2021 (DRAEM)",
    summary="Learns to repair and segment synthetic defects pasted onto normal images: a reconstruction "
            "network plus a discriminative U-Net that compares the image with its repair.",
    notes="Follows the paper and its authors' code: the reconstructive sub-network (encoder-decoder without skips, "
          "base width 128, bottleneck 1024 channels at 1/16) and the discriminative U-Net (base 64, six levels, "
          "2 logits) on [image, reconstruction]; loss L2 + (1 − SSIM) (11 px window) + focal loss (γ = 2); "
          "Perlin-noise masks (2^0–2^5 cells per axis, rotated, thresholded at 0.5), opacity β ~ U(0, 0.8), half "
          "the images left clean, 30 % of the training images rotated by up to ±90°; Adam lr 1e-4, ×0.2 at 80 % "
          "and 90 % of 700 epochs, batch 8, 256 px; map = softmax anomaly channel, score = max of the map "
          "average-pooled over 21×21. Anomaly source: scikit-image's bundled photographs (astronaut, coffee, moon, "
          "...; three random colour/contrast operations each) instead of the DTD texture download (offline); "
          "rotations reflect at the border (the authors' imgaug fills black). fast (reduced): 128 px, base widths "
          "8/8 instead of 128/64, 100 steps at lr 2e-3, pool 11 — the paper's 700 epochs at full width take days "
          "on a CPU.",
    presets={"test": {"size": 128, "rec_base": 4, "disc_base": 4, "epochs": 60, "max_steps": 60, "batch_size": 4,
                      "lr": 3e-3, "pool": 11},
             "fast": {"size": 128, "rec_base": 8, "disc_base": 8, "epochs": PAPER_EPOCHS, "max_steps": 100,
                      "lr": 2e-3, "pool": 11},
             "quality": {}},
    reduced_presets=("test", "fast"),
)
class Draem(ReconstructionDetector):
    """DRAEM: reconstructive + discriminative sub-networks trained on synthetic anomalies. Defaults are the
    paper's configuration."""

    def __init__(self, size: int = 256, rec_base: int = 128, disc_base: int = 64, epochs: int = PAPER_EPOCHS,
                 batch_size: int = 8, lr: float = 1e-4,
                 lr_milestones: tuple[float, ...] = PAPER_LR_MILESTONES, lr_gamma: float = PAPER_LR_GAMMA,
                 anomaly_prob: float = 0.5, rotate_prob: float = 0.3, focal_gamma: float = 2.0, sigma: float = 0.0,
                 pool: int = 21, max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.rec_base = rec_base
        self.disc_base = disc_base
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.anomaly_prob = anomaly_prob
        self.rotate_prob = rotate_prob
        self.focal_gamma = focal_gamma
        self.sigma = sigma
        self.pool = pool
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> DraemNet:
        return DraemNet(self.rec_base, self.disc_base).to(self.device_)

    def _rotate_some(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate each image of a batch (N, 3, h, w) by U(−90°, 90°) with probability rotate_prob (authors' code)."""
        g = self.generator_
        turn = torch.rand(x.shape[0], generator=g) < self.rotate_prob
        degrees = torch.rand(x.shape[0], generator=g) * 180 - 90
        if not bool(turn.any()):
            return x
        return torch.where(turn[:, None, None, None], rotate_images(x, degrees).clamp(0, 1), x)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if self.size % 32:
            raise ConfigError(f"draem.size must be a multiple of 32 (five 2x2 poolings), got {self.size}")
        x = self._working(train)
        self.net_ = self._build()
        net, dev = self.net_, self.device_

        def loss(idx: torch.Tensor) -> torch.Tensor:
            clean = self._rotate_some(x[idx])
            aug, mask = make_anomalies(clean, self.generator_, p=self.anomaly_prob)
            rec, logits = net(aug.to(dev))
            return draem_loss(rec, clean.to(dev), logits, mask.to(dev), self.focal_gamma)

        # The paper trains a fixed schedule on every image: no held-out slice, no early stop.
        cfg = TrainConfig(epochs=self.epochs, max_steps=self.max_steps, lr=self.lr, weight_decay=0.0,
                          batch_size=self.batch_size, cuda_batch_size=self.batch_size, val_fraction=0.0,
                          grad_clip=None, lr_milestones=self.lr_milestones, lr_gamma=self.lr_gamma, seed=self.seed)
        res = train_loop(Objective(net.parameters(), loss), len(x), cfg, modules=[net], device=dev, progress=progress)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _forward(self, b: torch.Tensor) -> torch.Tensor:
        _, logits = self.net_(b)
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._working(images)
        maps = gaussian_blur(torch.cat(self._batched(x, self._forward)), self.sigma * self.size / 256)
        # the authors' score: max of the map average-pooled with zero padding counted (F.avg_pool2d's default)
        pooled = F.avg_pool2d(maps[:, None], self.pool, stride=1, padding=self.pool // 2)
        return Prediction(scores=pooled.flatten(1).amax(1), maps=maps)


__all__ = ["DiscriminativeSubNetwork", "Draem", "DraemNet", "ReconstructiveSubNetwork", "draem_loss", "focal_loss"]
