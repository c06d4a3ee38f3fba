"""Load: 50 live streams for 2 minutes on loopback against a REAL DTD server (its own, with stream
limits that fit them). Zero 5xx, every frame accounted for, server memory bounded and reported."""

import json

import pytest

from analysis.cli.load import run_load
from conftest import BLOCK_SIZE

STREAMS, SECONDS, FPS = 50, 120, 2.0
MM_CACHE_GB = 0.5  # vLLM's multimodal processor cache, one in the API server and one in the engine


@pytest.fixture(scope="module")
def load_server(tiny_model_path, tmp_path_factory):
    from analysis.harness.server import VLLMServer

    env = {"DTD_STREAM_MAX_STREAMS": str(STREAMS + 8), "DTD_STREAM_MAX_FRAMES": str(int(SECONDS * FPS) + 64)}
    log = tmp_path_factory.mktemp("logs") / "load.log"
    args = ["--dtd-streams", "--block-size", str(BLOCK_SIZE), "--mm-processor-cache-gb", str(MM_CACHE_GB)]
    with VLLMServer(tiny_model_path, args, module="vllm_plugin.serve", log_path=log, env=env) as srv:
        yield srv


def test_fifty_streams_for_two_minutes(load_server, results_dir):
    out = run_load(load_server.base_url, streams=STREAMS, seconds=SECONDS, fps=FPS, server_pid=load_server.proc.pid)
    results = results_dir / "load"
    results.mkdir(parents=True, exist_ok=True)
    (results / "load.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))  # the report (-s or the CI log's captured output on failure)
    assert out["opened"] == STREAMS
    assert out["server_errors"] == 0 and out["failed"] == 0, out["statuses"]
    assert out["frames_lost"] == 0
    # every stream kept appending for the whole run (real time: ~SECONDS * FPS frames each)
    assert out["frames_sent"] >= STREAMS * SECONDS * FPS * 0.8, out["frames_sent"]
    assert out["latency"]["ask"]["n"] >= STREAMS * (SECONDS // 10 - 2)
    # memory grows only by what the limits allow: the streams' frames (112x112 RGB), the two
    # multimodal caches (processed frames are float32: 4x the bytes), and allocator slack
    held_mb = out["frames_sent"] * 112 * 112 * 3 / 2**20
    bound_mb = held_mb + 2 * MM_CACHE_GB * 1024 + 1024
    assert out["rss_peak_mb"] - out["rss_start_mb"] < bound_mb, (out["rss_start_mb"], out["rss_peak_mb"], bound_mb)
    assert load_server.alive()
