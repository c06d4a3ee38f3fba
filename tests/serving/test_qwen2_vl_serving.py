"""Qwen2-VL served with DTD by a REAL server (``python -m vllm_plugin.serve``, tiny checkpoint, CPU,
HTTP): the Qwen2.5-VL glue on Qwen2-VL's classes. Served masks, prompt lengths, greedy tokens and top-5
logprobs equal the transformers reference with DTD off and on (its positions follow vLLM's rule:
temporal position = step index)."""

import pytest

from analysis.harness.checks import compare_to_reference
from conftest import chat_with_stats, serve_args
from vllm_plugin.core import DTDConfig

Q = "what happens"


@pytest.fixture(scope="module")
def qwen2_server(media_dir, tmp_path_factory):
    from analysis.harness.server import VLLMServer
    from analysis.harness.tiny_model import ensure_tiny_model

    log = tmp_path_factory.mktemp("logs") / "qwen2-dtd.log"
    with VLLMServer(
        ensure_tiny_model("test", family="qwen2_vl"), serve_args(media_dir), module="vllm_plugin.serve", log_path=log
    ) as srv:
        yield srv


@pytest.mark.parametrize("dtd", [DTDConfig(enabled=False), DTDConfig()], ids=["off", "default"])
def test_qwen2_vl_served_equals_the_reference_pipeline(qwen2_server, synthetic_mp4, synthetic_clip, dtd):
    """Mask (digest), prompt length, greedy tokens and top-5 logprobs: ``compare_to_reference``, the
    check ``make gpu-check`` runs (float32 here: all equal, logprobs within 1e-4)."""
    from analysis.harness.server import served_torch_dtype
    from analysis.harness.tiny_model import ensure_tiny_model
    from analysis.lib.reference import reference_pipeline

    ref = reference_pipeline(ensure_tiny_model("test", family="qwen2_vl"), served_torch_dtype())
    prepared = ref.prepare(Q, synthetic_clip.frames, synthetic_clip.fps, dtd)
    resp, (s,) = chat_with_stats(qwen2_server, synthetic_mp4, dtd_enabled=dtd.enabled)
    if dtd.enabled:
        assert s["kept_per_step"] == synthetic_clip.expected_kept_per_step()
    compare_to_reference(resp, s, ref, prepared, dtd)
