"""Qwen3-VL served with DTD by a REAL server (``python -m vllm_plugin.serve``, tiny
checkpoints, CPU, HTTP): DTD off equals stock vLLM (plugin not loaded); served masks, prompt lengths,
greedy tokens and top-5 logprobs equal the transformers reference (pixel and feature level); streams:
the chunks' masks are DTD over the whole stream and their timestamps are the stream's.

The stock server stops before the DTD server starts (module-scoped fixtures)."""

import json
import re

import pytest

from analysis.harness.checks import (
    assert_same_greedy,
    assert_same_kept,
    assert_same_mask,
    assert_same_tokens,
    served_top_logprobs,
)
from conftest import COMPILED, chat_video, chat_with_stats, serve_args
from vllm_plugin.client import open_stream
from vllm_plugin.core import DTDConfig

Q = "what happens"
QWEN3_POSITIONS = 2048  # the DTD server's max_position_embeddings and context
CLIPS = ["synthetic", "real"]


@pytest.fixture(scope="module")
def clips(qwen3_mp4, real_clip_mp4):
    return {"synthetic": qwen3_mp4, "real": real_clip_mp4}


@pytest.fixture(scope="module")
def qwen3_stock_answers(qwen3_path, media_dir, clips, tmp_path_factory):
    """Stock vLLM (plugin not loaded) on the Qwen3-VL checkpoint: its answers, then it stops."""
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "qwen3-stock.log"
    with VLLMServer(qwen3_path, serve_args(media_dir) + COMPILED, log_path=log) as srv:
        return {name: chat_video(srv.client(), srv.model, path, Q) for name, path in clips.items()}


@pytest.fixture(scope="module")
def qwen3_server(qwen3_stock_answers, qwen3_path, media_dir, tmp_path_factory):
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "qwen3-dtd.log"
    # a rotary table of 2048 positions as served by vLLM for Qwen3-VL without its own pruning (x1): a long
    # static video's full-prompt positions pass it with fewer tokens than the context (test below)
    small_table = [
        "--hf-overrides",
        json.dumps(
            {
                "architectures": ["Qwen3VLDTDForConditionalGeneration"],
                "text_config": {"max_position_embeddings": QWEN3_POSITIONS},
            }
        ),
        "--max-model-len",
        str(QWEN3_POSITIONS),
    ]
    with VLLMServer(
        qwen3_path,
        serve_args(media_dir) + COMPILED + ["--dtd-streams"] + small_table,
        module="vllm_plugin.serve",
        log_path=log,
    ) as srv:
        yield srv


def _frames(name, qwen3_clip, real_clip_mp4):
    from analysis.lib.video import load_video

    if name == "synthetic":
        return qwen3_clip.frames, qwen3_clip.fps
    v = load_video(real_clip_mp4, fps=None)
    return v.frames, v.fps


@pytest.mark.parametrize("clip", CLIPS)
def test_qwen3_dtd_off_equals_stock_vllm(qwen3_server, qwen3_stock_answers, clips, clip):
    ours, (s,) = chat_with_stats(qwen3_server, clips[clip], dtd_enabled=False)
    stock = qwen3_stock_answers[clip]
    assert s["kept"] == s["total"]
    assert ours.usage.prompt_tokens == stock.usage.prompt_tokens
    assert_same_greedy(*served_top_logprobs(ours), *served_top_logprobs(stock))


CASES = [
    ("synthetic", {}),
    ("real", {}),
    ("real", {"dtd_threshold": 0.1, "dtd_reference": "last_kept"}),
    ("synthetic", {"dtd_criterion": "feature"}),
    ("real", {"dtd_criterion": "feature"}),
]


@pytest.mark.parametrize("clip, mm", CASES, ids=[f"{c}-{json.dumps(m)}" for c, m in CASES])
def test_qwen3_served_equals_the_reference_pipeline(
    qwen3_server, served_qwen3_reference, qwen3_clip, real_clip_mp4, clips, clip, mm
):
    """Same keep mask (digest), prompt length, greedy tokens and top-5 logprobs (1e-4; bf16:
    analysis/harness/checks.py) as transformers' Qwen3-VL with DTD between its vision tower (DeepStack
    levels included) and its LLM."""
    qwen3_reference = served_qwen3_reference
    frames, fps = _frames(clip, qwen3_clip, real_clip_mp4)
    cfg = DTDConfig(
        criterion=mm.get("dtd_criterion", "pixel"),
        threshold=mm.get("dtd_threshold"),
        reference=mm.get("dtd_reference", "previous"),
    )
    prepared = qwen3_reference.prepare(Q, frames, fps, cfg)
    assert 0 < int(prepared.mask.sum()) < prepared.mask.numel()
    resp, (s,) = chat_with_stats(qwen3_server, clips[clip], **mm)
    if not assert_same_mask(s, qwen3_reference, prepared, cfg):  # float32: the same digest
        return  # bf16: a near-threshold feature tie decided the other way, the prompts differ
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens < prepared.full_length
    ids, tops = served_top_logprobs(resp)
    gen = qwen3_reference.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs)


@pytest.mark.parametrize("criterion", ["pixel", "feature"])
def test_qwen3_stream_chunks_equal_the_whole_stream(qwen3_server, served_qwen3_reference, qwen3_clip, criterion):
    """Three appends (eager prefill: three chunks) keep exactly DTD's mask over the whole stream (bf16,
    feature level: up to near-threshold ties), and the prompt's step timestamps are the stream's times,
    not restarted per chunk."""
    qwen3_reference = served_qwen3_reference
    c = qwen3_clip
    cfg = DTDConfig(criterion=criterion)
    whole = qwen3_reference.prepare(Q, c.frames, c.fps, cfg, do_resize=False)  # stream frames are at their size
    s = open_stream(qwen3_server.base_url, fps=c.fps, dtd_criterion=criterion)
    try:
        for k in range(3):
            s.push(c.frames[16 * k : 16 * (k + 1)])
            s.wait_prefilled(timeout=120)
        a = s.ask(Q, max_tokens=4, return_token_ids=True)
        st = s.status()
    finally:
        s.close()
    assert st["size"] == [256, 256] and st["chunks"] == 3
    assert_same_kept(st["kept_per_step"], qwen3_reference, whole, cfg)  # float32: equal
    kept = st["kept_per_step"]
    if criterion == "pixel":
        assert kept == c.expected_kept_per_step()
    text = qwen3_reference.tokenizer.decode(a["stream_state"]["prompt_token_ids"])
    whole_text = qwen3_reference.tokenizer.decode(whole.input_ids)
    stamps = re.findall(r"<([0-9.]+) seconds>", text)
    assert stamps == re.findall(r"<([0-9.]+) seconds>", whole_text) and len(stamps) == len(kept)
    assert a["stream_state"]["video_tokens_per_chunk"] == [sum(kept[:8]), sum(kept[8:16]), sum(kept[16:])]


def test_qwen3_one_chunk_stream_answers_as_the_reference(qwen3_server, served_qwen3_reference, qwen3_clip):
    """A stream whose frames arrive in one append answers a question exactly as the reference does on
    the same frames (one video in the user turn; bf16: up to a near tie)."""
    qwen3_reference = served_qwen3_reference
    c = qwen3_clip
    whole = qwen3_reference.prepare(Q, c.frames, c.fps, DTDConfig(), do_resize=False)
    s = open_stream(qwen3_server.base_url, fps=c.fps, prefill="lazy")
    try:
        s.push(c.frames)
        a = s.ask(Q, max_tokens=4, return_token_ids=True)
    finally:
        s.close()
    assert a["stream_state"]["prompt_token_ids"] == whole.input_ids.tolist()
    gen = qwen3_reference.generate(whole, max_new_tokens=4, stop_at_eos=False)
    assert_same_tokens(a["stream_state"]["completion_token_ids"], gen.token_ids, gen.top_logprobs)


def test_token_count_tool_measures_the_served_prompt(qwen3_server, qwen3_mp4, qwen3_reference, qwen3_clip):
    """``analysis.cli.tokens`` (the table across families in docs/benchmarks.md) on this server: its rows are the
    served prompt tokens and the reference's kept / total counts."""
    from analysis.cli.tokens import measure_clips, table

    rows = measure_clips(qwen3_server, {"synthetic32": qwen3_mp4}, ["pixel"])
    assert [r["mode"] for r in rows] == ["off", "pixel"]
    whole = qwen3_reference.prepare("What happens in this video?", qwen3_clip.frames, qwen3_clip.fps, DTDConfig())
    off, pixel = rows
    assert off["kept"] == off["total"] == pixel["total"] == whole.mask.numel()
    assert pixel["kept"] == int(whole.mask.sum()) and pixel["prompt_tokens"] == whole.num_prompt_tokens
    assert off["prompt_tokens"] == whole.full_length
    md = table([{"label": "qwen3_vl", **r} for r in rows], ["qwen3_vl"], ["pixel"])
    assert f"{off['total']} → {pixel['kept']}" in md


@pytest.mark.parametrize("steps", [120, 600])
def test_a_long_static_video_does_not_take_the_qwen3_server_down(qwen3_server, media_dir, steps):
    """120 static steps (352x352 after the processor): 1,819 prompt tokens whose positions reach 3,017 with
    DTD (each step's grid spans 11 positions for its timestamp tokens) -- past vLLM's x1 rotary table of
    2,048: the engine died. Now the table holds 4x and the answer comes; 600 steps are more tokens than
    the context (a 400). The server answers either way."""
    import numpy as np
    import openai
    import requests

    from analysis.lib.video import write_video

    frames = np.full((2 * steps, 384, 384, 3), 100, np.uint8)
    frames[:, 50:150, 50:150] = 20
    path = write_video(media_dir / f"static384_{steps}.mp4", frames, 2.0)
    if steps == 120:
        resp, (s,) = chat_with_stats(qwen3_server, path)
        assert resp.usage.prompt_tokens < QWEN3_POSITIONS and s["kept"] < s["total"]
    else:
        with pytest.raises(openai.BadRequestError):
            chat_with_stats(qwen3_server, path)
    assert requests.get(qwen3_server.base_url + "/health", timeout=30).status_code == 200
    assert qwen3_server.client().completions.create(model=qwen3_server.model, prompt="hi", max_tokens=1).choices
