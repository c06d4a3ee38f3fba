"""The README's main job, run as a user runs it (python -m analysis.cli.demo: real vLLM server)."""

import json
import subprocess
import sys

from conftest import REPO, renders_offline


def test_demo_serves_and_reports(tmp_path, request):
    out = subprocess.run(
        [sys.executable, "-m", "analysis.cli.demo", "--out", str(tmp_path), "--speed", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "kept" in text and "time to first token" in text and "DTD side by side" in text
    res = json.loads((tmp_path / "demo.json").read_text())
    assert list(res) == ["moviepy_airplane.mp4", "screen_recording.mp4"]  # both bundled clips, handheld and screen
    drop = {}
    for name, r in res.items():
        d, v = r["dtd"], r["vanilla"]
        assert d["prompt_tokens"] == v["prompt_tokens"] - d["stats"]["total"] + d["stats"]["kept"]
        assert d["stats"]["kept"] < d["stats"]["total"]
        assert f"{d['prompt_tokens']} with DTD vs {v['prompt_tokens']} without" in text
        qs = r["stream"]["questions"]
        assert len(qs) >= 2 and all(a["cached_tokens"] < b["cached_tokens"] for a, b in zip(qs, qs[1:]))
        st = r["stream"]
        assert st["kept_per_step"][0] == st["tokens_per_step"]
        drop[name] = 1 - sum(st["kept_per_step"]) / (st["tokens_per_step"] * len(st["kept_per_step"]))
    # the spread a newcomer should see first: handheld ~30% dropped, the fixed view ~80%+
    assert drop["moviepy_airplane.mp4"] < 0.5 < 0.75 < drop["screen_recording.mp4"], drop
    assert f"{drop['screen_recording.mp4']:.1%}" in text
    # feature-level DTD on a stream: every temporal step encoded once (in the API server), kept counts shown
    for r in res.values():
        f = r["stream_feature"]
        assert f["steps_encoded"] == len(f["kept_per_step"]) and f["kept_per_step"][0] == f["tokens_per_step"]
        assert len(f["questions"]) >= 2
    assert "feature-level: kept" in text and "temporal steps encoded" in text
    assert (tmp_path / "kept_tokens.html").stat().st_size > 1000 and (tmp_path / "plotly.min.js").is_file()
    renders_offline(request, tmp_path / "kept_tokens.html", expected_plots=4)
    # it ends with the first clip's stream through OpenAI's Realtime API: the same DTD decisions
    rt = res["moviepy_airplane.mp4"]["stream_realtime"]
    assert rt["kept_per_step"] == res["moviepy_airplane.mp4"]["stream"]["kept_per_step"]
    assert len(rt["questions"]) >= 2 and rt["questions"][-1]["cached_tokens"] > 0
    assert "through OpenAI's Realtime API" in text and "identical to the HTTP stream's" in text
