"""Real-browser tests: start the dashboard, train PatchCore on the sample data in headless Chromium, see a ROC plot
and a heatmap render, then score a dropped image on Try; kill a job's worker process mid-run and see the job fail
with a clear message while the server keeps serving and the next job trains. Skipped (with the reason) only when
Chromium or playwright is absent."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture()
def dashboard(tmp_path: Path):
    """The dashboard on a free port with its own cache folder; yields (base URL, server process)."""
    port = _free_port()
    env = {**os.environ, "ADLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "streamlit.log", "w"))  # noqa: SIM115
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", 45)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def server(dashboard: tuple[str, subprocess.Popen]) -> str:
    """The dashboard's base URL."""
    return dashboard[0]


def _playwright():  # noqa: ANN202
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run scripts/ensure_chromium.sh)")
    return pytest.importorskip("playwright.sync_api", reason="playwright python package not installed")


def test_train_patchcore_in_browser(server: str) -> None:
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(server)
            page.get_by_role("button", name="Next: Train →").click()
            page.get_by_role("heading", name="Train").wait_for()
            _select(page, {"patchcore"})
            page.get_by_role("button", name="Train 1 method(s)").click()
            page.get_by_text("image AUROC").first.wait_for(timeout=80_000)
            page.get_by_role("button", name="Next: compare the results →").click()
            page.locator(".js-plotly-plot").first.wait_for()
            assert page.get_by_text("patchcore (AUROC").count() >= 1
            page.get_by_role("button", name="Heatmaps").first.click()
            page.get_by_role("heading", name="Heatmaps").wait_for()
            imgs = page.locator('[data-testid="stImage"] img')
            imgs.nth(2).wait_for()
            assert imgs.count() >= 3  # image, ground truth, patchcore's map
            assert page.get_by_text("patchcore", exact=True).count() >= 1
            # Try: a dropped image is scored by the trained method, with its heatmap and verdict
            page.get_by_role("link", name="Try").click()
            page.get_by_role("heading", name="Try").wait_for()
            page.locator('input[type="file"]').set_input_files(str(ROOT / "sample_data/brick/test/scratch/000.png"))
            page.get_by_role("heading", name="Verdicts").wait_for()
            page.locator('[data-testid="stImage"] img').nth(1).wait_for()  # the image and patchcore's heatmap
            assert page.get_by_text("ANOMALOUS").count() + page.get_by_text("normal", exact=True).count() >= 1
        finally:
            browser.close()


def _workers_of(pid: int) -> list[int]:
    """Child processes of `pid` named adlab-worker."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == "adlab-worker":
                ppid = next(line.split()[1] for line in (d / "status").read_text().splitlines()
                            if line.startswith("PPid:"))
                if int(ppid) == pid:
                    found.append(int(d.name))
        except (OSError, StopIteration):
            continue
    return found


def _select(page, wanted: set[str]) -> None:  # noqa: ANN001
    """Tick exactly the `wanted` methods in the Train page's picker (whatever the default selection is)."""
    from engine.registry import available

    boxes = page.locator('[data-testid="stCheckbox"]')
    boxes.filter(has_text="patchcore").first.wait_for()  # the picker has rendered
    for name in [m.name for m in available()]:
        box = boxes.filter(has_text=re.compile(rf"(^|\s){re.escape(name)}(\s|$)"))
        if box.count() and box.first.locator("input").is_checked() != (name in wanted):
            box.first.locator("label").click()
            page.wait_for_timeout(500)  # the page reruns after each click


def test_killed_worker_in_browser(dashboard: tuple[str, subprocess.Popen]) -> None:
    """Kill the worker while it trains its second method: the page says why the job failed, the first method is
    kept, the server still answers its health check and the next job trains."""
    url, proc = dashboard
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_role("button", name="Next: Train →").click()
            page.get_by_role("heading", name="Train").wait_for()
            _select(page, {"padim", "autoencoder"})
            page.get_by_role("button", name="Train 2 method(s)").click()
            page.get_by_text("image AUROC").first.wait_for(timeout=120_000)  # padim finished
            workers = _workers_of(proc.pid)
            assert len(workers) == 1, workers  # the autoencoder is training in it now
            os.kill(workers[0], signal.SIGKILL)
            page.get_by_text("stopped by the system, most likely out of memory").wait_for(timeout=30_000)
            assert page.get_by_text("1 of 2 method(s) had finished and are kept").count() >= 1
            assert page.get_by_text("padim done").count() >= 1
            page.get_by_role("button", name="Cancel").wait_for(state="detached")  # the page has re-run since
            shots = ROOT / "benchmarks" / "out" / "screens"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "worker_killed.png"), full_page=True)
            _wait_http(f"{url}/_stcore/health", 5)
            assert proc.poll() is None

            _select(page, {"spade"})
            page.get_by_role("button", name="Train 1 method(s)").click()
            page.get_by_text("spade done").wait_for(timeout=120_000)
            assert not _workers_of(proc.pid)
        finally:
            browser.close()


def test_labelled_anomaly_curve_in_browser(server: str) -> None:
    """"Is labelling worth it?" on the sample gravel: DevNet at K = 0, 1, 3 (the sample has 6 defective images
    per type) beside PatchCore; Compare draws AUROC against K. Leaves a screenshot in benchmarks/out/screens."""
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(server)
            page.locator('[data-testid="stRadio"] label').filter(has_text="gravel").click()
            page.get_by_text("gravel", exact=False).first.wait_for()
            page.wait_for_timeout(1000)
            page.get_by_role("button", name="Next: Train →").click()
            page.get_by_role("heading", name="Train").wait_for()
            _select(page, {"devnet", "patchcore"})
            page.get_by_role("button", name="Is labelling worth it?").click()
            page.get_by_text("patchcore done").wait_for(timeout=300_000)
            assert page.get_by_text("devnet · K=3 done").count() >= 1
            assert page.get_by_text("devnet · K=0 failed").count() >= 1
            page.get_by_role("button", name="Next: compare the results →").click()
            page.get_by_role("heading", name="Is labelling worth it?").wait_for()
            page.get_by_text("Image AUROC against labelled anomalies K").first.wait_for()
            page.get_by_text("Pixel AUROC against labelled anomalies K").first.wait_for()
            assert page.get_by_text("patchcore, unsupervised").count() >= 1
            shots = ROOT / "benchmarks" / "out" / "screens"
            shots.mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(1500)  # let plotly finish drawing
            page.screenshot(path=str(shots / "labelled_curve.png"), full_page=True)
        finally:
            browser.close()
