"""Speed of the memory-bank methods relative to the floor: one plain backbone forward pass.

For each method: (fit on train + predict on test, cold caches) / (forward of the whole backbone
over the same train + test images). Target on CPU: ≤ 1.5×. Also prints where the time goes
(feature extraction, coreset, kNN/scoring) and the image AUROC, so speed is never bought with
silent quality loss.

    python benchmarks/bench_memory_bank.py [DATA ...] [--image-size 256] [--methods patchcore,padim,spade]
Without DATA it uses ../shared/data/mpdd/metal_plate when present, else sample_data/brick.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="*")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--methods", default="patchcore,padim,spade")
    ap.add_argument("--param", action="append", default=[], help="METHOD.NAME=VALUE")
    args = ap.parse_args()
    os.environ["ADLAB_CACHE"] = tempfile.mkdtemp(prefix="adlab-bench-")
    from engine import registry
    from engine.backbones import FeatureExtractor, stage_info
    from engine.components import features as feats_mod
    from engine.components.features import run_backbone
    from engine.data import discover, load_split
    from engine.metrics import image_metrics

    data = args.data or [p for p in [str(ROOT.parent / "shared/data/mpdd/metal_plate")] if Path(p).exists()] \
        or [str(ROOT / "sample_data/brick")]
    overrides: dict[str, dict] = {}
    for p in args.param:
        lhs, v = p.split("=", 1)
        m, k = lhs.split(".", 1)
        overrides.setdefault(m, {})[k] = float(v) if v.replace(".", "", 1).isdigit() else v
    print(f"torch threads: {torch.get_num_threads()}, image size {args.image_size}")
    for path in data:
        ds = discover(path)
        train = load_split(ds, "train", args.image_size)
        test = load_split(ds, "test", args.image_size)
        all_layers = tuple(s.name for s in stage_info())
        floor_net = FeatureExtractor(layers=all_layers)
        run_backbone(floor_net, train.images[:4], "cpu")  # warm-up
        t0 = time.perf_counter()
        run_backbone(floor_net, train.images, "cpu")
        run_backbone(floor_net, test.images, "cpu")
        floor = time.perf_counter() - t0
        print(f"\n{ds.name}: {len(train)} train / {len(test)} test images; floor (full backbone forward) "
              f"{floor:.2f} s")
        print(f"{'method':<12}{'fit+predict s':>14}{'ratio':>8}{'features s':>12}{'rest s':>9}{'img AUROC':>11}")
        for name in args.methods.split(","):
            feats_mod.clear_memory_cache()
            os.environ["ADLAB_CACHE"] = tempfile.mkdtemp(prefix="adlab-bench-")
            det = registry.create(name, **overrides.get(name, {}))
            stages: dict[str, float] = {}

            def prog(stage: str, fraction: float | None = None, info: dict | None = None, _s=stages) -> None:
                _s.setdefault(stage + "_t0", time.perf_counter())
                _s[stage + "_t1"] = time.perf_counter()

            t0 = time.perf_counter()
            det.fit(train, progress=prog)
            pred = det.predict(test)
            total = time.perf_counter() - t0
            feat_s = feats_mod.backbone_seconds(train, det.feature_layers()) + \
                feats_mod.backbone_seconds(test, det.feature_layers())
            auroc = image_metrics(pred.scores.numpy(), test.labels.numpy())["image_auroc"]
            print(f"{name:<12}{total:>14.2f}{total / floor:>8.2f}{feat_s:>12.2f}{total - feat_s:>9.2f}"
                  f"{auroc:>11.3f}")


if __name__ == "__main__":
    main()
