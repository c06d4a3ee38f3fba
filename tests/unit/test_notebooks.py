"""The workbench notebooks execute headless (nbclient) and are committed without outputs."""

import nbformat
import pytest

from conftest import NOTEBOOKS, outputs_of, run_notebook

NAMES = ["01_explore_dtd.ipynb", "02_threshold_sweep.ipynb", "03_serving_latency.ipynb", "04_accuracy.ipynb"]


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
