"""Every family on one dataset, one preset, one process: the table the family issues ask for.

    OMP_NUM_THREADS=2 ADLAB_CACHE=/tmp/bench_cache .venv/bin/python benchmarks/bench_families.py \
        ../shared/data/mpdd/metal_plate --preset fast --out /tmp/fam_mpdd_fast [--methods a,b] [--heatmaps]

Runs `adlab run` (PatchCore first, as the yardstick, then the trained methods), prints one markdown row per
method — image AUROC / pixel AUROC / AUPRO, fit and predict seconds (the shared backbone pass is charged to
each method as if it ran alone), how training stopped — and with --heatmaps saves image | mask | map overlay
for the same defective test image per method under benchmarks/out/heatmaps/<dataset>_<preset>/ (git-ignored).
Results are cached: re-running after adding methods computes only the new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard.views.images import heat_overlay  # noqa: E402  (the same overlay the Heatmaps page draws)
from engine import registry  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402
from engine.data import discover  # noqa: E402
from engine.runner import load_images, load_prediction  # noqa: E402

DEFAULT = ["patchcore", "stfpm", "reverse_distillation", "efficient_ad", "deep_svdd", "patch_svdd", "fcdd", "fastflow",
           "cflow", "autoencoder", "vae", "draem", "ganomaly", "uniad"]


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def table(results: dict) -> str:
    """Markdown rows for a results.json dict."""
    rows = ["| method | family | image AUROC | pixel AUROC | AUPRO | fit s | predict s | training |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r["status"] != "ok":
            rows.append(f"| {r['method']} | {r['family']} | failed: {r.get('error')} | | | | | |")
            continue
        m, t = r["metrics"], r["timing"]
        notes = r.get("run_notes") or {}
        trained = str(notes.get("training", "")).split(";")[0]  # "N steps in E epochs, S s" (trained methods)
        rows.append(f"| {r['method']}{'' if r.get('faithful', True) else ' (not faithful)'} | {r['family']} | "
                    f"{_fmt(m.get('image_auroc'))} | {_fmt(m.get('pixel_auroc'))} | {_fmt(m.get('pixel_aupro'))} | "
                    f"{t['fit_s']:.1f} | {t['predict_s']:.1f} | {trained} |")
    return "\n".join(rows)


def save_heatmaps(results: dict, out_dir: Path) -> None:
    """image | mask | min-max-scaled map over the image, for one defective test image with a mask."""
    from PIL import Image

    ds = discover(results["dataset"]["path"])
    test = load_images(ds, "test", results["config"]["image_size"])
    held_out = set(results.get("labeled_anomalies", {}).get("paths", []))  # moved into training, not predicted
    if test.masks is None:
        return
    frac = test.masks.flatten(1).float().mean(1)
    # The defective image whose defect covers closest to 5% of it: small enough for the map to have to find it.
    cands = [i for i in range(len(test)) if int(test.labels[i]) == 1 and frac[i] > 0 and test.paths[i] not in held_out]
    if not cands:
        return
    idx = min(cands, key=lambda i: (abs(float(frac[i]) - 0.05), test.paths[i]))
    img = test.images[idx].permute(1, 2, 0).numpy().astype(np.float32) / 255
    mask = np.repeat(test.masks[idx].numpy()[:, :, None].astype(np.float32), 3, 2)
    gap = np.ones((img.shape[0], 4, 3), np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles: list[tuple[str, np.ndarray]] = [("image", img), ("mask", mask)]
    for r in results["runs"]:
        pred = load_prediction(r) if r["status"] == "ok" else None
        if pred is None or pred.maps is None:
            continue
        row_of = {rec["path"]: i for i, rec in enumerate(r["images"])}
        m = pred.maps[row_of[test.paths[idx]]].numpy()
        over = heat_overlay(img, m, float(m.min()), float(m.max()), 0.5).astype(np.float32) / 255
        row = np.concatenate([img, gap, mask, gap, over], 1)
        Image.fromarray((row * 255).astype(np.uint8)).save(out_dir / f"{r['method']}.png")
        tiles.append((r["method"], row[:, -img.shape[1]:]))
    _contact_sheet(tiles).save(out_dir / "all.png")
    print(f"heatmaps for {test.paths[idx]} in {out_dir}")


def _contact_sheet(tiles: list[tuple[str, np.ndarray]], cols: int = 5) -> object:
    """One labelled picture of (name, (H, W, 3) float image) tiles, `cols` per row."""
    from PIL import Image, ImageDraw

    h, w = tiles[0][1].shape[:2]
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 4), rows * (h + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, t) in enumerate(tiles):
        x, y = (k % cols) * (w + 4), (k // cols) * (h + 18)
        sheet.paste(Image.fromarray((t * 255).astype(np.uint8)), (x, y + 16))
        draw.text((x + 2, y + 2), name, fill="black")
    return sheet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--preset", default="fast", choices=["fast", "quality"])
    ap.add_argument("--methods", default=",".join(DEFAULT))
    ap.add_argument("--image-size", default=None, help="px (default: the CLI's: 256 or the images' own size)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--heatmaps", action="store_true")
    args = ap.parse_args(argv)
    for name in args.methods.split(","):
        registry.info(name)  # fail early on a typo
    size = ["--image-size", args.image_size] if args.image_size else []
    rc = cli_main(["run", args.data, "--methods", args.methods, "--preset", args.preset, *size, "--out", args.out])
    results = json.loads((Path(args.out) / "results.json").read_text())
    cat = Path(args.data).resolve()
    print(f"\n{cat.parent.name}/{cat.name}, {results['config']['image_size']} px, preset {args.preset}")
    print(table(results))
    if args.heatmaps:
        here = Path(__file__).resolve().parent
        save_heatmaps(results, here / "out" / "heatmaps" / f"{cat.parent.name}_{cat.name}_{args.preset}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
