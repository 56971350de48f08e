"""Reconstruction family: SSIM, Perlin and Stain noise, synthetic anomalies, and the AE / VAE / DRAEM / DFR / MemAE /
skip-connection AE models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from engine import registry
from engine.components.nets import ConvDecoder, ConvEncoder, ssim_map
from engine.components.synthetic_anomalies import make_anomalies, perlin_mask, perlin_noise
from engine.components.train_loop import lr_factor
from engine.methods.autoencoder.draem import (
    DiscriminativeSubNetwork,
    Draem,
    ReconstructiveSubNetwork,
    draem_loss,
    focal_loss,
)

MODELS = ["autoencoder", "vae", "draem", "memae", "skip_ae"]


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


def test_dfr_regional_features_stack_scales_and_average_windows() -> None:
    from engine.methods.autoencoder.dfr import regional_features

    # A stride-1 map: the regional feature is the plain mean of each non-overlapping 4x4 window.
    f1 = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    # A stride-4 map (2x2 cells over the 8x8 image): constant per cell stays that constant.
    f4 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = regional_features([f1, f4], (8, 8), stride=4)
    assert out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[:, :2], torch.nn.functional.avg_pool2d(f1, 4, 4))
    assert out[0, 2, 0, 0] < out[0, 2, 0, 1] < out[0, 2, 1, 0] < out[0, 2, 1, 1]  # the coarse layer's order kept
    torch.testing.assert_close(regional_features([f1], (8, 8), stride=1), f1)


def test_dfr_pca_latent_dim_on_a_hand_example() -> None:
    from engine.methods.autoencoder.dfr import pca_latent_dim

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g)
    z = (z - z.mean(0)) / z.std(0)
    x = z * torch.tensor([3.0, 1.0, 0.1])  # variances 9, 1, 0.01: 89.9%, 99.9%, 100%
    assert pca_latent_dim(x, 0.85) == 1
    assert pca_latent_dim(x, 0.9) == 2
    assert pca_latent_dim(x, 0.9995) == 3
    rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    assert pca_latent_dim(x @ rot, 0.9) == 2  # the rule depends on the spectrum, not on the axes


def test_dfr_autoencoder_is_one_by_one_convolutions() -> None:
    from engine.methods.autoencoder.dfr import FeatureCAE

    net = FeatureCAE(in_channels=40, latent_dim=6).eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1)] * 6
    assert [c.out_channels for c in convs] == [26, 12, 6, 12, 26, 40]
    x = torch.randn(1, 40, 5, 5)
    y = x.clone()
    y[0, :, 2, 3] += 5.0
    diff = (net(x) - net(y)).abs().sum(1)[0]
    assert diff[2, 3] > 0 and diff.sum() == diff[2, 3]  # each cell is rebuilt on its own


def test_dfr_fit_records_pca_width(sample_brick) -> None:
    train, test = sample_brick
    det = registry.create("dfr", epochs=1, max_steps=2).fit(train.subset(list(range(6))))
    assert det.latent_dim_ == det.run_notes_["latent_dim"] and 1 <= det.latent_dim_ < det.in_channels_ == 192
    fixed = registry.create("dfr", latent_dim=7, epochs=1, max_steps=2).fit(train.subset(list(range(6))))
    assert fixed.latent_dim_ == 7 and fixed.predict(test.subset([0])).maps.shape == (1, 128, 128)


def test_memae_hard_shrinkage() -> None:
    from engine.methods.autoencoder.memae import hard_shrink

    w = torch.tensor([0.0, 0.001, 0.0025, 0.003, 0.2, 0.7])
    out = hard_shrink(w, 0.0025)
    assert torch.equal(out[:3], torch.zeros(3))  # at or below λ: dropped
    torch.testing.assert_close(out[3:], w[3:], rtol=1e-6, atol=1e-9)  # above λ: kept as they are
    g = torch.tensor([0.001, 0.4], requires_grad=True)
    hard_shrink(g, 0.0025).sum().backward()
    assert g.grad[0] == 0 and g.grad[1] > 0  # gradients flow only through the kept items


def test_memae_addressing_is_sparse_and_entropy_loss() -> None:
    from engine.methods.autoencoder.memae import MemoryModule, addressing_entropy

    m = 8
    assert torch.allclose(addressing_entropy(torch.full((m,), 1 / m)), torch.tensor(math.log(m)))
    assert addressing_entropy(torch.eye(m)[2]).abs() < 1e-6  # one item: no entropy
    mem = MemoryModule(size=m, dim=4, shrink_thres=1.5 / m)
    with torch.no_grad():
        mem.items.copy_(torch.cat([torch.eye(4), -torch.eye(4)]) * 3)
    z = torch.tensor([4.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    out, w = mem(z)
    assert w.shape == (1, m) and torch.allclose(w.sum(1), torch.ones(1))
    assert (w > 0).sum() < m  # the weak matches were shrunk away
    assert w.argmax() == 0 and out.shape == z.shape and out[0, 0, 0, 0] > 2.5  # rebuilt from item 0
    plain = MemoryModule(size=m, dim=4, shrink_thres=0.0)
    plain.load_state_dict(mem.state_dict())
    assert (plain(z)[1] > 0).all()  # without shrinkage every item is used
    assert addressing_entropy(w).item() < addressing_entropy(plain(z)[1]).item()


def test_stain_noise_corrupts_one_grey_blob() -> None:
    from engine.components.synthetic_anomalies import stain_noise

    imgs = torch.rand(6, 3, 96, 128, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4
    out, masks = stain_noise(imgs, torch.Generator().manual_seed(0))
    again, masks2 = stain_noise(imgs, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(masks, masks2)
    assert out.shape == imgs.shape and masks.shape == (6, 96, 128) and out.min() >= 0 and out.max() <= 1
    outside = masks == 0
    assert torch.equal(out.permute(1, 0, 2, 3)[:, outside], imgs.permute(1, 0, 2, 3)[:, outside])
    side = 96
    for i in range(6):
        core = masks[i] > 0.99
        area = int((masks[i] > 0.5).sum())
        assert 0 < area <= math.pi * (0.12 * side * 1.2) ** 2  # semi-axes ≤ 12% of the side (+ jitter)
        if core.sum() > 4:  # the stain's core is one grey level (all channels) plus a little noise
            vals = out[i][:, core]
            assert (vals.mean(1).max() - vals.mean(1).min()) < 0.02 and vals.std() < 0.05
        ys, xs = torch.nonzero(masks[i] > 0.5, as_tuple=True)
        assert ys.min() >= 0 and ys.max() < 96 and xs.max() < 128


def test_skip_ae_adds_encoder_maps_at_every_scale() -> None:
    from engine.methods.autoencoder.skip_ae import SkipAE

    net = SkipAE(base=4, depth=3, kernel=5).eval()
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == x.shape
    seen: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape))) for m in net.up]
    net(x)
    for h in hooks:
        h.remove()
    # decoder convs land on the encoder's scales 1/4 and 1/2 with its widths, so the maps can be added
    assert seen == [(2, 8, 8, 8), (2, 4, 16, 16)]
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 30, 30))


def test_skip_ae_learns_to_remove_stains(fitted, sample_brick) -> None:
    from engine.components.synthetic_anomalies import stain_noise

    det = fitted["skip_ae"][0]
    clean = det._working(sample_brick[0])[:6]
    noisy, masks = stain_noise(clean, torch.Generator().manual_seed(5))
    with torch.no_grad():
        rec = det.net_(noisy)
    inside = masks > 0.9
    err_noisy = (noisy - clean).abs().mean(1)[inside].mean()
    err_rec = (rec - clean).abs().mean(1)[inside].mean()
    assert err_rec < 0.7 * err_noisy, (float(err_rec), float(err_noisy))


# --- DRAEM ------------------------------------------------------------------------------------------------
def test_draem_networks_are_the_papers() -> None:
    """Reconstructive: base 128, bottleneck 8·128 = 1024 channels at 1/16, no skips; discriminative: base 64, six
    levels (deepest 512 channels at 1/32), 6 input channels, 2 logits."""
    rec = ReconstructiveSubNetwork(128)
    x = torch.rand(1, 3, 32, 32)
    assert rec.encoder(x).shape == (1, 1024, 2, 2)
    convs = [m for m in rec.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:2]] == [128, 128] and len(convs) == 10 + 12 + 1
    disc = DiscriminativeSubNetwork(64)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 6 and disc.head.out_channels == 2
    assert max(c.out_channels for c in convs) == 512
    y = torch.rand(1, 6, 64, 64)
    deepest = y
    for block in disc.encoder:
        deepest = block(deepest)
    assert deepest.shape == (1, 512, 2, 2)
    small = ReconstructiveSubNetwork(4), DiscriminativeSubNetwork(4)
    assert small[0](torch.rand(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    assert small[1](torch.rand(2, 6, 64, 96)).shape == (2, 2, 64, 96)


def test_draem_defaults_are_the_papers_schedule() -> None:
    d = Draem()
    assert (d.size, d.rec_base, d.disc_base, d.epochs, d.batch_size, d.lr) == (256, 128, 64, 700, 8, 1e-4)
    assert registry.create("draem", preset="quality").get_params() == d.get_params()
    # Adam lr ×0.2 at 80 % and 90 % of the steps (authors' MultiStepLR)
    total = 700 * 3
    assert [lr_factor(s, total, d.lr_milestones, d.lr_gamma) for s in (0, 1679, 1680, 1889, 1890, 2099)] == \
        pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])
    assert registry.is_reduced("draem", "fast") and not registry.is_reduced("draem", "quality")


def test_draem_loss_by_hand() -> None:
    # one pixel, logits (0, ln 3): p(anomalous) = 0.75
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    assert float(focal_loss(logits, torch.ones(1, 1, 1))) == pytest.approx(-(0.25 ** 2) * math.log(0.75))
    assert float(focal_loss(logits, torch.zeros(1, 1, 1))) == pytest.approx(-(0.75 ** 2) * math.log(0.25))
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 24, 24, generator=g)
    logits = torch.randn(2, 2, 24, 24, generator=g)
    mask = (torch.rand(2, 24, 24, generator=g) > 0.7).float()
    f = float(focal_loss(logits, mask))
    assert float(draem_loss(clean, clean, logits, mask)) == pytest.approx(f, abs=1e-5)
    rec = (clean + 0.1).clamp(0, 1)
    want = float(((rec - clean) ** 2).mean()) + 1 - float(ssim_map(rec, clean).mean()) + f
    assert float(draem_loss(rec, clean, logits, mask)) == pytest.approx(want, rel=1e-5)


def test_draem_score_is_the_max_of_the_21px_average_pool() -> None:
    """A lone hot pixel in the map counts 1/21² towards the score (zero padding counted, as F.avg_pool2d)."""
    d = Draem(size=64, rec_base=4, disc_base=4)
    maps = torch.zeros(1, 64, 64)
    maps[0, 0, 0] = 1.0
    d._working = lambda images: torch.zeros(1, 3, 64, 64)  # type: ignore[method-assign]
    d._batched = lambda x, fn: [maps]  # type: ignore[method-assign]
    pred = d._predict(None)  # type: ignore[arg-type]
    assert float(pred.scores[0]) == pytest.approx(1 / 21 ** 2)
    assert torch.equal(pred.maps, maps)
