"""Headless Chromium for tests: a driver, and the check that an HTML report drew offline.

:func:`assert_report_renders` opens a report from disk and asserts every plotly figure drew with
plotly.js from a local file or inline: the tests call it for every report kind the suite produces
(demo, sweep, bench, and :mod:`analysis.lib.reports` itself).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1600",
)


def chromium_driver(user_data_dir: str | Path, offline: bool = True):
    """A headless Debian Chromium (Selenium). ``offline``: no DNS at all, so nothing named by a host
    name can load (loopback IP addresses still work)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        raise RuntimeError("chromium_driver: no chromium or chromedriver on PATH")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        *_FLAGS,
        f"--user-data-dir={user_data_dir}",
        *(("--host-resolver-rules=MAP * ~NOTFOUND",) if offline else ()),
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# one call, so that nothing goes stale between reads; every plotly div with its drawn state
_STATE_JS = """
const divs = Array.from(document.querySelectorAll('.plotly-graph-div'));
return {
  ready: document.readyState,
  plotly: typeof window.Plotly !== 'undefined' && typeof window.Plotly.newPlot === 'function',
  version: (window.Plotly && window.Plotly.version) || null,
  plots: divs.map(d => {
    const svg = d.querySelector('.main-svg');
    const box = svg ? svg.getBoundingClientRect() : null;
    return {id: d.id, drawn: d.classList.contains('js-plotly-plot'),
            traces: Array.isArray(d._fullData) ? d._fullData.length : -1,
            svgs: d.querySelectorAll('.main-svg').length,
            width: box ? box.width : 0, height: box ? box.height : 0};
  }),
  unclassed: Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(d => !d.classList.contains('plotly-graph-div')).length,
  scripts: Array.from(document.scripts).map(s => s.src),
  resources: performance.getEntriesByType('resource').map(e => e.name),
};
"""
_SCRIPT_TAG = re.compile(r"<script\b([^>]*)>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
_SRC = re.compile(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", re.IGNORECASE)
_REMOTE = re.compile(r"^\s*(https?:|//|ftp:)", re.IGNORECASE)


def _is_plotly_bundle(body: str) -> bool:
    """The plotly.js library itself (inline mode): it names cdn.plot.ly as a default URL for maps."""
    return body.lstrip().startswith("/**") and "plotly.js v" in body[:200]


def assert_offline_source(source: str) -> None:
    """No script loads from the network: no ``src`` that is http(s):, protocol-relative or
    cdn.plot.ly, and cdn.plot.ly nowhere but inside an inline plotly.js bundle (a figure built with
    ``include_plotlyjs="cdn"`` or ``"require"`` would point there)."""
    for attrs, body in _SCRIPT_TAG.findall(source):
        src = _SRC.search(attrs)
        if src:
            assert not _REMOTE.match(src.group(1)) and "cdn.plot.ly" not in src.group(1), (
                f"remote script src: {src.group(1)}"
            )
        elif not _is_plotly_bundle(body):
            assert "cdn.plot.ly" not in body, "an inline script refers to cdn.plot.ly"
    outside = _SCRIPT_TAG.sub("", source)
    assert "cdn.plot.ly" not in outside, "the page refers to cdn.plot.ly"
    for m in _SRC.finditer(" ".join(re.findall(r"<[^>]+>", outside))):
        assert not _REMOTE.match(m.group(1)), f"remote src: {m.group(1)}"


def report_state(driver) -> dict:
    return driver.execute_script(_STATE_JS)


def _drawn(state: dict, expected_plots: int | None) -> bool:
    plots = state["plots"]
    return (
        state["ready"] == "complete"
        and state["plotly"]
        and len(plots) > 0
        and (expected_plots is None or len(plots) == expected_plots)
        and all(
            p["drawn"] and p["traces"] >= 1 and p["svgs"] >= 1 and p["width"] > 0 and p["height"] > 0 for p in plots
        )
    )


def assert_report_renders(
    driver,
    html_path: str | Path,
    screenshot_path: str | Path | None = None,
    expected_plots: int | None = None,
    timeout: float = 30.0,
) -> dict:
    """Open ``html_path`` (a file on disk) in ``driver`` and assert the report DREW, offline:

    * the page loads no script from the network (:func:`assert_offline_source` on the page source;
      every script ``src`` and every resource the page fetched is a ``file:`` URL);
    * ``window.Plotly`` is defined and every plotly figure div (``.plotly-graph-div``) became a
      ``.js-plotly-plot`` with ``_fullData`` holding at least one trace and a non-empty svg
      ``.main-svg`` inside (``expected_plots``: how many figures, when given).

    Saves a screenshot to ``screenshot_path`` (when given, also when the check fails) and returns
    the page state (plotly version, per-plot traces, scripts, resources)."""
    html_path = Path(html_path).resolve()
    assert html_path.is_file(), f"no report at {html_path}"
    driver.get(html_path.as_uri())
    deadline = time.monotonic() + timeout
    state = report_state(driver)
    while not _drawn(state, expected_plots) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = report_state(driver)
    if screenshot_path is not None:
        screenshot_path = Path(screenshot_path)
        screenshot_path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot_path))
    assert_offline_source(driver.page_source)
    for url in state["scripts"] + state["resources"]:
        assert url == "" or url.startswith("file:"), f"{html_path.name} loaded {url}"
    assert state["plotly"], f"{html_path.name}: window.Plotly is not defined (plotly.js did not load)"
    assert state["plots"], f"{html_path.name}: no plotly figure in the page"
    if expected_plots is not None:
        assert len(state["plots"]) == expected_plots, (
            f"{html_path.name}: {len(state['plots'])} figures, expected {expected_plots}"
        )
    assert state["unclassed"] == 0, state
    for p in state["plots"]:
        assert p["drawn"], f"{html_path.name}: figure {p['id']} was never drawn (not a .js-plotly-plot)"
        assert p["traces"] >= 1, f"{html_path.name}: figure {p['id']} has no _fullData traces ({p['traces']})"
        assert p["svgs"] >= 1 and p["width"] > 0 and p["height"] > 0, (
            f"{html_path.name}: figure {p['id']} has no visible .main-svg: {p}"
        )
    if screenshot_path is not None:
        assert screenshot_path.stat().st_size > 5_000, f"{screenshot_path} looks empty"
    return state
