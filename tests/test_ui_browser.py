"""What a person sees in `adaptune ui` after a sweep, in a real browser (Debian's headless chromium).

A 3-trial sweep of the demo's task is recorded with the project's own code (`tests/sweep_store.py`),
`adaptune ui` serves it, and Playwright drives chromium through the links the command prints: the
runs table, a trial's page, the compare view. Screenshots stay in pytest's temporary folder (the
path is printed; pytest keeps the last 3 runs' folders).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import free_port, stop_group
from tests.sweep_store import build_store

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("ADAPTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 180_000  # a 2-core runner under load renders MLflow's pages slowly


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (the test extra: pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set ADAPTUNE_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[dict[str, str]]:
    """`adaptune ui` on a store of a 3-trial sweep; the links it printed."""
    folder = tmp_path_factory.mktemp("ui-store")
    uri = build_store(folder)
    port = free_port()
    log = folder / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "adaptune"), "ui", "--tracking-uri", uri,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"adaptune ui did not answer:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        printed = log.read_text()
        links = dict(re.findall(r"^\s+(runs|compare):\s+(\S+)$", printed, re.MULTILINE))
        assert set(links) == {"runs", "compare"}, printed
        yield {"base": base, "uri": uri, **links}
    finally:
        stop_group(proc, grace_s=10)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def test_the_runs_link_opens_on_the_trials_with_their_accuracy(browser, ui, shots: Path) -> None:
    page = _page(browser, ui["runs"])
    for name in ("lora-r4-qv", "series-b8-attn", "prefix-v4"):
        page.get_by_role("link", name=name).first.wait_for()
    # The runs table, not the GenAI overview.
    page.get_by_text("Training runs", exact=True).filter(visible=True).first.wait_for()
    page.get_by_text("Group: lora").wait_for()  # trials grouped by method, groups open
    page.get_by_text("Additional runs").wait_for()  # the sweep's parent run
    page.get_by_role("columnheader").filter(has_text="accuracy/macro").first.wait_for()
    page.get_by_text("animals-train").first.wait_for()  # the Dataset column
    page.screenshot(path=shots / "runs.png")
    page.get_by_text("Additional runs").click()
    page.get_by_role("link", name="uisweep").last.wait_for()
    page.screenshot(path=shots / "runs-with-parent.png")
    page.close()


def test_a_trials_page_shows_params_metrics_datasets_and_artifacts(browser, ui, shots: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(ui["uri"])
    run = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.info.run_name == "lora-r4-qv")
    page = _page(browser, f"{ui['base']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    page.get_by_role("heading", name="lora-r4-qv").first.wait_for()
    page.get_by_text("accuracy/macro").first.wait_for()
    page.get_by_text("system/cpu_utilization_percentage").first.wait_for()
    page.get_by_text("animals-train").first.wait_for()
    page.get_by_text("adapter.placement").first.wait_for()
    page.screenshot(path=shots / "trial.png", full_page=True)
    page.get_by_role("tab", name="Artifacts").click()
    for artifact in ("adapter", "predictions", "spec.yaml", "summary.json"):
        page.get_by_text(artifact, exact=True).first.wait_for()
    page.screenshot(path=shots / "trial-artifacts.png")
    page.close()


def test_the_compare_link_plots_the_trials_accuracy(browser, ui, shots: Path) -> None:
    page = _page(browser, ui["compare"])
    page.get_by_text("Comparing 3 Runs").first.wait_for()
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for()
    # The plot's metric axis: MLflow picks the last-logged metric; a reader picks accuracy/macro.
    metrics = page.locator("div", has=page.get_by_text("Metrics:", exact=True)).locator("input").last
    metrics.click()
    metrics.fill("accuracy/macro")
    page.keyboard.press("Enter")
    plot.get_by_text("accuracy/macro").first.wait_for()
    page.screenshot(path=shots / "compare.png", full_page=True)
    page.close()
