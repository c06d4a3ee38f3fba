"""HTML reports render offline: pages from :func:`analysis.lib.reports.write_report` (plotly.js beside
the page, or inline) opened from disk in headless Chromium, with DNS disabled so that nothing could
come from a CDN, must DRAW every figure. Screenshots go to a pytest tmp dir (their paths are printed).
The demo, sweep and bench reports get the same check in their own tests
(:func:`analysis.harness.browser.assert_report_renders`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.harness.browser import assert_report_renders


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report_screenshots")


def _figures():
    from analysis.lib.figures import kept_tokens_figure, threshold_figure

    rows = [
        {"video": video, "criterion": "pixel", "metric": "l1", "reference": "previous", "threshold": t, "drop_ratio": d}
        for video, pts in (
            ("screen_recording.mp4", ((0.02, 0.6), (0.05, 0.83), (0.1, 0.9))),
            ("moviepy_airplane.mp4", ((0.02, 0.2), (0.05, 0.44), (0.1, 0.6))),
        )
        for t, d in pts
    ]
    return [kept_tokens_figure([64, 3, 2], 64), threshold_figure(rows)]


@pytest.mark.parametrize("inline", [False, True], ids=["plotly-js-beside", "inline"])
def test_report_renders_offline(browser, tmp_path, screenshot_dir, inline):
    from analysis.lib.reports import PLOTLY_JS, write_report

    kind = "inline" if inline else "default"
    page = write_report(
        tmp_path / kind / "report.html",
        _figures(),
        f"DTD report ({kind})",
        extra_html="<table id='summary'><tr><td>kept</td><td>69</td></tr></table>",
        inline=inline,
    )
    assert (page.parent / PLOTLY_JS).is_file() != inline  # beside the page unless inline
    shot = screenshot_dir / f"report_{kind}.png"
    state = assert_report_renders(browser, page, shot, expected_plots=2)
    print(
        f"\n{kind} report: plotly.js {state['version']}, traces {[p['traces'] for p in state['plots']]}, "
        f"screenshot {shot}"
    )
    assert [p["traces"] for p in state["plots"]] == [2, 2]  # kept bars + undropped line; one line per video
    assert browser.execute_script("return document.querySelector('#summary td:last-child').textContent") == "69"
    if inline:
        assert state["scripts"] == [""] * len(state["scripts"])  # no script file at all
    else:
        assert any(s.endswith("/" + PLOTLY_JS) for s in state["scripts"])


def test_check_fails_without_plotly_js(browser, tmp_path):
    """The check is not vacuous: a page whose plotly.min.js is missing draws nothing and fails."""
    from analysis.lib.reports import PLOTLY_JS, write_report

    page = write_report(tmp_path / "report.html", _figures()[:1], "no plotly.js")
    (page.parent / PLOTLY_JS).unlink()
    with pytest.raises(AssertionError, match="Plotly is not defined"):
        assert_report_renders(browser, page, timeout=2.0)


def test_check_fails_for_a_cdn_page(browser, tmp_path):
    """A page that takes plotly.js from the CDN (plotly's own ``include_plotlyjs="cdn"``) fails."""
    page = tmp_path / "cdn.html"
    _figures()[0].write_html(page, include_plotlyjs="cdn")
    with pytest.raises(AssertionError, match="remote script src"):
        assert_report_renders(browser, page, timeout=2.0)
