"""The workbench notebooks execute headless (nbclient) and are committed without outputs."""

import json
import os

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_explore_dtd.ipynb", "02_threshold_sweep.ipynb", "03_serving_latency.ipynb", "04_accuracy.ipynb"]


def run_notebook(name: str, env: dict | None = None, timeout: int = 600):
    """Execute a notebook headless; ``timeout`` is per cell and below pytest's (900 s), so a stuck
    cell fails as itself, with the tail of the embedded server's log when the notebook started one."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    except Exception as e:
        pytest.fail(f"{name} failed: {type(e).__name__}: {str(e)[-3000:]}\n{server_log_tail(nb)}", pytrace=False)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def server_log_tail(nb, lines: int = 80) -> str:
    """The last lines of the embedded server's log named in the notebook's outputs, if any."""
    import re
    from pathlib import Path

    m = re.search(r"log: (/[^\s)]+\.log)", outputs_of(nb).replace("\\n", " "))
    if not m or not Path(m.group(1)).is_file():
        return "(no embedded server log)"
    tail = Path(m.group(1)).read_text(errors="replace").splitlines()[-lines:]
    return f"embedded server log {m.group(1)} (last {lines} lines):\n" + "\n".join(tail)


def outputs_of(nb) -> str:
    return json.dumps([c.get("outputs", []) for c in nb.cells], ensure_ascii=False)


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
