"""Peak memory per method above the `import torch` floor, and which stage of the run reaches it.

Each method runs alone in a fresh process (`run_methods`, cold: no cache), so the peak is that method's whole
run as a user would see it: data loading, the backbone pass, fit, predict and the metrics. A sampler thread
reads the resident set size every 10 ms and keeps the largest value per stage of the run's progress reports
(loading, features (train/test), fit, coreset, train, predict, evaluate). Printed per method: the floor
(resident size after `import torch`), the peak, peak − floor, the peak over the backbone floor (a process
that only runs the backbone over the same images, in the same batches), and the stage where the peak was.

    python benchmarks/bench_memory.py [DATA] [--image-size 256] [--methods patchcore,padim] [--preset quality]
Without DATA it uses ../shared/data/mpdd/metal_plate when present, else sample_data/brick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, threading, time

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

import torch
floor = rss_mb()
from engine.runner import RunConfig, run_methods

data, method, size, preset = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stage = ["imports"]
peaks = {}
stop = threading.Event()

def sample():
    while not stop.is_set():
        peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss_mb())
        stop.wait(0.01)

def progress(m, s, f, info):
    s = s.split(" epoch")[0]
    peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss_mb())
    stage[0] = s

t = threading.Thread(target=sample, daemon=True)
t.start()
if method == "__backbone__":
    from engine.backbones import FeatureExtractor, stage_info
    from engine.components.features import _SHARED_STRIDES, run_backbone
    from engine.data import discover, load_split
    ds = discover(data)
    stage[0] = "loading"
    tr, te = load_split(ds, "train", size), load_split(ds, "test", size)
    stage[0] = "backbone"
    layers = tuple(s.name for s in stage_info() if s.stride in _SHARED_STRIDES)
    net = FeatureExtractor(layers=layers)
    feats = [run_backbone(net, tr.images, "cpu"), run_backbone(net, te.images, "cpu")]
    status = "ok"
else:
    res = run_methods(data, RunConfig(methods=[method], image_size=size, preset=preset, use_cache=False,
                                      labeled_anomalies=0), progress=progress)
    status = res["runs"][0]["status"] + (": " + str(res["runs"][0]["error"]) if res["runs"][0]["error"] else "")
stop.set()
t.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"floor": floor, "peak": peak, "stages": peaks, "status": status}))
"""


def measure(data: str, method: str, size: int, preset: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="adlab-bench-mem-") as cache:
        env["ADLAB_CACHE"] = cache
        out = subprocess.run([sys.executable, "-c", CHILD, data, method, str(size), preset], env=env, cwd=ROOT,
                             capture_output=True, text=True)
    if out.returncode != 0:
        return {"status": "crashed: " + " ".join(out.stderr.strip().splitlines()[-1:])}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--methods", default="patchcore,padim")
    ap.add_argument("--preset", default="fast", choices=["fast", "quality"])
    args = ap.parse_args()
    mpdd = ROOT.parent / "shared" / "data" / "mpdd" / "metal_plate"
    data = args.data or str(mpdd if mpdd.exists() else ROOT / "sample_data" / "brick")
    print(f"{data} at {args.image_size} px, {args.preset} preset, cold, one fresh process per row; MB = 2^20 bytes")
    base = measure(data, "__backbone__", args.image_size, args.preset)
    if "peak" not in base:
        print(f"backbone floor failed: {base['status']}")
        return
    print(f"import torch floor {base['floor']:.0f} MB; backbone floor (load images + backbone pass over train and "
          f"test) {base['peak']:.0f} MB, {base['peak'] - base['floor']:.0f} MB above torch\n")
    print(f"{'method':<22}{'peak MB':>9}{'above torch':>13}{'× backbone':>12}  peak stage; stage peaks above torch")
    for name in args.methods.split(","):
        r = measure(data, name, args.image_size, args.preset)
        if "peak" not in r or not r["status"].startswith("ok"):
            print(f"{name:<22} {r['status']}")
            continue
        stages = r["stages"]
        top = max(stages, key=stages.get)
        detail = ", ".join(f"{k} {v - r['floor']:.0f}" for k, v in stages.items() if k != "done")
        print(f"{name:<22}{r['peak']:>9.0f}{r['peak'] - r['floor']:>13.0f}{r['peak'] / base['peak']:>11.2f}×"
              f"  {top}; {detail}", flush=True)


if __name__ == "__main__":
    main()
