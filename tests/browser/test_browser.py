"""A person's view: JupyterLab in headless Chromium, run 01_explore_dtd.ipynb, move the threshold
slider, and the plot changes. Saves a screenshot to the session's results directory."""

import secrets
import subprocess
import sys
import time

import pytest
import requests

from analysis.harness.browser import chromium_driver
from analysis.harness.server import free_port
from conftest import REPO


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of the notebooks (autosave and checkpoints stay out of the repository);
    the kernel imports the project from the repository (PYTHONPATH)."""
    import os
    import shutil

    port, token = free_port(), secrets.token_hex(16)
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # the server holds its own descriptor of the log: ours closes once it is started
    with open(root / "lab.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                f"--ServerApp.port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                "--ServerApp.allow_root=True",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{base}/api/status?token={token}", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    yield base, token
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def lab_browser(tmp_path_factory):
    driver = chromium_driver(tmp_path_factory.mktemp("chrome-lab"), offline=False)
    yield driver
    driver.quit()


def _wait(predicate, timeout=180, poll=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("condition not met in time")


def _titles(driver):
    # read in one script call: plotly re-renders titles, so element handles can go stale between calls
    return [
        t
        for t in driver.execute_script(
            "return Array.from(document.querySelectorAll('.js-plotly-plot .gtitle')).map(e => e.textContent)"
        )
        if t
    ]


def _press(driver, key, times=1):
    """Press ``key`` on the first slider's handle ``times`` times; a press that hits a handle the widget just
    re-rendered (stale) is retried on the fresh handle, so exactly ``times`` presses land."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    done, stale = 0, 0
    while done < times:
        handle = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle"))[0]
        try:
            if done == 0:
                handle.click()
            handle.send_keys(key)
            done += 1
        except StaleElementReferenceException:
            stale += 1
            assert stale < 20, "the slider kept re-rendering"
            time.sleep(0.5)


def test_threshold_slider_changes_the_plot(lab, lab_browser, results_dir):
    browser = lab_browser
    from selenium.webdriver.common.keys import Keys

    base, token = lab
    browser.get(f"{base}/lab/tree/notebooks/01_explore_dtd.ipynb?token={token}")
    _wait(lambda: browser.execute_script("return !!(window.jupyterapp && document.querySelector('.jp-Notebook'))"))
    _wait(
        lambda: browser.execute_script(
            "const w = window.jupyterapp.shell.currentWidget; "
            "return !!(w && w.sessionContext && w.sessionContext.session"
            " && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle')"
        )
    )
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    before = _wait(lambda: [t for t in _titles(browser) if "kept" in t and "τ=0.05" in t])
    # let "run all" finish (the last cell's output is there), then use the first slider: τ
    _wait(
        lambda: browser.execute_script(
            "const c = window.jupyterapp.shell.currentWidget.content.widgets; "
            "return c[c.length - 1].model.outputs.length > 0"
        )
    )
    time.sleep(1)
    _press(browser, Keys.ARROW_RIGHT, times=10)  # τ 0.05 -> 0.15: a person's ten key presses
    after = _wait(lambda: [t for t in _titles(browser) if "kept" in t and "τ=0.15" in t], timeout=120)
    assert after[0] != before[0]
    out = results_dir / "browser"
    out.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(out / "01_explore_dtd.png"))
    assert (out / "01_explore_dtd.png").stat().st_size > 10_000
