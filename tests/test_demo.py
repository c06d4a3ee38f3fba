"""The README's main job, run as a user runs it (python -m analysis.demo: real vLLM server)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.vllm
def test_demo_serves_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "analysis.demo", "--out", str(tmp_path), "--speed", "0"], cwd=REPO, capture_output=True,
        text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "kept" in text and "time to first token" in text
    res = json.loads((tmp_path / "demo.json").read_text())
    d, v = res["dtd"], res["vanilla"]
    assert d["prompt_tokens"] == v["prompt_tokens"] - d["stats"]["total"] + d["stats"]["kept"]
    assert d["stats"]["kept"] < d["stats"]["total"]
    assert f"{d['prompt_tokens']} with DTD vs {v['prompt_tokens']} without" in text
    qs = res["stream"]["questions"]
    assert len(qs) >= 2 and all(a["cached_tokens"] < b["cached_tokens"] for a, b in zip(qs, qs[1:]))
    assert res["stream"]["kept_per_step"][0] == res["stream"]["tokens_per_step"]
    assert (tmp_path / "kept_tokens.html").stat().st_size > 1000


def test_demo_reference_only(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "analysis.demo", "--reference-only", "--out", str(tmp_path)], cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["dtd"]["stats"]["kept"] < res["dtd"]["stats"]["total"]
