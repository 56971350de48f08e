"""Reconstruction family: SSIM, Perlin noise, synthetic anomalies, and the AE / VAE / DRAEM models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from engine import registry
from engine.components.nets import ConvDecoder, ConvEncoder, UNet, ssim_map
from engine.components.synthetic_anomalies import make_anomalies, perlin_mask, perlin_noise

MODELS = ["autoencoder", "vae", "draem"]


def test_ssim_matches_skimage() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 40, generator=g)
    y = (x + 0.3 * torch.rand(2, 3, 48, 40, generator=g)).clamp(0, 1)
    ours = ssim_map(x, y).numpy()
    r = 5  # skimage pads differently (symmetric); compare away from the border, as its mean does
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        mean, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=2, full=True)
        np.testing.assert_allclose(ours[i, r:-r, r:-r], full.mean(2)[r:-r, r:-r], atol=1e-4)
        assert abs(float(ours[i, r:-r, r:-r].mean()) - mean) < 1e-4
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 48, 40), atol=1e-5)


def test_nets_shapes() -> None:
    x = torch.rand(2, 3, 64, 96)
    enc, dec = ConvEncoder(widths=(8, 16, 16), latent_channels=4), ConvDecoder(widths=(8, 16, 16), latent_channels=4)
    z = enc(x)
    assert z.shape == (2, 4, 8, 12) and dec(z).shape == x.shape
    venc = ConvEncoder(widths=(8, 16), latent="vector", latent_dim=10, image_size=(64, 96))
    vdec = ConvDecoder(widths=(8, 16), latent="vector", latent_dim=10, image_size=(64, 96))
    assert venc(x).shape == (2, 10) and vdec(venc(x)).shape == x.shape
    assert UNet(6, 2, base=8, depth=2)(torch.rand(2, 6, 32, 32)).shape == (2, 2, 32, 32)
    with pytest.raises(ValueError):
        enc(torch.rand(1, 3, 60, 60))


def test_perlin_deterministic_and_in_range() -> None:
    a = perlin_noise(4, (50, 70), (3, 5), torch.Generator().manual_seed(1))
    b = perlin_noise(4, (50, 70), (3, 5), torch.Generator().manual_seed(1))
    c = perlin_noise(4, (50, 70), (3, 5), torch.Generator().manual_seed(2))
    assert a.shape == (4, 50, 70) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0 + 1e-6 and a.std() > 0.1
    m = perlin_mask(16, (64, 64), torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and (m.flatten(1).sum(1) > 0).all()


def test_make_anomalies_masks_match_changed_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    aug, masks = make_anomalies(imgs, g)
    assert aug.shape == imgs.shape and masks.shape == (6, 64, 64)
    assert aug.min() >= 0 and aug.max() <= 1
    changed = (aug != imgs).any(1)
    assert torch.equal(changed, masks.bool())
    aug2, masks2 = make_anomalies(imgs, torch.Generator().manual_seed(0))
    assert torch.equal(aug, aug2) and torch.equal(masks, masks2)
    # p = 0 leaves everything unchanged; a custom source (other training images) works too
    same, empty = make_anomalies(imgs, g, p=0.0)
    assert torch.equal(same, imgs) and empty.sum() == 0
    _, m3 = make_anomalies(imgs, g, imgs.flip(0))
    assert (m3.flatten(1).sum(1) > 0).all()


@pytest.fixture(scope="module")
def fitted(sample_brick):
    train, test = sample_brick
    out = {}
    for name in MODELS:
        det = registry.create(name, **registry.info(name).presets["test"])
        out[name] = (det.fit(train), det.predict(test))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_loss_decreases(name: str, fitted) -> None:
    hist = fitted[name][0].history_
    assert hist[-1]["loss"] < hist[0]["loss"], hist


@pytest.mark.parametrize("name", MODELS)
def test_anomalous_region_scores_higher(name: str, fitted, sample_brick) -> None:
    _, test = sample_brick
    maps = fitted[name][1].maps
    masks = test.masks.bool()
    bad = test.labels == 1
    inside = maps[bad][masks[bad]].mean()
    outside = maps[bad][~masks[bad]].mean()
    assert inside > outside


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_on_cpu(name: str, fitted, sample_brick) -> None:
    train, test = sample_brick
    small = train.subset(list(range(8)))
    p = {**registry.info(name).presets["test"], "epochs": 2}
    a = registry.create(name, **p).fit(small).predict(test.subset([0, 10]))
    b = registry.create(name, **p).fit(small).predict(test.subset([0, 10]))
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_ssim_autoencoder_is_the_papers_network() -> None:
    from engine.methods.autoencoder.autoencoder import SSIMAutoencoder

    net = SSIMAutoencoder(128, 100)
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1), (100, 8, 1)]
    x = torch.rand(2, 3, 128, 128)
    assert net.encoder(x).shape == (2, 100, 1, 1) and net(x).shape == x.shape
    assert not isinstance(net.decoder[-1], torch.nn.LeakyReLU)  # linear output layer


def test_ssim_autoencoder_losses_by_hand() -> None:
    from engine.methods.autoencoder.autoencoder import Autoencoder, window_starts

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert float(Autoencoder().training_loss(x, y)) == pytest.approx(float(1 - ssim_map(x, y).mean()), abs=1e-6)
    assert float(Autoencoder(loss="l2").training_loss(x, y)) == pytest.approx(float(((x - y) ** 2).mean()), abs=1e-6)
    assert window_starts(256, 128, 32) == [0, 32, 64, 96, 128] and window_starts(200, 128, 50) == [0, 50, 72]


def test_sliding_window_map_averages_overlaps() -> None:
    from engine.methods.autoencoder.autoencoder import Autoencoder

    det = Autoencoder(size=64, patch=32, stride=16, width=0.25, latent_dim=8, loss="l2")
    det.device_ = "cpu"
    det.net_ = det._build().eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    m = det.residual_map(x)
    with torch.no_grad():
        w00 = det.residual(x[..., :32, :32], det.net_(x[..., :32, :32]))
        w01 = det.residual(x[..., :32, 16:48], det.net_(x[..., :32, 16:48]))
    torch.testing.assert_close(m[0, :16, :16], w00[0, :16, :16])  # one window only
    torch.testing.assert_close(m[0, :16, 16:32], ((w00[0, :16, 16:] + w01[0, :16, :16]) / 2))


def test_vae_score_is_the_negative_elbo() -> None:
    from engine.methods.autoencoder.vae import VAE, kl_to_prior

    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, float(np.log(4.0))]])
    # KL(N(1, 1) || N(0, 1)) = 0.5; KL(N(0, 4) || N(0, 1)) = 0.5 (4 − 1 − ln 4)
    assert float(kl_to_prior(mu, logvar)[0]) == pytest.approx(0.5 + 0.5 * (3 - np.log(4.0)), abs=1e-6)
    det = VAE(beta=1.0)
    x, rec = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert float(det.neg_elbo(x, rec, mu, logvar)[0]) == pytest.approx(12 * 0.25 + float(kl_to_prior(mu, logvar)[0]))
    det.device_ = "cpu"
    net = det._build()
    assert net.encoder(torch.zeros(1, 3, 128, 128)).shape == (1, 200, 1, 1)  # μ and log σ² of a d = 100 latent
