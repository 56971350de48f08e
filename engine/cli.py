"""`adlab` command line: methods, sample-data, run, predict, sweep, report, dashboard (DESIGN §7)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _methods(args: argparse.Namespace) -> int:
    from engine.registry import FAMILIES, available

    infos = available()
    if args.json:
        print(json.dumps([m.to_dict() for m in infos], indent=2))
        return 0
    for fam, title in FAMILIES.items():
        ms = [m for m in infos if m.family == fam]
        if not ms:
            continue
        print(f"{title} ({fam})")
        for m in ms:
            flags = [] if m.localises else ["no pixel map"]
            if m.supervision == "weak":
                flags.append("needs labelled anomalies")
            if not m.faithful:
                flags.append("NOT YET FAITHFUL to its paper")
            extra = f"  [{'; '.join(flags)}]" if flags else ""
            print(f"  {m.name:<22} {m.paper}{extra}\n  {'':<22} {m.summary}")
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from engine.data import make_sample_data

    out = Path(args.dir)
    make_sample_data(out)
    print(f"sample data written to {out}")
    return 0


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(results: dict[str, Any]) -> None:
    """A plain-text table of the runs."""
    # F1max: the best F1 over all thresholds (image_f1_max), chosen on the test images themselves
    cols = ["method", "status", "img AUROC", "img AP", "F1max", "pix AUROC", "AUPRO", "fit s", "pred s", "img/s",
            "trained in"]
    rows = []
    for r in results["runs"]:
        m = r.get("metrics") or {}
        t = r.get("timing") or {}
        rows.append([r.get("label", r["method"]) + (" (cached)" if r.get("cached") else ""), r["status"],
                     _fmt(m.get("image_auroc")), _fmt(m.get("image_ap")), _fmt(m.get("image_f1_max")),
                     _fmt(m.get("pixel_auroc")), _fmt(m.get("pixel_aupro")), _fmt(t.get("fit_s"), 2),
                     _fmt(t.get("predict_s"), 2), _fmt(t.get("images_per_s"), 1), r.get("train_precision") or "-"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for r in results["runs"]:
        if r["status"] != "ok":
            print(f"\n{r.get('label', r['method'])} failed: {r['error']}", file=sys.stderr)


_WORDS = {"none": None, "null": None, "true": True, "false": False}


def _parse_value(value: str) -> Any:
    """A `--param` value: None/null, true/false (any case), numbers, JSON lists, `a,b` or `(a, b)` tuples,
    else the plain string. The method's own annotations then check the type (registry.check_params)."""
    v = value.strip()
    if v.lower() in _WORDS:
        return _WORDS[v.lower()]
    if v.startswith("(") and v.endswith(")"):
        v = v[1:-1]
        return tuple(_parse_value(x) for x in v.split(",") if x.strip())
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        pass
    if "," in v:
        return tuple(_parse_value(x) for x in v.split(",") if x.strip())
    return v


def _parse_params(items: list[str] | None) -> dict[str, dict[str, Any]] | None:
    """`--param METHOD.NAME=VALUE` options as {method: {name: value}}; None (after printing why) when malformed."""
    params: dict[str, dict[str, Any]] = {}
    for p in items or []:
        try:
            lhs, value = p.split("=", 1)
            method, key = lhs.split(".", 1)
            params.setdefault(method, {})[key] = _parse_value(value)
        except ValueError:
            print(f"error: --param {p!r}: expected METHOD.NAME=VALUE, e.g. patchcore.coreset_ratio=0.1",
                  file=sys.stderr)
            return None
    return params


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.api import AdlabError
    from engine.runner import RunConfig, run_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params = _parse_params(args.param)
    if params is None:
        return 2
    cfg = RunConfig(methods=methods, image_size=args.image_size, device=args.device, backbone=args.backbone,
                    weights=args.weights, preset=args.preset, labeled_anomalies=args.labeled_anomalies,
                    seed=args.seed, params=params, use_cache=not args.no_cache, resize=args.resize, tile=args.tile,
                    tile_overlap=args.tile_overlap)
    save_models = getattr(args, "save_models", None)
    bars: dict[str, Any] = {}
    tty = sys.stderr.isatty()
    last: dict[str, str] = {}

    def progress(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
        if not method:
            return
        label = stage + (f" epoch {info['epoch']}/{info.get('of', '?')}" if "epoch" in info else "")
        if not tty:  # logs and CI: one line per stage change, no bar redraws
            if last.get(method) != stage:
                last[method] = stage
                print(f"[{method}] {label}" + (f": {info['error']}" if "error" in info else ""), file=sys.stderr)
            return
        bar = bars.get(method)
        if bar is None:  # one bar per method running (several with --jobs), closed when it ends
            bar = bars[method] = tqdm(total=100, desc=f"{method:<20}", file=sys.stderr, position=len(bars),
                                      bar_format="{desc} {percentage:3.0f}%|{bar:20}| {postfix}")
        bar.n = 100 if stage in ("done", "failed") else int(100 * (fraction or 0.0))
        bar.set_postfix_str(label, refresh=True)
        if stage in ("done", "failed"):
            bars.pop(method).close()

    jobs = getattr(args, "jobs", 1)
    if jobs > 1 and save_models is not None:
        print("error: --save-models runs the methods one at a time: leave out --jobs", file=sys.stderr)
        return 2
    try:
        if jobs > 1:
            from engine.parallel import run_parallel

            results = run_parallel(args.data, cfg, jobs, progress=progress)
        else:
            results = run_methods(args.data, cfg, progress=progress, save_models=save_models)
    except AdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    print_table(results)
    for w in results["dataset"].get("warnings", []):
        print(f"\nwarning: {w}", file=sys.stderr)
    print(f"\nresults: {out / 'results.json'}")
    if save_models:
        print(f"models: {save_models} (score new images: adlab predict {save_models} IMAGES... --method NAME)")
    return 1 if any(r["status"] != "ok" for r in results["runs"]) else 0


def _predict(args: argparse.Namespace) -> int:
    from engine.api import AdlabError
    from engine.predict import predict_to_folder

    try:
        out = predict_to_folder(args.models, args.images, method=args.method, threshold=args.threshold,
                                out=args.out, device=args.device)
    except AdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max([len("image"), *(len(i["path"]) for i in out["images"])])
    print(f"{'image'.ljust(width)}  {'score':>12}  verdict")
    for i in out["images"]:
        print(f"{i['path'].ljust(width)}  {i['score']:>12.6g}  {i['verdict']}")
    n = sum(i["verdict"] == "anomalous" for i in out["images"])
    print(f"\n{out['method']}: {n} of {len(out['images'])} image(s) anomalous at threshold {out['threshold']:.6g} "
          f"({out['threshold_rule']})")
    print(f"predictions: {Path(args.out) / 'predictions.json'}")
    return 0


def _k_arg(text: str) -> int | list[int]:
    """--labeled-anomalies: one K ("3") as an int, several ("0,1,3,10" or "0-3") as a list (argparse type)."""
    try:
        ks = _int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K ≥ 0 or a comma list like 0,1,3,10") from None
    return ks[0] if len(ks) == 1 and "," not in text and "-" not in text else ks


def _positive_int(text: str) -> int:
    """A whole number ≥ 1 (argparse type)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number ≥ 1")
    return n


def _int_list(text: str) -> list[int]:
    """"0,1,2" or "0-4" (inclusive) as a list of non-negative ints; ValueError when malformed."""
    out: list[int] = []
    for part in (x.strip() for x in text.split(",")):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out += list(range(lo, hi + 1))
        elif part:
            out.append(int(part))
    if not out or min(out) < 0:
        raise ValueError(text)
    return out


def _sweep(args: argparse.Namespace) -> int:
    from engine.api import AdlabError
    from engine.executors import make_executor
    from engine.sweep import SweepConfig, SweepProgress, run_sweep

    params = _parse_params(args.param)
    if params is None:
        return 2
    try:
        seeds = _int_list(args.seeds)
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: expected numbers like 0,1,2 or 0-4", file=sys.stderr)
        return 2
    cfg = SweepConfig(datasets=list(args.data), methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                      seeds=seeds, preset=args.preset, image_size=args.image_size, resize=args.resize,
                      tile=args.tile, tile_overlap=args.tile_overlap, labeled_anomalies=args.labeled_anomalies,
                      device=args.device, backbone=args.backbone, weights=args.weights, params=params,
                      use_cache=not args.no_cache, cache_root=args.cache_root, threads_per_unit=args.threads_per_unit)
    tty = sys.stderr.isatty()

    def progress(p: SweepProgress) -> None:
        print(("\r\033[K" if tty else "") + p.line(), end="" if tty else "\n", file=sys.stderr, flush=True)

    executor = None
    try:
        executor = make_executor(args.executor, address=args.ray_address, num_cpus=args.num_cpus,
                                 cpus_per_unit=args.cpus_per_unit)
        doc = run_sweep(cfg, args.out, executor, progress=progress, resume=not args.restart)
    except AdlabError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    finally:
        if executor is not None:
            executor.close()
    if tty:
        print(file=sys.stderr)
    print_sweep_table(doc)
    print(f"\nsweep: {Path(args.out) / 'sweep.json'} ({doc['wall_s']:.1f} s on {doc['executor']['name']})")
    return 1 if any(u["status"] != "ok" for u in doc["units"]) else 0


def _geometry_args(p: argparse.ArgumentParser) -> None:
    """--resize, --tile and --tile-overlap (run and sweep)."""
    p.add_argument("--resize", default="keep-aspect", choices=["keep-aspect", "square"],
                   help="keep-aspect (default): the short side to --image-size, the long side in the images' "
                        "aspect ratio; square: squash every image to --image-size x --image-size")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="cut each image into overlapping NxN tiles (at native resolution unless --image-size is "
                        "given); maps are stitched back, an image's score is the max over its tiles")
    p.add_argument("--tile-overlap", type=float, default=0.25, metavar="F",
                   help="least overlap of neighbouring tiles, a fraction of a tile (default 0.25)")


def print_sweep_table(doc: dict[str, Any]) -> None:
    """Image AUROC mean ± std over seeds per dataset × method, and failed units with their errors."""
    from collections import defaultdict

    import numpy as np

    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    datasets: list[str] = []
    methods: list[str] = []
    for u in doc["units"]:
        name = u.get("label") or u["method"]  # "devnet · K=3" when the sweep has several K
        datasets += [u["dataset"]] if u["dataset"] not in datasets else []
        methods += [name] if name not in methods else []
        a = (u.get("metrics") or {}).get("image_auroc")
        if u["status"] == "ok" and a is not None:
            cells[(u["dataset"], name)].append(float(a))
    rows = [["image AUROC", *methods]]
    for d in datasets:
        row = [d]
        for m in methods:
            v = cells.get((d, m))
            row.append("failed" if not v else f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for u in doc["units"]:
        if u["status"] != "ok":
            print(f"\n{u['dataset']} · {u.get('label') or u['method']} · seed {u['seed']} failed: {u['error']}",
                  file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from engine.api import AdlabError

    try:
        from dashboard.services.report import write_report

        path = write_report(args.source, args.output, worst=args.worst)
    except AdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adlab", description="Visual anomaly detection lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("methods", help="list the registered methods by family")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_methods)
    p = sub.add_parser("sample-data", help="write the synthetic sample datasets to DIR")
    p.add_argument("dir")
    p.set_defaults(fn=_sample_data)
    p = sub.add_parser("run", help="train and evaluate methods on a dataset")
    p.add_argument("data", help="dataset folder (MVTec or folder layout) or .zip")
    p.add_argument("--methods", required=True, help="comma-separated names, see `adlab methods`")
    p.add_argument("--image-size", type=int, default=None,
                   help="working resolution in px, the short side with --resize keep-aspect (default: 256, or the "
                        "images' own size when smaller; with --tile, their native size)")
    _geometry_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="auto", help="auto | bundled | hub | random | PATH to a weights file")
    p.add_argument("--preset", default="fast", choices=["fast", "quality"])
    p.add_argument("--labeled-anomalies", type=_k_arg, default=0, metavar="K",
                   help="move K anomalous test images per defect type into a labelled training set; a list "
                        "(0,1,3,10) runs each weakly supervised method once per K on the same test images (the "
                        "largest K decides which are held back) and every other method once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE", help="override a method parameter")
    p.add_argument("--no-cache", action="store_true", help="recompute everything, write nothing to the cache")
    p.add_argument("--out", default="adlab-results")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="methods run at once, each group in its own worker process with CPUs/N threads "
                        "(default 1: one after another in this process)")
    p.add_argument("--save-models", metavar="DIR", default=None,
                   help="also write each fitted method to DIR (tensors + JSON), for `adlab predict`")
    p.set_defaults(fn=_run)
    p = sub.add_parser("predict", help="score new images with a model saved by `run --save-models`")
    p.add_argument("models", metavar="MODELS_DIR", help="folder written by `adlab run ... --save-models DIR`")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders of images or .zip files")
    p.add_argument("--method", default=None, help="which saved model (needed when MODELS_DIR holds several)")
    p.add_argument("--threshold", default="f1",
                   help="f1 (the run's F1-max threshold), fpr:N (flag at most a share N of the run's good images, "
                        "e.g. fpr:0.01) or a number")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="adlab-predictions")
    p.set_defaults(fn=_predict)
    p = sub.add_parser("sweep", help="run methods over datasets × seeds, locally or on Ray; writes OUT/sweep.json")
    p.add_argument("data", nargs="+", help="dataset folders (MVTec or folder layout) or .zip files")
    p.add_argument("--methods", required=True, help="comma-separated names, see `adlab methods`")
    p.add_argument("--seeds", default="0", help="seeds as 0,1,2 or 0-4 (default 0)")
    p.add_argument("--preset", default="fast", choices=["test", "fast", "quality"])
    p.add_argument("--image-size", type=int, default=None,
                   help="working resolution in px, the short side with --resize keep-aspect (default: 256, or the "
                        "images' own size when smaller; with --tile, their native size)")
    _geometry_args(p)
    p.add_argument("--labeled-anomalies", type=_k_arg, default=0, metavar="K",
                   help="K labelled anomalies per defect type, or a list (0,1,3,10): one unit per (weak method, K)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="auto", help="auto | bundled | hub | random | PATH to a weights file")
    p.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE", help="override a method parameter")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: one unit at a time in this process; ray: Ray tasks (pip install 'adlab[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, ray://head:10001); default: start a local Ray runtime")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray runtime (default: all)")
    p.add_argument("--cpus-per-unit", type=float, default=1, help="CPUs each Ray task asks for (default 1)")
    p.add_argument("--threads-per-unit", type=int, default=None,
                   help="torch threads while a unit runs (default: the process's; Ray gives its CPUs)")
    p.add_argument("--cache-root", default=None,
                   help="cache folder every unit uses (default $ADLAB_CACHE); on a cluster, a shared path")
    p.add_argument("--no-cache", action="store_true", help="recompute everything, write nothing to the cache")
    p.add_argument("--restart", action="store_true", help="ignore units already done in OUT (default: resume)")
    p.add_argument("--out", default="adlab-sweep")
    p.set_defaults(fn=_sweep)
    p = sub.add_parser("report", help="one self-contained HTML report of a results or sweep folder")
    p.add_argument("source", help="a folder with results.json or sweep.json (or the file itself)")
    p.add_argument("-o", "--output", default="report.html")
    p.add_argument("--worst", type=int, default=3, help="worst misses shown per method (default 3)")
    p.set_defaults(fn=_report)
    p = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(fn=_dashboard)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except BrokenPipeError:
        # The reader went away (`adlab methods | head`): stop quietly, and keep Python's exit-time flush of
        # stdout from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
