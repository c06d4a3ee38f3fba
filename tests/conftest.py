"""Shared fixtures. Expensive things (checkpoints, the reference model, vLLM servers) are
session-scoped: one per configuration for the whole run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from analysis.harness.browser import CHROMEDRIVER, CHROMIUM, chromium_driver

REPO = Path(__file__).resolve().parent.parent
# the servers the harness starts here (fixtures, tools run as subprocesses, notebooks' embedded ones) skip vLLM's
# compilation (--enforce-eager: each start ~10-15 s shorter on 2 cores); the main servers keep it (COMPILED)
os.environ.setdefault("DTD_TEST_ENFORCE_EAGER", "1")
COMPILED = ["--no-enforce-eager"]  # vLLM's default: the compiled model, as a user's server runs it
TEST_MAX_STREAMS = 17  # streams the DTD test server holds (16 concurrent Realtime sockets in a test, plus a fixture's)
BLOCK_SIZE = 32  # KV block size of the DTD test server (the CPU backend needs a multiple of 32)
DTD_ARCH = "Qwen2_5_VLDTDForConditionalGeneration"
# CI must run the browser tests (scripts/setup.sh installs Chromium there); elsewhere they may be skipped
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI") != "true",
    reason="Debian chromium + chromium-driver (scripts/setup.sh installs them)",
)


# The folder says what a test needs; its marker comes from there, never by hand:
# tests/unit (no server: `make test-fast`), tests/serving (real vLLM servers), tests/browser (headless Chromium).
TIERS = {"unit": (), "serving": ("vllm",), "browser": ("browser",)}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.path)).resolve().relative_to(REPO / "tests").parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/serving or tests/browser")
        item.add_marker(getattr(pytest.mark, tier))
        for name in TIERS[tier]:
            item.add_marker(getattr(pytest.mark, name))
        if tier == "browser":
            item.add_marker(needs_browser)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium without DNS (reports must render offline), shared by the report checks."""
    if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI") != "true":
        pytest.skip("Debian chromium + chromium-driver (scripts/setup.sh installs them)")
    driver = chromium_driver(tmp_path_factory.mktemp("chrome"), offline=True)
    yield driver
    driver.quit()


def renders_offline(request, html: Path, expected_plots: int) -> None:
    """The report drew in headless Chromium without network (screenshot beside it), where a browser
    is available (CI always has one); a text check of the page otherwise."""
    from analysis.harness.browser import assert_offline_source, assert_report_renders

    if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI") != "true":
        assert_offline_source(html.read_text())
        return
    shot = html.with_suffix(".png")
    assert_report_renders(request.getfixturevalue("browser"), html, shot, expected_plots=expected_plots)
    print(f"{html.name}: drew offline, screenshot {shot}")


@pytest.fixture(scope="session", autouse=True)
def results_dir(tmp_path_factory) -> Path:
    """Every tool, notebook and test writes its results here, never into the repository tree."""
    from analysis.lib.paths import RESULTS_ENV

    d = tmp_path_factory.mktemp("results")
    os.environ[RESULTS_ENV] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from analysis.harness.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test")


@pytest.fixture(scope="session")
def qwen3_path() -> Path:
    from analysis.harness.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test", family="qwen3_vl")


@pytest.fixture(scope="session")
def qwen3_reference(qwen3_path):
    from analysis.lib.reference import reference_pipeline

    return reference_pipeline(qwen3_path)


@pytest.fixture(scope="session")
def qwen3_processor(qwen3_path):
    return mm_processor(qwen3_path, "Qwen3VLDTDForConditionalGeneration")


@pytest.fixture(scope="session")
def qwen3_clip():
    """The synthetic clip aligned to Qwen3-VL's tokens (32 px cells, 256 x 256)."""
    from analysis.lib.synthetic import make_clip

    return make_clip(token_px=32)


def mm_processor(model_path, arch: str | None, **config):
    """vLLM's multimodal processor for the checkpoint, built in-process from a ``ModelConfig`` as
    vLLM's renderer builds it (``MULTIMODAL_REGISTRY.create_processor``); ``arch=None``: stock;
    ``config``: more ``ModelConfig`` fields (e.g. ``mm_processor_kwargs``)."""
    import vllm_plugin

    vllm_plugin.register()
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    overrides = {"hf_overrides": {"architectures": [arch]}} if arch else {}
    model_config = ModelConfig(model=str(model_path), max_model_len=4096, **overrides, **config)
    return MULTIMODAL_REGISTRY.create_processor(model_config)


@pytest.fixture(scope="session")
def dtd_processor(tiny_model_path):
    return mm_processor(tiny_model_path, DTD_ARCH)


@pytest.fixture(scope="session")
def stock_processor(tiny_model_path):
    return mm_processor(tiny_model_path, None)


@pytest.fixture(scope="session")
def synthetic_clip():
    from analysis.lib.synthetic import make_clip

    return make_clip()


@pytest.fixture(scope="session")
def synthetic_mp4(tmp_path_factory, synthetic_clip) -> Path:
    from analysis.lib.video import write_video

    return write_video(tmp_path_factory.mktemp("clips") / "synthetic.mp4", synthetic_clip.frames, synthetic_clip.fps)


@pytest.fixture(scope="session")
def reference(tiny_model_path):
    from analysis.lib.reference import ReferencePipeline

    return ReferencePipeline(tiny_model_path)


def shared_video(name: str) -> Path:
    from analysis.lib.paths import SHARED_VIDEOS

    p = SHARED_VIDEOS / name
    if not p.is_file():
        pytest.skip(f"{p} not available (../shared/videos is provided beside the clone in CI)")
    return p


def serve_args(media_dir: Path) -> list[str]:
    """vLLM flags shared by the test servers (:func:`analysis.harness.checks.serve_args`, as the gpu check's)."""
    from analysis.harness.checks import serve_args as shared

    return shared(media_dir)


@pytest.fixture(scope="session")
def real_clip_mp4(synthetic_mp4) -> Path:
    """The bundled (real, handheld) clip at 2 fps, first 16 frames, re-encoded losslessly so that
    vLLM's decoder and the reference pipeline see the same pixels."""
    from analysis.lib.video import SAMPLE_VIDEO, load_video, write_video

    v = load_video(SAMPLE_VIDEO, fps=2.0, max_frames=16)
    return write_video(synthetic_mp4.parent / "airplane_2fps.mp4", v.frames, 2.0)


@pytest.fixture(scope="session")
def qwen3_mp4(synthetic_mp4, qwen3_clip) -> Path:
    """The Qwen3-VL-aligned synthetic clip (256 x 256), lossless, beside the other clips."""
    from analysis.lib.video import write_video

    return write_video(synthetic_mp4.parent / "synthetic32.mp4", qwen3_clip.frames, qwen3_clip.fps)


@pytest.fixture(scope="session")
def media_dir(synthetic_mp4, real_clip_mp4) -> Path:
    return synthetic_mp4.parent


@pytest.fixture(scope="session")
def dtd_server(tiny_model_path, media_dir, tmp_path_factory):
    """vLLM with the DTD plugin, started the way users start it: python -m vllm_plugin.serve."""
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "dtd.log"
    # DTD_ENCODER_GROUP_TOKENS: the engine encodes pixel-level DTD videos in calls of <= 128 tokens (2 steps of
    # the synthetic clip), so every served = reference check here also checks that grouping is exact
    env = {
        "DTD_STREAM_MAX_STREAMS": str(TEST_MAX_STREAMS),
        "DTD_STREAM_MAX_FRAMES": "256",
        "DTD_ENCODER_GROUP_TOKENS": "128",
    }
    # a processor cache of ~2 stream chunks of the synthetic clip: streams outgrow it within a test (test_never_down)
    args = (
        serve_args(media_dir)
        + COMPILED
        + [
            "--dtd-streams",
            "--block-size",
            str(BLOCK_SIZE),
            "--mm-processor-cache-gb",
            "0.008",
        ]
    )
    with VLLMServer(tiny_model_path, args, module="vllm_plugin.serve", log_path=log, env=env) as srv:
        yield srv


@pytest.fixture(scope="session")
def stock_server(tiny_model_path, media_dir, tmp_path_factory):
    """Stock vLLM (no DTD model class) serving the tiny checkpoint."""
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "stock.log"
    with VLLMServer(tiny_model_path, serve_args(media_dir) + COMPILED, log_path=log) as srv:
        yield srv


def chat_video(client, model: str, video_path: Path, question: str, max_tokens: int = 6, **extra):
    """One greedy chat request with a local video; top-5 logprobs with token ids."""
    from analysis.harness.server import video_question

    return client.chat.completions.create(
        model=model,
        messages=video_question(f"file://{video_path}", question),
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, **extra},
    )


def chat_with_stats(srv, video, media_io=None, question: str = "what happens", **mm):
    """One greedy chat request with a local video (6 tokens, top-5 logprobs with token ids) and the
    ``x-dtd-stats`` header's per-video stats (:func:`analysis.harness.checks.chat_with_stats`)."""
    from analysis.harness.checks import chat_with_stats as shared

    return shared(srv, video, question=question, media_io=media_io, **mm)


def decide_step_by_step(tokens, config):
    """The keep mask of ``tokens`` (T, H, W, C) decided one temporal step at a time, the reference
    state carried from step to step (what a stream does), for comparison with the whole video's."""
    import torch

    from vllm_plugin.core import decide_steps

    state, masks = None, []
    for t in range(tokens.shape[0]):
        d = decide_steps(tokens[t : t + 1], config, state=state)
        state = d.state
        masks.append(d.mask)
    return torch.cat(masks)


NOTEBOOKS = REPO / "notebooks"  # the workbench notebooks (run_notebook)


def run_notebook(name: str, env: dict | None = None, timeout: int = 600):
    """Execute a notebook headless; ``timeout`` is per cell and below pytest's (900 s), so a stuck
    cell fails as itself, with the tail of the embedded server's log when the notebook started one."""
    import nbformat
    from nbclient import NotebookClient
    from notebook_kernel import SlicedKernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
            # its channels poll in slices: a reply whose wake-up the socket missed waits ~1 s, not the
            # whole per-cell timeout (tests/notebook_kernel.py)
            kernel_manager_class=SlicedKernelManager,
        ).execute()
    except Exception as e:
        pytest.fail(f"{name} failed: {type(e).__name__}: {str(e)[-3000:]}\n{server_log_tail(nb)}", pytrace=False)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def server_log_tail(nb, lines: int = 80) -> str:
    """The last lines of the embedded server's log named in the notebook's outputs, if any."""
    import re

    m = re.search(r"log: (/[^\s)]+\.log)", outputs_of(nb).replace("\\n", " "))
    if not m or not Path(m.group(1)).is_file():
        return "(no embedded server log)"
    tail = Path(m.group(1)).read_text(errors="replace").splitlines()[-lines:]
    return f"embedded server log {m.group(1)} (last {lines} lines):\n" + "\n".join(tail)


def outputs_of(nb) -> str:
    """Every cell's outputs, as JSON text."""
    import json

    return json.dumps([c.get("outputs", []) for c in nb.cells], ensure_ascii=False)


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


@pytest.fixture(scope="session")
def served_reference(request, tiny_model_path):
    """The Qwen2.5-VL reference pipeline at the served dtype (``analysis.harness.server.served_dtype``),
    what served answers are held to: the ``reference`` fixture itself where that is float32 (CPU), a
    pipeline at the served dtype elsewhere (bf16 on CUDA)."""
    import torch

    from analysis.harness.server import served_torch_dtype

    if served_torch_dtype() == torch.float32:
        return request.getfixturevalue("reference")
    from analysis.lib.reference import ReferencePipeline

    return ReferencePipeline(tiny_model_path, served_torch_dtype())


@pytest.fixture(scope="session")
def served_qwen3_reference(request, qwen3_path):
    """The Qwen3-VL reference pipeline at the served dtype (``qwen3_reference`` itself where that is float32)."""
    import torch

    from analysis.harness.server import served_torch_dtype

    if served_torch_dtype() == torch.float32:
        return request.getfixturevalue("qwen3_reference")
    from analysis.lib.reference import reference_pipeline

    return reference_pipeline(qwen3_path, served_torch_dtype())
