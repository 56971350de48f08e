"""Greedy k-center coreset: the fast selection returns exactly the plain greedy loop's indices."""

from __future__ import annotations

import pytest
import torch

from engine.components.coreset import _sqdist, greedy_coreset, greedy_k_center, random_projection


def _ref_sqdist(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances of rows z (N, w) to c (w,), summed as the documented pairwise tree."""
    w = 1 << max(0, (z.shape[1] - 1).bit_length())
    s = torch.nn.functional.pad(z - c, (0, w - z.shape[1])) ** 2
    while s.shape[1] > 1:
        s = s[:, : s.shape[1] // 2] + s[:, s.shape[1] // 2:]
    return s[:, 0]


def _ref_order(z: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """The plain greedy loop: every point's distance to every new centre, argmax (first max) each step."""
    sel, mind = [first], _ref_sqdist(z, z[first])
    for _ in range(1, n):
        j = int(torch.argmax(mind))
        sel.append(j)
        mind = torch.minimum(mind, _ref_sqdist(z, z[j]))
    return torch.tensor(sel)


def _ref_coreset(x: torch.Tensor, n: int, proj_dim: int, seed: int) -> torch.Tensor:
    n = max(1, min(n, x.shape[0]))
    if n == x.shape[0]:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = random_projection(x.float(), proj_dim, g)
    return _ref_order(z, n, int(torch.randint(x.shape[0], (1,), generator=g)))


def _data(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":  # offset, so the product distances see large norms
        return torch.randn(n, d, generator=g) * 3 + 20
    if kind == "grid":  # small integers: many exactly equal distances (ties)
        return torch.randint(0, 3, (n, d), generator=g).float()
    if kind == "clusters":  # tight blobs with exact duplicate rows
        x = torch.randn(8, d, generator=g)[torch.randint(0, 8, (n,), generator=g)]
        x[: n // 2] += 0.01 * torch.randn(n // 2, d, generator=g)
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gauss", "grid", "clusters"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("d,proj_dim", [(40, 16), (5, 16)])  # projected / identity with a non power-of-two width
def test_same_indices_as_plain_greedy(kind: str, seed: int, d: int, proj_dim: int) -> None:
    x = _data(kind, 200, d, seed)
    for n in (1, 2, 30, 199, 200):
        got = greedy_coreset(x, n, proj_dim=proj_dim, seed=seed)
        assert torch.equal(got, _ref_coreset(x, n, proj_dim, seed)), (kind, seed, n)


@pytest.mark.parametrize("active,block", [(1, 1), (3, 2), (17, 5), (64, 1000)])
def test_small_active_sets_and_blocks_change_nothing(active: int, block: int) -> None:
    # Tiny active sets force many refills and catch-ups over partial centre blocks.
    for kind, seed in (("gauss", 3), ("grid", 4), ("clusters", 5)):
        z = _data(kind, 250, 12, seed)
        ref = _ref_order(z, 120, 7)
        got = greedy_k_center(z, 120, 7, active=active, max_active=active, centre_block=block)
        assert torch.equal(got, ref), kind


def test_growing_active_set_changes_nothing() -> None:
    z = _data("gauss", 400, 12, 6)
    got = greedy_k_center(z, 200, 0, active=2, max_active=300, centre_block=16)
    assert torch.equal(got, _ref_order(z, 200, 0))


def test_row_chunks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.components.coreset as coreset

    monkeypatch.setattr(coreset, "_ROW_CHUNK", 7)  # catch-ups and full passes run in many row chunks
    z = _data("clusters", 300, 12, 7)
    assert torch.equal(greedy_k_center(z, 150, 3, active=40, max_active=40, centre_block=9), _ref_order(z, 150, 3))


def test_all_identical_rows_repeat_the_lowest_index() -> None:
    x = torch.ones(50, 6)
    got = greedy_coreset(x, 5, seed=0)
    assert torch.equal(got, _ref_coreset(x, 5, 128, 0))
    assert got[1:].tolist() == [0, 0, 0, 0]


def test_n_is_clipped_and_n_equal_to_rows_keeps_all() -> None:
    x = _data("gauss", 20, 4, 0)
    assert torch.equal(greedy_coreset(x, 20), torch.arange(20))
    assert torch.equal(greedy_coreset(x, 99), torch.arange(20))
    assert greedy_coreset(x, 0).shape == (1,)
    assert greedy_coreset(x[:1], 1).tolist() == [0]


def test_selected_points_are_far_apart() -> None:
    # Guards against "identical to a wrong reference": the greedy picks one point per blob first.
    g = torch.Generator().manual_seed(0)
    blobs = torch.randn(6, 10, generator=g) * 50
    x = blobs.repeat_interleave(40, 0) + 0.1 * torch.randn(240, 10, generator=g)
    sel = greedy_coreset(x, 6, proj_dim=128)
    assert sorted((sel // 40).tolist()) == list(range(6))


def test_progress_reported_and_cancel_propagates() -> None:
    x = _data("gauss", 400, 8, 1)
    seen: list[float] = []
    greedy_coreset(x, 200, progress=seen.append)
    assert 40 <= len(seen) <= 60 and seen == sorted(seen) and 0 < seen[0] and seen[-1] < 1

    class Stop(Exception):
        pass

    def cancel(f: float) -> None:
        if f > 0.3:
            raise Stop

    with pytest.raises(Stop):
        greedy_coreset(x, 200, progress=cancel)


def test_bad_input_is_a_clear_error() -> None:
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        greedy_coreset(x, 3)
    with pytest.raises(ValueError, match="no feature rows"):
        greedy_coreset(torch.empty(0, 4), 3)


def test_distance_bits_do_not_depend_on_the_rows_computed_together() -> None:
    z = _data("gauss", 20_000, 128, 0)  # more rows than one chunk
    c = z[5]
    full = _sqdist(z, c)
    idx = torch.tensor([0, 5, 9999, 19_999])
    assert torch.equal(_sqdist(z[idx], c), full[idx])
    assert torch.equal(_sqdist(z[idx], z[[5, 5, 5, 5]]), full[idx])
    exact = ((z.double() - c.double()) ** 2).sum(1)
    assert torch.allclose(full.double(), exact, rtol=1e-6, atol=0)
