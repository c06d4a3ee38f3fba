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


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_with_a_first_markdown_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "What it" in nb.cells[0].source
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: strip outputs before committing"


def test_01_explore_runs_headless():
    nb = run_notebook("01_explore_dtd.ipynb")
    out = outputs_of(nb)
    assert "application/vnd.jupyter.widget-view+json" in out  # the widget app rendered
    assert "kept per step: [64, 0, 0, 0, 0, 0, 2, 2" in out  # the synthetic clip's ground truth
    assert "application/vnd.plotly.v1+json" in out


def test_02_sweep_runs_headless(results_dir):
    nb = run_notebook("02_threshold_sweep.ipynb")
    out = outputs_of(nb)
    assert "drop_ratio" in out and "application/vnd.plotly.v1+json" in out
    assert (results_dir / "sweep" / "results.parquet").is_file()
    # the reference switcher (a widget) and the side-by-side table of the three references
    assert "application/vnd.jupyter.widget-view+json" in out
    assert "motion_drop_ratio_vs_previous" in out and "motion_held_error" in out
