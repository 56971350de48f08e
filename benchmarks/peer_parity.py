"""adlab vs anomalib (the peer), method by method, on the same data, backbone, weights and training steps.

    python3 benchmarks/peer_parity.py DATA [DATA ...] [--methods patchcore,padim,...] [--image-size 256]
        [--preset fast] [--out /tmp/peer_parity]

For each dataset and method: `adlab run` in a fresh process (cold feature cache of its own), then
`benchmarks/peer_anomalib.py` in the peer's venv (/tmp/venv-anomalib, see ../shared/peer/README.md) with the
epochs and batch size adlab's run trained for (read from its training summary), and the same coreset ratio,
flow steps or coupling blocks. One process at a time, one after the other, so both see the same machine. Prints
one markdown table (image AUROC / pixel AUROC / fit s for each side) and appends every row to OUT/parity.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer"
PEER_PY = Path(os.environ.get("PEER_PY", "/tmp/venv-anomalib/bin/python"))
METHODS = ["patchcore", "padim", "stfpm", "fastflow", "cflow", "draem", "ganomaly"]


def run_adlab(data: Path, method: str, a: argparse.Namespace, out: Path) -> dict:
    env = dict(os.environ, ADLAB_CACHE=str(out / "cache" / data.name / method))
    args = [sys.executable, "-m", "engine.cli", "run", str(data), "--methods", method, "--preset", a.preset,
            "--out", str(out / "adlab" / data.name / method),
            "--resize", "square"]  # the peer squashes every image to a square: so does adlab here
    if a.image_size:
        args += ["--image-size", str(a.image_size)]
    if method == "padim":  # anomalib's PaDiM fails to invert all 176 Lite0 channels' covariances: both take 100
        args += ["--param", "padim.n_features=100"]
    subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    res = json.loads((out / "adlab" / data.name / method / "results.json").read_text())
    return res["runs"][0] | {"image_size": res["config"]["image_size"], "n_train": res["dataset"]["n_train"]}


def peer_args(method: str, run: dict) -> list[str]:
    """The peer's options that reproduce adlab's configuration of this run."""
    p = run["params"]
    n_train = run["n_train"]
    batch = int(p.get("batch_size", 8))
    training = str((run.get("run_notes") or {}).get("training", ""))
    m = re.search(r"(\d+) steps in \d+ epochs", training)
    # anomalib's epoch is every batch of the training set; as many of them as adlab's optimiser steps.
    epochs = max(1, math.ceil(int(m.group(1)) / math.ceil(n_train / batch))) if m else 1
    if method == "cflow" and m:  # both count epochs over images; a CFlow step is one batch of feature positions
        epochs = int(re.search(r"steps in (\d+) epochs", training).group(1))
    args = ["--epochs", str(epochs), "--batch", str(batch)]
    if method == "patchcore":
        args += ["--coreset", str(p["coreset_ratio"])]
    if method == "padim":
        args += ["--n-features", str(p["n_features"])]
    if method == "fastflow":
        args += ["--flow-steps", str(p["flow_steps"])]
    if method == "cflow":
        args += ["--coupling-blocks", str(p["coupling_blocks"]), "--condition-vector", str(p["cond_dim"])]
    return args


def run_peer(data: Path, method: str, run: dict, out: Path) -> dict:
    view = out / "peer_view" / data.name
    if not view.exists():
        subprocess.run([sys.executable, str(PEER / "folder_view.py"), str(data), str(view)], check=True)
    env = dict(os.environ, TQDM_DISABLE="1")
    jemalloc = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    if jemalloc.exists():  # the peer's best case (its README)
        env["LD_PRELOAD"] = str(jemalloc)
    args = [str(PEER_PY), str(ROOT / "benchmarks" / "peer_anomalib.py"), "--model", method, "--root", str(view),
            "--image-size", str(run["image_size"]), "--workdir", str(out / "peer_runs"), *peer_args(method, run)]
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]) | {"args": args[2:]}
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200], "args": args[2:]}


def fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--out", default="/tmp/peer_parity")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| data | method | adlab image / pixel AUROC | adlab fit s | anomalib image / pixel AUROC | anomalib fit s "
            "| Δ image | peer config |", "|---|---|---|---|---|---|---|---|"]
    for d in a.data:
        data = Path(d).resolve()
        for method in a.methods.split(","):
            ours = run_adlab(data, method, a, out)
            peer = run_peer(data, method, ours, out) if ours["status"] == "ok" else {"error": "adlab failed"}
            with open(out / "parity.jsonl", "a") as f:
                f.write(json.dumps({"data": data.name, "method": method, "adlab": ours, "peer": peer}) + "\n")
            m = ours.get("metrics") or {}
            t = ours.get("timing") or {}
            delta = (m.get("image_auroc") - peer["image_auroc"]) if "image_auroc" in peer and m else None
            peer_cell = (f"{fmt(peer.get('image_auroc'))} / {fmt(peer.get('pixel_auroc'))}" if "error" not in peer
                         else f"failed: {peer['error']}")
            row = (f"| {data.name} | {method} | {fmt(m.get('image_auroc'))} / {fmt(m.get('pixel_auroc'))} | "
                   f"{t.get('fit_s', 0):.1f} | {peer_cell} | {peer.get('fit_s', '—')} | "
                   f"{'—' if delta is None else f'{delta:+.3f}'} | {' '.join(peer.get('args', [])[4:])} |")
            rows.append(row)
            print(row, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
