"""Method-specific tests of the GAN (GANomaly) and transformer (UniAD) families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import registry
from engine.api import ConfigError, ImageSet, MethodFailure
from engine.methods.gan.ganomaly import GANomaly, GANomalyGenerator
from engine.methods.transformer.patch_transformer import ReconstructionTransformer, UniAD, neighbour_mask, pooled_max

# Small settings: these tests check behaviour, not quality (the contract suite checks quality).
TINY_GAN = {"size": 32, "ngf": 8, "nz": 16, "epochs": 4, "lr": 2e-3, "batch_size": 8}
SMALL_UNIAD = {"epochs": 6, "enc_layers": 1, "dec_layers": 1, "d_model": 64, "heads": 4, "ff_dim": 128, "lr": 1e-3}


# --- transformer -------------------------------------------------------------------------------------
def test_neighbour_mask_is_the_k_by_k_window() -> None:
    h, w, k = 6, 7, 3
    m = neighbour_mask(h, w, k)
    assert m.shape == (h * w, h * w) and m.dtype == torch.bool
    for i in range(h * w):
        yi, xi = divmod(i, w)
        expect = {(y, x) for y in range(yi - 1, yi + 2) for x in range(xi - 1, xi + 2) if 0 <= y < h and 0 <= x < w}
        got = {divmod(j, w) for j in torch.nonzero(m[i]).flatten().tolist()}
        assert got == expect
    assert not neighbour_mask(4, 4, 0).any()
    with pytest.raises(ConfigError):
        neighbour_mask(4, 4, 2)
    with pytest.raises(ConfigError):
        neighbour_mask(3, 3, 5)  # the window would cover everything


def test_masked_reconstruction_cannot_see_the_neighbourhood() -> None:
    """With the encoder removed, the output at a token depends only on tokens outside its k×k window."""
    torch.manual_seed(0)
    det = UniAD(grid=8, d_model=32, heads=2, ff_dim=32, enc_layers=0, dec_layers=1, neighbour_size=3)
    det.device_ = "cpu"
    det._build(5)
    net = det.net_.eval()
    x = torch.randn(1, 64, 5)
    i = 3 * 8 + 4  # token (3, 4)
    base = net(x, det.mask_)[0, i]
    inside = x.clone()
    for y in (2, 3, 4):
        for xx in (3, 4, 5):
            inside[0, y * 8 + xx] += 10 * torch.randn(5)
    torch.testing.assert_close(net(inside, det.mask_)[0, i], base)
    outside = x.clone()
    outside[0, 0] += 10 * torch.randn(5)
    assert not torch.allclose(net(outside, det.mask_)[0, i], base)


@pytest.fixture(scope="module")
def uniad_fit(sample_brick) -> tuple[UniAD, ImageSet]:
    train, test = sample_brick
    return UniAD(**SMALL_UNIAD).fit(train), test


def test_uniad_loss_decreases(uniad_fit) -> None:
    det, _ = uniad_fit
    h = det.history_
    assert h[-1]["reconstruction"] < 0.8 * h[0]["reconstruction"]


def test_uniad_map_higher_on_the_defect(uniad_fit) -> None:
    det, test = uniad_fit
    rows = [i for i in range(len(test)) if int(test.labels[i]) == 1 and bool(test.has_mask[i])]
    pred = det.predict(test.subset(rows))
    assert pred.maps is not None and test.masks is not None
    masks = test.masks[rows].bool()
    wins = [float(m[k].mean()) > float(m[~k].mean()) for m, k in zip(pred.maps, masks, strict=True)]
    assert np.mean(wins) >= 0.8, f"defect region above the rest in only {np.mean(wins):.0%} of images"


def test_uniad_deterministic(sample_brick, uniad_fit) -> None:
    det, test = uniad_fit
    again = UniAD(**SMALL_UNIAD).fit(sample_brick[0]).predict(test)
    np.testing.assert_allclose(again.scores.numpy(), det.predict(test).scores.numpy(), rtol=1e-5, atol=1e-6)


# --- GAN ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gan_fit(sample_brick) -> GANomaly:
    return GANomaly(**{**TINY_GAN, "epochs": 8}).fit(sample_brick[0])


def test_ganomaly_losses_decrease(gan_fit) -> None:
    h = gan_fit.history_
    assert h[-1]["generator"] < h[0]["generator"]
    assert min(r["val_loss"] for r in h) < h[0]["val_loss"]


def test_ganomaly_deterministic(sample_brick) -> None:
    train, test = sample_brick
    a = GANomaly(**TINY_GAN).fit(train).predict(test)
    b = GANomaly(**TINY_GAN).fit(train).predict(test)
    np.testing.assert_allclose(a.scores.numpy(), b.scores.numpy(), rtol=1e-5, atol=1e-7)
    assert a.maps is not None and a.maps.shape == (len(test), 128, 128)


def test_ganomaly_reports_mode_collapse(sample_brick, monkeypatch) -> None:
    """A generator whose decoder always outputs the same grey image is reported as collapsed."""

    def constant_decode(self: GANomalyGenerator, z: torch.Tensor) -> torch.Tensor:
        # zero-weighted terms keep a graph through the parameters so training still runs
        return torch.full((z.shape[0], 3, 32, 32), 0.5) + 0.0 * (self.decoder.head.weight.sum() + z.sum())

    monkeypatch.setattr(GANomalyGenerator, "decode", constant_decode)
    det = GANomaly(**TINY_GAN).fit(sample_brick[0])
    assert "mode collapse" in det.run_notes_["training"]


def test_ganomaly_fails_when_scores_are_all_equal(sample_brick, monkeypatch) -> None:
    """A generator whose latents are constant would give every image the same score: the fit fails clearly."""

    def dead_forward(self: GANomalyGenerator, x: torch.Tensor):
        z = self.encoder1(x) * 0.0
        fake = torch.full_like(x, 0.5) + 0.0 * self.decoder.head.weight.sum()
        return fake, z, self.encoder2(fake) * 0.0

    monkeypatch.setattr(GANomalyGenerator, "forward", dead_forward)
    with pytest.raises(MethodFailure, match="collapsed"):
        GANomaly(**TINY_GAN).fit(sample_brick[0])


def test_ganomaly_reports_runaway_discriminator(gan_fit, sample_brick) -> None:
    x = gan_fit._prepare(sample_brick[0])
    log = [(0.7, 0.1, 0.1, 0.1)] * 5 + [(1e-5, 5.0, 0.1, 0.1)] * 20
    assert "WARNING divergence" in gan_fit._diagnose(x, log, 0, "40 steps in 2 epochs")


def test_uniad_defaults_are_the_papers_transformer() -> None:
    """4 encoder + 4 decoder layers of width 256, 8 heads, feed-forward 1024, one learned query set per decoder
    layer, 7x7 neighbour masks, jitter scale 20; AdamW 1e-4 (wd 1e-4), x0.1 after 800 of 1000 epochs, batch 8."""
    d = UniAD()
    assert (d.enc_layers, d.dec_layers, d.d_model, d.heads, d.ff_dim, d.dropout) == (4, 4, 256, 8, 1024, 0.1)
    assert (d.neighbour_size, d.jitter_scale, d.jitter_prob) == (7, 20.0, 1.0)
    assert (d.epochs, d.lr, d.weight_decay, d.lr_milestones, d.batch_size, d.grad_clip) == \
        (1000, 1e-4, 1e-4, (0.8,), 8, 0.1)
    assert registry.create("uniad", preset="quality").get_params() == d.get_params()
    assert registry.is_reduced("uniad", "fast")
    net = ReconstructionTransformer(272, (14, 14), 256, 8, 1024, 4, 4)
    assert len(net.encoder) == 4 and len(net.decoder) == 4
    assert all(layer.query.weight.shape == (196, 256) for layer in net.decoder)
    assert net.decoder[0].query.weight.data_ptr() != net.decoder[1].query.weight.data_ptr()
    assert net.encoder[0].ff[0].out_features == 1024 and net.encoder[0].attn.num_heads == 8
    assert net.pos().shape == (196, 256)


def test_uniad_feature_jitter_scale_by_hand() -> None:
    """Noise std per token = scale · ‖f‖₂ / C (paper Eq. 1)."""
    det = UniAD(jitter_scale=20.0)
    det.generator_ = torch.Generator().manual_seed(0)
    tok = torch.zeros(1, 2000, 100)
    tok[0, :, 0] = 5.0  # ‖f‖ = 5 for every token, C = 100 -> std 20·5/100 = 1
    noise = det._jitter(tok) - tok
    assert abs(float(noise.std()) - 1.0) < 0.02
    assert torch.equal(UniAD(jitter_prob=0.0)._jitter(tok), tok)


def test_uniad_score_is_the_max_of_the_cell_average_pool() -> None:
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 256.0  # one hot pixel: pooled over 16×16 it weighs 1
    maps[1, 20:36, 30:46] = 3.0  # a full cell at 3
    assert torch.allclose(pooled_max(maps, 16), torch.tensor([1.0, 3.0]))
    assert UniAD(grid=16)._cell_px((256, 256)) == 16 and UniAD(grid=14)._cell_px((224, 224)) == 16


def test_uniad_token_grid_keeps_cells_over_their_pixels() -> None:
    """A stride-8 map brought to the stride-16 token grid must stay centred like the stride-16 map (no 4 px shift)."""
    from engine.methods.transformer.patch_transformer import to_grid

    # A ramp equal to each cell's centre pixel: x8[i] = 8i (stride 8), token j is centred on pixel 16j.
    x8 = (torch.arange(32, dtype=torch.float32) * 8).expand(1, 1, 32, 32).contiguous()
    got = to_grid(x8, (16, 16))[0, 0, 0]
    want = torch.arange(16, dtype=torch.float32) * 16
    assert torch.allclose(got[1:-1], want[1:-1], atol=1e-4), got  # the border cell averages only two cells


def test_ganomaly_networks_are_the_papers_dcgan() -> None:
    """At 64 px with ngf 64: encoder widths 64-128-256-512 down to 4x4, a 100-d latent, a mirrored decoder."""
    from engine.methods.gan.ganomaly import GANomalyDiscriminator

    g = GANomalyGenerator(64, 64, 100)
    convs = [m for m in g.encoder1.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    with torch.no_grad():
        fake, z, zo = g(torch.zeros(2, 3, 64, 64))
    assert fake.shape == (2, 3, 64, 64) and z.shape == zo.shape == (2, 100)
    assert float(fake.abs().max()) <= 1.0  # tanh output
    tconvs = [m for m in g.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in tconvs] == [512, 256, 128, 64, 3]
    logits, feats = GANomalyDiscriminator(64, 64)(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2,) and feats.shape == (2, 512, 4, 4)
    p = GANomaly().get_params()
    assert (p["w_adv"], p["w_con"], p["w_enc"], p["nz"], p["lr"]) == (1.0, 50.0, 1.0, 100, 2e-4)


def test_ganomaly_score_is_the_l1_latent_distance() -> None:
    det = GANomaly()
    z = torch.tensor([[0.0, 1.0, -2.0], [1.0, 1.0, 1.0]])
    zo = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.zeros(2, 3, 4, 4)
    assert det._scores(x, x, z, zo).tolist() == pytest.approx([1.0, 0.0])


def test_attention_is_torchs_multihead_attention() -> None:
    """UniAD's attention (its own for a faster CPU dropout) has nn.MultiheadAttention's parameters and, without
    dropout, its outputs; with dropout it drops attention weights at the rate asked and is reproducible."""
    from engine.methods.transformer.patch_transformer import Attention

    torch.manual_seed(0)
    ours = Attention(32, 4, dropout=0.25)
    ref = torch.nn.MultiheadAttention(32, 4, dropout=0.25, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # the same names and shapes
    q, k, v = torch.randn(3, 10, 32), torch.randn(3, 12, 32), torch.randn(3, 12, 32)
    mask = torch.rand(10, 12) < 0.3
    mask[:, 0] = False  # every query keeps a key
    ours.eval(), ref.eval()
    want = ref(q, k, v, attn_mask=mask, need_weights=False)[0]
    assert torch.allclose(ours(q, k, v, mask), want, atol=1e-5)
    assert torch.allclose(ours(q, k, v), ref(q, k, v, need_weights=False)[0], atol=1e-5)
    ours.train()
    torch.manual_seed(1)
    a = ours(q, k, v, mask)
    torch.manual_seed(1)
    assert torch.equal(a, ours(q, k, v, mask))
    assert not torch.allclose(a, want, atol=1e-3)
    ours.dropout = 0.0
    assert torch.allclose(ours(q, k, v, mask), want, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    from engine.components.nets import Dropout, dropout, dropout_mask

    torch.manual_seed(0)
    n = 1_000_000
    kept = dropout_mask((1000, 1000), p).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    x = torch.rand(64, 33) + 0.5
    x.requires_grad_(True)
    y = dropout(x, p, training=True)
    y.sum().backward()
    keep = y != 0
    assert torch.allclose(y[keep], x[keep] / (1 - p)) and (x.grad == keep / (1 - p)).all()
    assert dropout(x, p, training=False) is x
    assert Dropout(p).eval()(x) is x
    assert (dropout(x, 1.0, training=True) == 0).all()
