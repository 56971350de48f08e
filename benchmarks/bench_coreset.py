"""Greedy coreset speed: the plain loop (one pass over all points per centre) against engine's exact selection.

The plain loop is the previous implementation (a matrix-vector product over all N points per centre);
its time per centre is constant, so it runs `--plain-steps` centres and its total is extrapolated
(marked "~"). engine's selection runs in full and returns the same indices as the plain loop
(tests/test_coreset.py checks that). Prints wall and CPU seconds and both speed-ups (on a loaded machine
the CPU seconds are the steadier comparison).

    python benchmarks/bench_coreset.py [DATA] [--ratio 0.1] [--image-size 256] [--synthetic-only]
DATA defaults to ../shared/data/magnetic_tile/mt when present: its train set's PatchCore patch features
(engine.components.features.patch_features, as PatchCore computes them; the backbone pass is cached).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.components.coreset import greedy_coreset, random_projection  # noqa: E402


def plain_seconds_per_centre(x: torch.Tensor, steps: int, proj_dim: int = 128, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds per centre of the plain greedy loop on x (N, D), timed over `steps` centres."""
    g = torch.Generator().manual_seed(seed)
    zt = random_projection(x.float(), proj_dim, g).t().contiguous()
    sq = (zt * zt).sum(0)
    j = int(torch.randint(zt.shape[1], (1,), generator=g))
    t0, c0 = time.perf_counter(), time.process_time()
    mind = (sq + sq[j] - 2.0 * (zt[:, j] @ zt)).clamp_min_(0)
    for _ in range(steps):
        j = int(torch.argmax(mind))
        buf = zt[:, j] @ zt
        buf.mul_(-2.0).add_(sq).add_(sq[j])
        torch.minimum(mind, buf, out=mind)
    return (time.perf_counter() - t0) / (steps + 1), (time.process_time() - c0) / (steps + 1)


def compare(label: str, x: torch.Tensor, ratio: float, plain_steps: int) -> None:
    n = max(1, int(round(ratio * x.shape[0])))
    per_wall, per_cpu = plain_seconds_per_centre(x, min(plain_steps, n))
    est = "~" if plain_steps < n else ""
    w0, c0 = time.perf_counter(), time.process_time()
    greedy_coreset(x, n)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"{label:<28}{x.shape[0]:>9}{n:>8}{est + f'{per_wall * n:.1f}':>12}{est + f'{per_cpu * n:.1f}':>11}"
          f"{wall:>12.1f}{cpu:>9.1f}{per_wall * n / wall:>9.1f}x{per_cpu * n / cpu:>9.1f}x", flush=True)


def synthetic(n_points: int, dim: int = 152, seed: int = 0) -> torch.Tensor:
    """(n_points, dim) points near a 16-dim subspace (patch features are far from filling 128 dims)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_points, 16, generator=g) @ torch.randn(16, dim, generator=g)
    return (base + 0.3 * torch.randn(n_points, dim, generator=g)).relu_()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--plain-steps", type=int, default=200)
    ap.add_argument("--synthetic-only", action="store_true")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; coreset ratio {args.ratio}")
    print("plain = one pass over all points per centre (~ = extrapolated from --plain-steps centres); exact = engine")
    print(f"{'set':<28}{'points':>9}{'keep':>8}{'plain wall':>12}{'plain cpu':>11}{'exact wall':>12}{'cpu':>9}"
          f"{'wall x':>10}{'cpu x':>10}")
    compare("synthetic 20k", synthetic(20_000), args.ratio, args.plain_steps)
    compare("synthetic 100k", synthetic(100_000), args.ratio, args.plain_steps)
    data = args.data or str(ROOT.parent / "shared/data/magnetic_tile/mt")
    if args.synthetic_only or not Path(data).exists():
        return
    from engine.components.features import patch_features
    from engine.data import discover, load_split
    from engine.registry import create

    pc = create("patchcore")
    train = load_split(discover(data), "train", args.image_size)
    t0 = time.perf_counter()
    emb = patch_features(train, pc.layers, backbone=pc.backbone, weights=pc.weights, patch_size=pc.patch_size)
    x = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).contiguous()
    print(f"({Path(data).name}: {len(train)} train images, features in {time.perf_counter() - t0:.0f} s)", flush=True)
    compare(f"{Path(data).name} PatchCore patches", x, args.ratio, args.plain_steps)


if __name__ == "__main__":
    main()
