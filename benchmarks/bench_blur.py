"""Memory and time of the map smoothing (anomaly_map.gaussian_blur) on a whole test set, against a convolution.

On mpdd/metal_plate at 256 px, PatchCore's and PaDiM's peak memory was reached while their 113 test maps were
smoothed by `F.conv2d` with a 1×33 kernel, which goes through im2col (about 0.5 GB of columns). gaussian_blur
now blurs with two matrix products by banded (W, W) and (H, H) matrices built from the same kernel and padding
(same result up to float rounding). Printed: peak resident-memory growth and seconds of each, side by side in
one process, and the largest difference.

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


def blur_by_conv(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) -> (N, H, W): the separable convolution gaussian_blur used before (the reference)."""
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    x = maps[:, None]
    x = F.pad(x, (r, r, 0, 0), mode="reflect" if x.shape[-1] > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect" if x.shape[-2] > r else "replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


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
    cand = gaussian_blur(maps, args.sigma)
    t_cand, b = time.perf_counter() - t, _peak_mb()
    t = time.perf_counter()
    ref = blur_by_conv(maps, args.sigma)
    t_ref, c = time.perf_counter() - t, _peak_mb()
    print(f"{args.n} maps of {args.size}² px ({maps.numel() * 4 / 2**20:.0f} MB), sigma {args.sigma}, "
          f"{torch.get_num_threads()} threads")
    print(f"convolution (before)       peak +{c - b:5.0f} MB  {t_ref:6.2f} s")
    print(f"gaussian_blur (matrix prod) peak +{b - a:5.0f} MB  {t_cand:6.2f} s   ({t_ref / t_cand:.1f}× faster)")
    print(f"largest difference {(ref - cand).abs().max().item():.1e} (maps in [0, 1])")


if __name__ == "__main__":
    main()
