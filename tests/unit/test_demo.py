"""The README's main job, run as a user runs it (python -m analysis.cli.demo: real vLLM server)."""

import json
import subprocess
import sys

from conftest import REPO, renders_offline


def test_demo_reference_only(tmp_path, request):
    out = subprocess.run(
        [sys.executable, "-m", "analysis.cli.demo", "--reference-only", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "demo.json").read_text())
    assert all(r["dtd"]["stats"]["kept"] < r["dtd"]["stats"]["total"] for r in res.values()) and len(res) == 2
    renders_offline(request, tmp_path / "kept_tokens.html", expected_plots=2)
