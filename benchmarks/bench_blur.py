"""Memory and time of the map smoothing (anomaly_map.gaussian_blur) on a whole test set, against a candidate.

On mpdd/metal_plate at 256 px, PatchCore's and PaDiM's peak memory is reached while their 113 test maps are
smoothed: `F.conv2d` with a 1×33 kernel on (113, 1, 256, 288) goes through im2col (about 0.5 GB of columns).
The candidate here blurs with two matrix products by banded (W, W) and (H, H) matrices built from the same
kernel and padding (same result up to float rounding). Printed: peak resident-memory growth and seconds of each,
side by side in one process, and the largest difference.

    python benchmarks/bench_blur.py [--n 113] [--size 256] [--sigma 4]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.components.anomaly_map import gaussian_blur, gaussian_kernel1d  # noqa: E402


def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) B such that x @ B blurs the rows of x (…, n) exactly as gaussian_blur blurs one axis."""
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    x = F.pad(torch.eye(n)[None], (r, r), mode="reflect" if n > r else "replicate")
    return F.conv1d(x.transpose(0, 1).reshape(n, 1, -1), k.view(1, 1, -1)).reshape(n, n)


def blur_by_matmul(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) -> (N, H, W): rows then columns, each one matrix product."""
    x = maps @ blur_matrix(maps.shape[-1], sigma)
    return (x.transpose(1, 2) @ blur_matrix(maps.shape[-2], sigma)).transpose(1, 2).contiguous()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=113, help="maps (mpdd/metal_plate has 113 test images)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=4.0)
    args = ap.parse_args()
    maps = torch.rand(args.n, args.size, args.size)
    # The candidate first: ru_maxrss only grows, so the second measurement starts from the first one's peak.
    a = _peak_mb()
    t = time.perf_counter()
    cand = blur_by_matmul(maps, args.sigma)
    t_cand, b = time.perf_counter() - t, _peak_mb()
    t = time.perf_counter()
    ref = gaussian_blur(maps, args.sigma)
    t_ref, c = time.perf_counter() - t, _peak_mb()
    print(f"{args.n} maps of {args.size}² px ({maps.numel() * 4 / 2**20:.0f} MB), sigma {args.sigma}, "
          f"{torch.get_num_threads()} threads")
    print(f"gaussian_blur (conv2d)     peak +{c - b:5.0f} MB  {t_ref:6.2f} s")
    print(f"candidate (matrix product) peak +{b - a:5.0f} MB  {t_cand:6.2f} s   ({t_ref / t_cand:.1f}× faster)")
    print(f"largest difference {(ref - cand).abs().max().item():.1e} (maps in [0, 1])")


if __name__ == "__main__":
    main()
