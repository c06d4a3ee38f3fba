"""The workbench notebooks that need a server execute headless (nbclient): 03 against the test
server, 04 with the server it starts itself."""

import pytest

from conftest import outputs_of, run_notebook


def test_03_serving_runs_against_a_live_server(dtd_server, real_clip_mp4):
    nb = run_notebook(
        "03_serving_latency.ipynb",
        env={"DTD_SERVER_URL": dtd_server.base_url, "DTD_VIDEO_URL": f"file://{real_clip_mp4}"},
    )
    out = outputs_of(nb)
    assert "prompt_tokens" in out and "application/vnd.plotly.v1+json" in out
    assert "requests sent by the slider: [(0.1, " in out  # the slider move sent a request
    assert "cached_tokens" in out
    assert f"Using the server at {dtd_server.base_url}" in out  # it says which server


def test_04_accuracy_starts_an_embedded_server_when_none_answers(results_dir):
    """As a new user runs it: nothing at DTD_SERVER_URL, so it starts (and on exit stops) its own server."""
    import re

    import requests

    from analysis.harness.server import free_port

    nb = run_notebook("04_accuracy.ipynb", env={"DTD_SERVER_URL": f"http://127.0.0.1:{free_port()}"})
    out = outputs_of(nb)
    m = re.search(r"Using an EMBEDDED server at (http://127\.0\.0\.1:\d+)", out)
    assert m and "tiny random-weight checkpoint" in out
    assert "14 passes run" in out and re.search(r"questions=4 accuracy=\d\.\d{4} drop_ratio=\d\.\d{4}", out)
    view = re.search(r"kept (\d+) of (\d+) video tokens; the server sent (\d+)", out)
    assert (
        view and view.group(1) == view.group(3) and int(view.group(1)) < int(view.group(2))
    )  # DTD dropped some, as served
    assert out.count("application/vnd.plotly.v1+json") >= 3 and "application/vnd.jupyter.widget-view+json" in out
    assert (results_dir / "eval_notebook" / "results.parquet").is_file()
    with pytest.raises(requests.RequestException):  # the kernel's exit stopped the embedded server
        requests.get(m.group(1) + "/health", timeout=5)
