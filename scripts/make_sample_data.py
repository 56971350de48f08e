"""Regenerate the project's sample data: ``python scripts/make_sample_data.py [OUT_DIR]`` (default sample_data/).

Builds one small MVTec-layout dataset per category of engine.data.SAMPLE_CATEGORIES from scikit-image's
bundled texture photographs, with defects (scratch, stain, hole) and exact masks drawn by engine.data.synthetic.
Deterministic: running it again gives the same images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.data import discover, make_sample_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Write the sample data and print each category's counts and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(ROOT / "sample_data"), help="output folder")
    args = parser.parse_args(argv)
    total = 0
    for path in make_sample_data(args.out_dir):
        ds = discover(path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        total += size
        print(f"{ds.name}: {ds.n_train} train, {ds.n_test} test, defects {ds.defect_types}, {size / 1e6:.2f} MB")
    print(f"total {total / 1e6:.2f} MB in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
