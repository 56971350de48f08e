"""Regenerate the method table in README.md from the registry (between the METHODS markers).

    python scripts/update_readme.py          # rewrite README.md
    python scripts/update_readme.py --check  # exit 1 when README.md is out of date (used by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- METHODS:BEGIN -->", "<!-- METHODS:END -->"


def method_table() -> str:
    from engine.registry import FAMILIES, available

    rows = ["| family | method | paper | pixel map | trained on | faithful to the paper |",
            "|---|---|---|---|---|---|"]
    details = ["", "What each method does differently from its paper, and why:", ""]
    for m in available():
        rows.append(f"| {FAMILIES[m.family]} | `{m.name}` | {m.paper} | {'yes' if m.localises else 'no'} | "
                    f"{'normal images + K labelled anomalies' if m.supervision == 'weak' else 'normal images'} | "
                    f"{'yes' if m.faithful else '**not yet**'}"
                    f"{' (fast: reduced)' if m.faithful and 'fast' in m.reduced_presets else ''} |")
        if m.notes:
            details.append(f"- `{m.name}`: {m.notes}")
    return "\n".join(rows + details)


def render(text: str) -> str:
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:a] + "\n" + method_table() + "\n" + text[b:]


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md method table is out of date: run python scripts/update_readme.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
