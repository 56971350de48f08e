"""Patch SVDD (Yi & Yoon 2020): the paper-specific pieces, on tiny tensors (the contract suite covers the rest)."""

from __future__ import annotations

import pytest
import torch

from engine import registry
from engine.api import ConfigError
from engine.methods.one_class.patch_svdd import (
    NEIGHBOURS,
    PatchEncoder32,
    PatchSVDD,
    PatchSVDDEncoder,
    distribute_scores,
    sample_position_pairs,
    sample_svdd_pairs,
    svdd_pair_loss,
)


def test_encoder_shapes_follow_the_paper() -> None:
    enc = PatchSVDDEncoder(dim=64)
    assert enc(torch.zeros(2, 3, 64, 64)).shape == (2, 64, 1, 1)
    assert enc.enc32(torch.zeros(2, 3, 32, 32)).shape == (2, 64, 1, 1)
    widths = [c.out_channels for c in enc.enc32.convs]
    assert widths == [32, 64, 128, 128, 64, 32, 32, 64]
    assert [c.kernel_size for c in enc.enc32.convs] == [(3, 3)] * 8
    assert enc.enc32.convs[0].stride == (2, 2) and all(c.stride == (1, 1) for c in enc.enc32.convs[1:])
    assert enc.merge.kernel_size == (2, 2) and enc.merge.out_channels == 128


def test_dense_codes_equal_patch_by_patch_codes() -> None:
    """The one-pass dense embedding gives, at cell (i, j), the code of the window at pixel (2i, 2j)."""
    torch.manual_seed(0)
    enc = PatchSVDDEncoder(dim=8, width=0.25, hidden=16).eval()
    x = torch.randn(1, 3, 96, 100)
    e64, e32 = enc.dense(x)
    assert e64.shape[-2:] == ((96 - 64) // 2 + 1, (100 - 64) // 2 + 1)
    assert e32.shape[-2:] == ((96 - 32) // 2 + 1, (100 - 32) // 2 + 1)
    for i, j in ((0, 0), (3, 5), (16, 18)):
        torch.testing.assert_close(e64[0, :, i, j], enc(x[..., 2 * i:2 * i + 64, 2 * j:2 * j + 64])[0, :, 0, 0],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e32[0, :, i, j], enc.enc32(x[..., 2 * i:2 * i + 32, 2 * j:2 * j + 32])[0, :, 0, 0],
                                   rtol=1e-4, atol=1e-5)


def test_svdd_pair_loss_by_hand() -> None:
    h1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    h2 = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    assert float(svdd_pair_loss(h1, h2)) == pytest.approx((5.0 + 1.0) / 2)


def test_pair_sampling_uses_the_papers_offsets() -> None:
    g = torch.Generator().manual_seed(0)
    size, k = (512, 512), 64
    p1, p2, cls = sample_position_pairs(4000, size, k, g)
    assert set(cls.tolist()) == set(range(8))
    d = p2 - p1
    inside = ((p1 >= k).all(1) & (p1 <= size[0] - 2 * k).all(1))  # far from the border: nothing clipped
    dirs = torch.tensor(NEIGHBOURS)[cls]
    for a in range(2):
        moving = inside & (dirs[:, a] != 0)
        dist = d[moving, a] * dirs[moving, a]
        assert int(dist.min()) == 3 * k // 4 and int(dist.max()) == k - 1  # 3K/4 + U{0..K/4-1}
        assert (d[inside & (dirs[:, a] == 0), a] == 0).all()
    q1, q2 = sample_svdd_pairs(4000, size, k, g)
    jit = q2 - q1
    ok = ((q1 >= 2) & (q1 <= size[0] - k - 2)).all(1)
    assert int(jit[ok].abs().max()) == k // 32 and not (jit[ok] == 0).all(1).any()


def test_distribute_scores_is_the_mean_over_covering_patches() -> None:
    scores = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # 2x2 patches of 4 px at stride 2 on a 7x7 image
    m = distribute_scores(scores, (7, 7), k=4, stride=2)
    assert m.shape == (1, 7, 7)
    assert float(m[0, 0, 0]) == 1.0 and float(m[0, 5, 5]) == 4.0
    assert float(m[0, 2, 2]) == pytest.approx(2.5)  # covered by all four
    assert float(m[0, 0, 3]) == pytest.approx(1.5)
    assert float(m[0, 6, 6]) == 0.0  # no patch covers it (as the authors' code)


def test_map_is_the_product_of_the_two_patch_sizes(sample_brick) -> None:
    train, test = sample_brick
    det = registry.create("patch_svdd", preset="test", max_steps=3).fit(train)
    x = det._working(test) - det.mean_
    e64, e32 = det._embed(x)
    m64 = det._level_map(e64, det.bank64_, 64, det.stride64)
    m32 = det._level_map(e32, det.bank32_, 32, det.stride32)
    pred = det.predict(test)
    torch.testing.assert_close(pred.maps, m64 * m32)
    torch.testing.assert_close(pred.scores, (m64 * m32).flatten(1).amax(1))
    # a training image's patches are in the bank: distance 0 everywhere it is scored
    tm = det.predict(train.subset([0])).maps
    assert float(tm.abs().max()) < 1e-3


def test_bad_sizes_are_refused(sample_brick) -> None:
    with pytest.raises(ConfigError, match="at least 64"):
        PatchSVDD(size=48).fit(sample_brick[0])
    with pytest.raises(ConfigError, match="stride32"):
        PatchSVDD(size=64, stride32=3).fit(sample_brick[0])


def test_registry_marks_fast_as_reduced() -> None:
    assert registry.info("patch_svdd").faithful
    assert registry.is_reduced("patch_svdd", "fast") and not registry.is_reduced("patch_svdd", "quality")
    assert PatchSVDD().get_params()["size"] == 256 and PatchEncoder32().convs[-1].out_channels == 64


def test_bank_cap_keeps_a_seeded_subset(sample_brick) -> None:
    train = sample_brick[0].subset(list(range(4)))
    full = registry.create("patch_svdd", preset="test", max_steps=2).fit(train)
    capped = registry.create("patch_svdd", preset="test", max_steps=2, max_bank=100).fit(train)
    assert len(capped.bank32_) == len(capped.bank64_) == 100 < len(full.bank32_)
    rows = {tuple(r.tolist()) for r in full.bank32_}
    assert all(tuple(r.tolist()) in rows for r in capped.bank32_)
