"""A method's wall time alone vs beside a busy neighbour: does adlab's threading fit a shared machine?

For each method, one fresh process per measurement runs `run_methods` (cold: no cache, fresh process) on the data,
first with nothing else started by this script ("idle"), then beside a single-threaded busy-loop process this
script starts and stops ("loaded"). Printed: seconds and the loaded/idle ratio. On a machine with 2 CPUs, losing
one of them to the neighbour should cost about 2×, not 4–10×.

    python benchmarks/bench_threads.py [DATA] [--image-size 128] [--methods autoencoder,padim] [--compare-spin]
        [--param autoencoder.max_steps=100]

--compare-spin also measures libgomp's spinning default (GOMP_SPINCOUNT=300000, what adlab ran with before it
set OMP_WAIT_POLICY=PASSIVE) side by side. Run alone on the machine for clean numbers; the load average printed
before each pair says how idle "idle" was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "adlab": {},  # the engine's own choice: planned threads, OMP_WAIT_POLICY=PASSIVE set at import
    "spin": {"GOMP_SPINCOUNT": "300000"},  # libgomp's default busy-waiting, as before (threads still planned)
}

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from engine.runner import RunConfig, run_methods
data, method, size, params = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
t1 = time.perf_counter()
res = run_methods(data, RunConfig(methods=[method], image_size=size, use_cache=False, params={method: params}))
r = res["runs"][0]
print(json.dumps({"wall_s": time.perf_counter() - t1, "import_s": t1 - t0, "status": r["status"],
                  "error": r["error"], "threads": (r.get("timing") or {}).get("threads"),
                  "auroc": (r.get("metrics") or {}).get("image_auroc")}))
"""


def _measure(data: str, method: str, size: int, params: dict, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra_env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="adlab-bench-threads-") as cache:
        env["ADLAB_CACHE"] = cache
        out = subprocess.run([sys.executable, "-c", CHILD, data, method, str(size), json.dumps(params)], env=env,
                             cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return {"status": "failed", "error": out.stderr.strip().splitlines()[-1:], "wall_s": float("nan")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _busy_neighbour() -> subprocess.Popen:
    """A single-threaded process that spins on one core until stopped."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _parse_params(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in items:
        lhs, v = p.split("=", 1)
        m, k = lhs.split(".", 1)
        try:
            out.setdefault(m, {})[k] = json.loads(v)
        except json.JSONDecodeError:
            out.setdefault(m, {})[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=str(ROOT / "sample_data" / "brick"))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--methods", default="autoencoder,padim", help="a trained and a memory-bank method")
    ap.add_argument("--compare-spin", action="store_true", help="also measure libgomp's spinning default")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE")
    args = ap.parse_args()
    params = _parse_params(args.param)
    sys.path.insert(0, str(ROOT))
    from engine.threads import plan

    p = plan()
    print(f"data {args.data} at {args.image_size} px, fast preset, cold (fresh process, no cache)")
    print(f"threads plan: {p.threads} ({p.why}); neighbour: one busy-loop process")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on the machine count too)\n")
    variants = ["adlab", "spin"] if args.compare_spin else ["adlab"]
    print(f"{'method':<14}{'variant':<8}{'threads':>8}{'idle s':>9}{'loaded s':>10}{'loaded/idle':>13}"
          "  load avg idle/loaded")
    rows: dict[tuple[str, str], tuple[float, float]] = {}
    for method in args.methods.split(","):
        for v in variants:
            load_idle = os.getloadavg()[0]
            idle = _measure(args.data, method, args.image_size, params.get(method, {}), VARIANTS[v])
            nb = _busy_neighbour()
            try:
                time.sleep(0.5)
                load_busy = os.getloadavg()[0]
                loaded = _measure(args.data, method, args.image_size, params.get(method, {}), VARIANTS[v])
            finally:
                nb.kill()
                nb.wait()
            for r in (idle, loaded):
                if r.get("status") != "ok":
                    print(f"  {method} ({v}) failed: {r.get('error')}")
            ratio = loaded["wall_s"] / idle["wall_s"] if idle["wall_s"] > 0 else float("nan")
            rows[(method, v)] = (idle["wall_s"], loaded["wall_s"])
            print(f"{method:<14}{v:<8}{idle.get('threads') or '?':>8}{idle['wall_s']:>9.1f}{loaded['wall_s']:>10.1f}"
                  f"{ratio:>12.2f}×  {load_idle:.1f}/{load_busy:.1f}", flush=True)
    if args.compare_spin:
        print("\nspinning default / adlab, same method and condition (above 1: adlab is faster):")
        for method in args.methods.split(","):
            (ai, al), (si, sl) = rows[(method, "adlab")], rows[(method, "spin")]
            print(f"  {method:<14} idle {si / ai:.2f}×   loaded {sl / al:.2f}×")
    print("\ntarget: loaded/idle ≈ 2× on 2 CPUs (one of them taken by the neighbour)")


if __name__ == "__main__":
    main()
