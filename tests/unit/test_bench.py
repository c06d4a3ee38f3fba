"""The benchmark script: its helpers, and one small real run end to end (two real servers)."""

import pytest

from analysis.cli.bench import Clip, kv_capacity_tokens, metric_sum, summarize, uniform_subsample

METRICS = """# HELP vllm:kv_cache_usage_perc KV-cache usage.
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",num_gpu_blocks="100"} 1.0
vllm_dtd_decision_seconds_total 0.5
vllm_dtd_decision_seconds_created 1.7e9
"""


def test_metric_parsing():
    assert metric_sum(METRICS, "vllm:kv_cache_usage_perc") == 0.25
    assert metric_sum(METRICS, "vllm_dtd_decision_seconds_total") == 0.5
    assert metric_sum(METRICS, "missing") == 0.0
    assert kv_capacity_tokens(METRICS) == 3200
    assert kv_capacity_tokens("") is None


def test_uniform_subsample_matches_the_budget(tmp_path, synthetic_clip):
    from analysis.lib.workbench import tokens_from_frames

    vt = tokens_from_frames(synthetic_clip.frames, 2.0)
    clip = Clip("syn", tmp_path / "syn.mp4", vt.tokens_per_step, vt.grid[0], vt.pixel, vt.frames, 2.0)
    path, mask = uniform_subsample(clip, kept_video_tokens=5 * vt.tokens_per_step + 3, media=tmp_path)
    assert int(mask.sum()) == 5 * vt.tokens_per_step and bool(mask[0].all())
    assert mask.any(dim=(1, 2)).nonzero().flatten().tolist() == [0, 6, 12, 17, 23]
    from analysis.lib.video import load_video

    assert len(load_video(path, fps=None).frames) == 10  # 2 frames per kept step
    _, all_mask = uniform_subsample(clip, 10**6, tmp_path)
    assert bool(all_mask.all())


def test_summary_ratios():
    clips = [Clip("a", None, 10, 4, None, None, 1.0)]
    run = lambda rps, tok, ttft: {
        "c1": {"ttft_p50_s": ttft},
        "cN": {"req_per_s": rps, "wall_s": 8 / rps, "prompt_tokens": tok},
    }
    s = summarize(
        clips,
        {"a": run(2.0, 100, 0.5)},
        {"a": run(1.0, 300, 1.0)},
        {"a": run(2.5, 90, 0.4)},
        {"a": {"kept": 20, "dtd": 0.01, "uniform": 0.05}},
        {"decision_s": 1.0, "preprocess_s": 40.0},
    )
    r = s["per_clip"][0]
    assert (r["throughput_ratio"], r["ceiling"], r["uniform_throughput_ratio"]) == (2.0, 3.0, 2.5)
    assert r["of_ceiling"] == pytest.approx(2 / 3) and r["ttft_p50_ratio_c1"] == 0.5
    assert (s["throughput_ratio"], s["ceiling"], s["dtd_overhead"]) == (2.0, 3.0, 0.025)
