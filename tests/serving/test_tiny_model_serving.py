"""Tiny checkpoints: deterministic, cached, Qwen-shaped; they load in transformers and serve in vLLM."""

import hashlib

from analysis.harness.checks import assert_same_greedy, served_top_logprobs
from conftest import chat_video


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_serves_in_vllm_and_matches_reference(
    stock_server, tiny_model_path, served_reference, synthetic_clip, synthetic_mp4
):
    """Stock vLLM on the tiny checkpoint == the reference pipeline with DTD disabled: same prompt
    length (text + every video token) and the same greedy top-5 log-probabilities (at the served dtype)."""
    from vllm_plugin.core import DTDConfig

    reference = served_reference
    client = stock_server.client()
    text = client.chat.completions.create(
        model=str(tiny_model_path), messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=0
    )
    assert text.usage.completion_tokens == 3

    resp = chat_video(client, str(tiny_model_path), synthetic_mp4, "what happens")
    prepared = reference.prepare("what happens", synthetic_clip.frames, synthetic_clip.fps, DTDConfig(enabled=False))
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens == prepared.full_length
    ids, tops = served_top_logprobs(resp)
    gen = reference.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs)
