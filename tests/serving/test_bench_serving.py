"""The benchmark script: its helpers, and one small real run end to end (two real servers)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, renders_offline

METRICS = """# HELP vllm:kv_cache_usage_perc KV-cache usage.
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",num_gpu_blocks="100"} 1.0
vllm_dtd_decision_seconds_total 0.5
vllm_dtd_decision_seconds_created 1.7e9
"""


def test_small_run_end_to_end(tmp_path, real_clip_mp4, request):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "analysis.cli.bench",
        "--size",
        "test",
        "--video",
        str(real_clip_mp4),
        "--requests",
        "1",
        "--frames",
        "8",
        "--concurrency",
        "2",
        "--no-evs",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"throughput_ratio=([\d.]+) ceiling=([\d.]+) dtd_overhead=([\d.]+)"
        r" vllm_loader_throughput_ratio=([\d.]+)"
        r" feature_throughput_ratio=([\d.]+) feature_dtd_overhead=([\d.]+)",
        last,
    )
    assert m, last
    result = json.loads((out / "bench.json").read_text())
    assert {r["clip"] for r in result["summary"]["per_clip"]} == {"airplane_2fps", "synthetic"}
    for r in result["summary"]["per_clip"]:
        # DTD prompts are shorter, and the uniform baseline got the same video-token budget
        assert r["dtd_prompt_tokens"] < r["stock_prompt_tokens"]
        held = result["held"][r["clip"]]
        assert abs(held["uniform_kept"] - held["kept"]) <= held["uniform_kept"] // 2  # rounded to whole steps
        assert r["uniform_prompt_tokens"] - r["dtd_prompt_tokens"] == held["uniform_kept"] - held["kept"]
        assert r["ceiling"] == pytest.approx(r["stock_prompt_tokens"] / r["dtd_prompt_tokens"])
    assert 0 < float(m.group(3)) < 1 and result["decision"]["decision_s"] > 0
    # feature level: the API server's tower encoded every request, its time is apart from the decision's
    assert 0 < float(m.group(6)) < 1 and result["feature_decision"]["encoder_s"] > 0
    for r in result["summary"]["per_clip"]:
        assert r["feature_prompt_tokens"] < r["stock_prompt_tokens"] and r["feature_encoder_s_per_request"] > 0
        # the same requests with vLLM's own video loader: same prompt length up to a token or two of the mask
        vllm_loader = result["dtd_vllm_loader"][r["clip"]]["c1"]["prompt_tokens"]
        assert (
            abs(vllm_loader - r["dtd_prompt_tokens"]) <= 0.01 * r["stock_prompt_tokens"]
            and r["vllm_loader_throughput_ratio"] > 0
        )
    assert (out / "bench.html").stat().st_size > 1000
    renders_offline(request, out / "bench.html", expected_plots=1)
    assert result["evs"]["outcome"].startswith("skipped")


def test_bench_preprocess_small_run(tmp_path, real_clip_mp4, synthetic_mp4):
    out = tmp_path / "bench_preprocess"
    cmd = [
        sys.executable,
        "-m",
        "analysis.cli.bench_preprocess",
        "--size",
        "test",
        "--video",
        str(real_clip_mp4),
        str(synthetic_mp4),
        "--requests",
        "1",
        "--load-requests",
        "2",
        "--concurrency",
        "2",
        "--no-stock",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = re.fullmatch(r"preprocess_speedup=([\d.]+) mask_agreement=([\d.]+)", p.stdout.strip().splitlines()[-1])
    assert m, p.stdout[-500:]
    result = json.loads((out / "bench_preprocess.json").read_text())
    rows = {r["clip"]: r for r in result["clips"]}
    assert set(rows) == {real_clip_mp4.name, synthetic_mp4.name}
    for r in rows.values():
        assert r["indices_equal"] and r["grid_equal"] and r["served_s_vllm"] > 0 and r["served_s_fast"] > 0
        assert r["prompt_tokens_vllm"] - r["prompt_tokens_fast"] in range(-20, 21)
    # the synthetic clip is not resized (224x224): the same pixels, the same mask
    assert rows[synthetic_mp4.name]["max_abs_diff"] == 0 and rows[synthetic_mp4.name]["mask_agreement"] == 1.0
    assert float(m.group(2)) >= 0.99 and (out / "bench_preprocess.html").stat().st_size > 1000
