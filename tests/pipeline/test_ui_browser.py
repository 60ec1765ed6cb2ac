"""The UI in a real browser: `dagster dev` on 127.0.0.1, headless Debian Chromium driven by Playwright.

Materializes the clustering half of the demo profile, opens the asset graph and the elbow_curve asset page,
checks that the assets and the elbow plot are there, and saves screenshots (to docs/images/ for the docs
with MOCE_UPDATE_SCREENSHOTS=1, else to the test's temp dir).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.cli import ASSET_GRAPH_PATH
from pipelines.instance import write_instance_config

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    write_instance_config(home)  # the dagster.yaml `make ui` writes
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MOCE_EXPERIMENT": "demo",
        "MOCE_DATA_DIR": str(root / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    materialize = (
        "import dagster as dg\n"
        "from pipelines.definitions import defs\n"
        "result = defs.resolve_job_def('cluster_instructions').execute_in_process(instance=dg.DagsterInstance.get())\n"
        "assert result.success\n"
    )
    subprocess.run([sys.executable, "-c", materialize], cwd=REPO_ROOT, env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        env=env,
        stdout=(root / "dagster_dev.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/server_info", 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("MOCE_UPDATE_SCREENSHOTS") == "1":
        return REPO_ROOT / "docs" / "images"
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def page(dagster_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        # A first visit (a new browser profile): the "Join the Dagster community" dialog would cover the graph
        # unless the instance turns it off (`nux` in the dagster.yaml `moce` writes); `_screenshot` checks.
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        yield page
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle", timeout=120_000)


def _screenshot(page, path: Path) -> None:
    page.wait_for_timeout(2_000)  # the UI shows its onboarding dialog about a second after the page loads
    assert page.get_by_text("Join the Dagster community").count() == 0, "the onboarding dialog covers the page"
    page.screenshot(path=str(path))


def test_the_printed_address_opens_on_the_whole_asset_graph(dagster_ui, page, screenshots):
    _open(page, f"{dagster_ui}{ASSET_GRAPH_PATH}")
    # The graph opens with each asset group as one node, data -> embedding -> clustering -> training -> evaluation.
    for name in ("data", "embedding", "clustering", "training", "evaluation"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    _screenshot(page, screenshots / "asset_graph.png")


def test_asset_graph_shows_the_pipeline(dagster_ui, page, screenshots):
    _open(page, f"{dagster_ui}/locations/pipelines.definitions/asset-groups/clustering")
    for name in ("elbow_curve", "selected_k", "kmeans_centroids", "cluster_assignments", "instruction_embeddings"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    _screenshot(page, screenshots / "asset_graph_clustering.png")


def test_elbow_curve_page_shows_the_plot(dagster_ui, page, screenshots):
    _open(page, f"{dagster_ui}/assets/elbow_curve")
    row = page.locator("tr", has_text="elbow_plot").first
    row.wait_for(timeout=60_000)
    row.get_by_text("[Show Markdown]").click()
    plot = page.locator("img[src^='data:image/png']").first
    plot.wait_for(timeout=30_000)
    box = plot.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 150
    _screenshot(page, screenshots / "elbow_curve_asset.png")
