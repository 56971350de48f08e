"""Regenerate engine/_method_catalog.py from the @register decorators (the registry's single source of truth).

    python scripts/update_catalog.py          # rewrite engine/_method_catalog.py
    python scripts/update_catalog.py --check  # exit 1 when it is out of date (the tests check this too)

The catalog lets `adlab methods`, the dashboard's pickers and the README table list the methods without
importing every method module (and torch): `adlab methods` answers in a fraction of a second.
"""

from __future__ import annotations

import pprint
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CATALOG = ROOT / "engine" / "_method_catalog.py"

HEADER = '''"""Every registered method's metadata, generated from the @register decorators: do not edit by hand.

Regenerate with `python scripts/update_catalog.py` after changing a decorator; tests/test_registry_catalog.py
fails while this file and the live registry differ.
"""
# ruff: noqa: E501

'''


def render() -> str:
    from engine.registry import live_catalog

    return HEADER + "METHODS = " + pprint.pformat(live_catalog(), width=118, sort_dicts=False) + "\n"


def main() -> int:
    new = render()
    if "--check" in sys.argv:
        if not CATALOG.exists() or CATALOG.read_text() != new:
            print(f"{CATALOG.relative_to(ROOT)} is out of date: run python scripts/update_catalog.py")
            return 1
        return 0
    CATALOG.write_text(new)
    print(f"wrote {CATALOG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
