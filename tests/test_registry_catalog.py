"""The generated method catalog equals the live registry, and the CLI's light commands import no method module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import registry

ROOT = Path(__file__).resolve().parent.parent


def test_catalog_equals_the_live_registry() -> None:
    from engine._method_catalog import METHODS

    live = registry.live_catalog()
    assert [m["name"] for m in METHODS] == [m["name"] for m in live]
    for cat, real in zip(METHODS, live, strict=True):
        assert cat == real, f"{real['name']}: engine/_method_catalog.py is stale; run python scripts/update_catalog.py"


def test_update_catalog_check_passes() -> None:
    out = subprocess.run([sys.executable, "scripts/update_catalog.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr


def test_available_from_the_catalog_matches_info() -> None:
    for m in registry.available():
        live = registry.info(m.name)
        assert live.factory is not None and live.factory.method_name == m.name
        assert live == m and live.to_dict() == m.to_dict()


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(registry.ConfigError, match="unknown method 'nope'.*patchcore"):
        registry.info("nope")


def _cli(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          check=True).stdout


def test_cli_methods_imports_neither_torch_nor_method_modules(tmp_path: Path) -> None:
    listing = tmp_path / "methods.json"
    code = ("import contextlib, io, json, sys\n"
            "from engine.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    main(['methods'])\n"
            "    main(['methods', '--json'])\n"
            f"open({str(listing)!r}, 'w').write(buf.getvalue().split('\\n[', 1)[1])\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'timm', 'faiss', 'numpy')\n"
            "            or m.startswith('engine.methods')))\n")
    assert _cli(code).strip().splitlines()[-1] == "[]"
    expected = json.loads(json.dumps([m.to_dict() for m in registry.available()]))  # tuples become lists
    assert json.loads("[" + listing.read_text()) == expected


def test_cli_help_imports_no_torch() -> None:
    code = ("import sys\nfrom engine.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    assert _cli(code).strip().splitlines()[-1] == "False"


def test_a_method_module_missing_from_the_catalog_is_still_listed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A module added to the registry's list after the catalog was generated (say, by a merge) is imported."""
    (tmp_path / "adlab_fake_method.py").write_text(
        "from engine.registry import register\n"
        "@register(family='gan', name='fake_new', localises=False, paper='p', summary='s')\n"
        "class FakeNew:\n"
        "    def __init__(self, seed: int = 0):\n"
        "        self.seed = seed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_METHOD_MODULES", [*registry._METHOD_MODULES, "adlab_fake_method"])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LOADED", False)
    assert "fake_new" in [m.name for m in registry.available()]
    assert registry.info("fake_new").factory.__name__ == "FakeNew"
    assert registry.create("fake_new", seed=3).seed == 3
