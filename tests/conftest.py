"""Shared fixtures. Expensive things (checkpoints, the reference model, vLLM servers) are
session-scoped: one per configuration for the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
BLOCK_SIZE = 32  # KV block size of the DTD test server (the CPU backend needs a multiple of 32)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from analysis.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test")


@pytest.fixture(scope="session")
def synthetic_clip():
    from analysis.synthetic import make_clip

    return make_clip()


@pytest.fixture(scope="session")
def synthetic_mp4(tmp_path_factory, synthetic_clip) -> Path:
    from analysis.video import write_video

    return write_video(tmp_path_factory.mktemp("clips") / "synthetic.mp4", synthetic_clip.frames, synthetic_clip.fps)


@pytest.fixture(scope="session")
def reference(tiny_model_path):
    from analysis.reference import ReferencePipeline

    return ReferencePipeline(tiny_model_path)


def shared_video(name: str) -> Path:
    p = SHARED_VIDEOS / name
    if not p.is_file():
        pytest.skip(f"{p} not available (../shared/videos is provided beside the clone in CI)")
    return p


def serve_args(media_dir: Path) -> list[str]:
    """vLLM flags shared by the test servers: every decoded frame reaches the processor (so the
    reference pipeline sees the same pixels), local files allowed from ``media_dir``."""
    import json

    return [
        "--media-io-kwargs", json.dumps({"video": {"num_frames": -1}}),
        "--allowed-local-media-path", str(media_dir),
        "--max-logprobs", "20",
        "--enable-prompt-tokens-details",
        "--seed", "0",
    ]


@pytest.fixture(scope="session")
def real_clip_mp4(synthetic_mp4) -> Path:
    """The bundled (real, handheld) clip at 2 fps, first 16 frames, re-encoded losslessly so that
    vLLM's decoder and the reference pipeline see the same pixels."""
    from analysis.video import SAMPLE_VIDEO, load_video, write_video

    v = load_video(SAMPLE_VIDEO, fps=2.0, max_frames=16)
    return write_video(synthetic_mp4.parent / "airplane_2fps.mp4", v.frames, 2.0)


@pytest.fixture(scope="session")
def media_dir(synthetic_mp4, real_clip_mp4) -> Path:
    return synthetic_mp4.parent


@pytest.fixture(scope="session")
def dtd_server(tiny_model_path, media_dir, tmp_path_factory):
    """vLLM with the DTD plugin, started the way users start it: python -m vllm_plugin.serve."""
    from analysis.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "dtd.log"
    env = {"VLLM_DTD_STREAM_MAX_STREAMS": "4", "VLLM_DTD_STREAM_MAX_FRAMES": "64"}
    args = serve_args(media_dir) + ["--dtd-streams", "--block-size", str(BLOCK_SIZE)]
    with VLLMServer(tiny_model_path, args, module="vllm_plugin.serve", log_path=log, env=env) as srv:
        yield srv


@pytest.fixture(scope="session")
def stock_server(tiny_model_path, media_dir, tmp_path_factory):
    """Stock vLLM (no DTD model class) serving the tiny checkpoint."""
    from analysis.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "stock.log"
    with VLLMServer(tiny_model_path, serve_args(media_dir), log_path=log) as srv:
        yield srv


def chat_video(client, model: str, video_path: Path, question: str, max_tokens: int = 6, **extra):
    """One greedy chat request with a local video; top-5 logprobs with token ids."""
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{video_path}"}},
            {"type": "text", "text": question},
        ]}],
        max_tokens=max_tokens, temperature=0.0, logprobs=True, top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, **extra},
    )


def served_top_logprobs(resp) -> tuple[list[int], list[dict[int, float]]]:
    """(generated token ids, per step {token id: logprob}) from a chat response."""
    ids, tops = [], []
    for item in resp.choices[0].logprobs.content:
        ids.append(int(item.token.split(":", 1)[1]))
        tops.append({int(t.token.split(":", 1)[1]): t.logprob for t in item.top_logprobs})
    return ids, tops


def assert_same_top_logprobs(a: list[dict[int, float]], b: list[dict[int, float]], atol: float = 1e-4):
    """Same top-5 token sets (up to near-ties) and log-probabilities within float tolerance."""
    assert len(a) == len(b), (len(a), len(b))
    for step, (x, y) in enumerate(zip(a, b)):
        for tok in set(x) & set(y):
            assert abs(x[tok] - y[tok]) <= atol, (step, tok, x[tok], y[tok])
        # a token may fall out of one top-5 only if it ties with the 5th
        for tok in set(x) ^ set(y):
            lp = x.get(tok, y.get(tok))
            fifth = min(min(x.values()), min(y.values()))
            assert abs(lp - fifth) <= atol, (step, tok, lp, fifth)


def generated_when_settled(srv, within: float) -> float:
    """vLLM's generated-tokens counter once it stops moving (no request generating any more). A
    wait on the running gauge instead once let 8,586 tokens (~14 s) pass between the first streamed
    chunk and the hang-up (a CI run; whether the gauge or /metrics lagged was not pinned down), so the
    test reads what the counter adds up to, not when the metrics change."""
    import time

    deadline = time.monotonic() + within
    reads = [srv.metric("vllm:generation_tokens_total")]
    while len(reads) < 3 or len(set(reads[-3:])) > 1:  # unchanged for 4 s
        assert time.monotonic() < deadline, f"still generating {within} s after the client hung up"
        time.sleep(2.0)
        reads.append(srv.metric("vllm:generation_tokens_total"))
    assert srv.metric("vllm:num_requests_running") == 0
    return reads[-1]
