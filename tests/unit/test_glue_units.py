"""The engine glue in-process, without a server (the fast tier): vLLM's own multimodal processor
for the DTD architecture, built from the tiny checkpoint as vLLM's renderer builds it; the patches
of vLLM internals; the checks that make a vLLM upgrade fail loudly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def processor(dtd_processor):
    return dtd_processor


def _apply(processor, videos, **mm_kwargs):
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext

    tok = processor.info.get_tokenizer()
    pad = "<|vision_start|><|video_pad|><|vision_end|>"
    prompt = tok.encode(
        f"<|im_start|>user\n{pad * len(videos)}what?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    items = processor.info.parse_mm_data({"video": videos})
    out = processor.apply(
        ProcessorInputs(prompt=prompt, mm_data_items=items, hf_processor_mm_kwargs=mm_kwargs),
        TimingContext(enabled=False),
    )
    video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
    return out, sum(1 for t in out["prompt_token_ids"] if t == video_pad)


def _video(frames: np.ndarray, fps: float = 2.0):
    n = len(frames)
    meta = {
        "fps": fps,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "duration": n / fps,
        "video_backend": "test",
    }
    return frames, meta


def test_processor_keeps_the_core_mask_and_emits_only_kept_tokens(processor, synthetic_clip):
    from vllm_plugin.core import dtd_keep_mask, frame_tokens
    from vllm_plugin.models.base import MASK_KEY

    frames = synthetic_clip.frames
    out, n_pad = _apply(processor, [_video(frames)], dtd_threshold=0.05)
    mask = out["mm_kwargs"]["video"][0][MASK_KEY].data
    expected = dtd_keep_mask(frame_tokens(torch.from_numpy(frames)), 0.05, "l1").flatten()
    assert torch.equal(mask, expected)
    assert n_pad == int(expected.sum()) < expected.numel()
    off, n_off = _apply(processor, [_video(frames)], dtd_enabled=False)
    assert n_off == expected.numel()


def test_a_given_mask_is_served_as_is_and_one_that_does_not_fit_is_decided_again(processor, synthetic_clip, caplog):
    from vllm_plugin.entrypoints.options import GIVEN_MASK
    from vllm_plugin.models.base import MASK_KEY

    frames = synthetic_clip.frames[:8]  # 4 temporal steps of 8x8 tokens
    given = np.zeros((4, 8, 8), bool)
    given[0, 0, :3] = given[2, 5, 5] = True
    video, meta = _video(frames)
    out, n_pad = _apply(processor, [(video, {**meta, GIVEN_MASK: given})])
    assert n_pad == 4 and torch.equal(out["mm_kwargs"]["video"][0][MASK_KEY].data, torch.from_numpy(given).flatten())
    with pytest.raises(ValueError, match=r"dtd_keep_mask must be a bool array of shape \(T, H, W\)"):
        _apply(processor, [(video, {**meta, GIVEN_MASK: given.astype(np.uint8)})])
    # frames the processor resized (a mask of another grid): DTD is decided on what it produced
    with caplog.at_level("WARNING", logger="vllm.dtd_plugin"):
        redone, n_redone = _apply(processor, [(video, {**meta, GIVEN_MASK: given[:3]})], dtd_threshold=0.05)
    plain, n_plain = _apply(processor, [_video(frames)], dtd_threshold=0.05)
    assert n_redone == n_plain and "does not fit the processed video" in caplog.text
    empty, n_empty = _apply(processor, [(video, {**meta, GIVEN_MASK: np.zeros((4, 8, 8), bool)})])
    assert n_empty == 1  # a fully static chunk keeps one token: never an empty placeholder


def test_stream_frames_fit_the_served_processor_whatever_its_size_settings(tiny_model_path, synthetic_clip, caplog):
    """Streams size frames with the served processor itself: settings the stream does not parse
    (``videos_kwargs``) still give frames the processor keeps as they are, so the masks decided on
    arrival are the ones served."""
    from conftest import DTD_ARCH, mm_processor
    from vllm_plugin.core import DTDConfig
    from vllm_plugin.entrypoints.options import GIVEN_MASK
    from vllm_plugin.models.base import MASK_KEY
    from vllm_plugin.streams.service import processor_sizer
    from vllm_plugin.streams.session import Geometry, StreamManager, StreamSettings

    proc = mm_processor(tiny_model_path, DTD_ARCH, mm_processor_kwargs={"videos_kwargs": {"max_pixels": 112 * 112}})
    sizer = processor_sizer(proc, 14, 2)
    assert sizer(448, 448) == (112, 112) and sizer(360, 640) == Geometry(max_pixels=112 * 112).target_size(360, 640)
    s = StreamManager(geometry=Geometry(sizer=sizer)).open(StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05)))
    s.add_frames(list(synthetic_clip.frames[:8]))
    s.cut_chunk()
    ((frames, meta),) = s.video_items()
    with caplog.at_level("WARNING", logger="vllm.dtd_plugin"):
        out, n_pad = _apply(proc, [(frames, meta)])
    assert "does not fit" not in caplog.text
    assert torch.equal(out["mm_kwargs"]["video"][0][MASK_KEY].data, torch.from_numpy(meta[GIVEN_MASK]).flatten())
    assert n_pad == max(1, sum(s.kept_per_step))


def test_the_dtd_processor_patches_vllm_here_and_the_patched_validation_works(processor):
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    from vllm_plugin.entrypoints import vllm_patches

    assert len(vllm_patches.active()) == len(vllm_patches.PATCHES) == 3
    validate = online_renderer.validate_request_mm_kwargs
    validate(mm_processor_kwargs={"dtd_threshold": 0.1}, media_io_kwargs=None, trust_request_mm_kwargs=False)
    with pytest.raises(VLLMValidationError, match="dtd_threshold"):
        validate(mm_processor_kwargs={"dtd_threshold": 7}, media_io_kwargs=None, trust_request_mm_kwargs=False)
    with pytest.raises(VLLMValidationError):  # every other key keeps vLLM's own rule
        validate(mm_processor_kwargs={"fps": 1}, media_io_kwargs=None, trust_request_mm_kwargs=False)


STOCK_SCRIPT = """
import sys
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.renderers import online_renderer
from vllm_plugin import register
from vllm_plugin.entrypoints import vllm_patches
register()
MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=sys.argv[1], dtype="float32", max_model_len=16384))
print("ACTIVE", vllm_patches.active(), getattr(online_renderer.validate_request_mm_kwargs, "_vllm_dtd_wrapped", False))
"""


def test_a_stock_architecture_with_the_plugin_installed_is_not_patched(tiny_model_path):
    """register() runs in every vLLM process; serving a stock architecture must leave vLLM as it is."""
    out = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(tiny_model_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ACTIVE [] False" in out.stdout


def test_patches_apply_only_in_api_server_processes(monkeypatch):
    import multiprocessing

    from vllm_plugin.entrypoints import vllm_patches

    for name, expected in (
        ("MainProcess", True),
        ("ApiServer_1", True),
        ("EngineCore_DP0", False),
        ("VllmWorker-0", False),
    ):
        monkeypatch.setattr(multiprocessing.current_process(), "name", name)
        assert vllm_patches.in_api_server_process() is expected


def test_a_vllm_that_changed_fails_loudly_naming_the_version():
    import vllm

    from vllm_plugin.entrypoints.vllm_patches import VLLMMismatch, check_overrides, require

    class Base:
        def hook(self, a, b):
            pass

    class Renamed:
        def hook(self, a, c):
            pass

    class Ours(Base):
        def hook(self, a, b):
            pass

        def _gone(self):
            pass

    with pytest.raises(VLLMMismatch, match=rf"_gone.*vLLM {vllm.__version__}"):
        check_overrides(Ours, Base)

    class OursToo(Renamed):
        def hook(self, a, b):
            pass

    with pytest.raises(VLLMMismatch, match=r"takes \['a', 'b'\].*it takes \['a', 'c'\]"):
        check_overrides(OursToo, Renamed)
    with pytest.raises(VLLMMismatch, match="does not have"):
        require(Base, "missing")


def test_stream_prompts_come_from_the_chat_template(tiny_model_path):
    from transformers import AutoTokenizer

    from vllm_plugin.streams.prompt import ChatPrompt

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    template = (tiny_model_path / "chat_template.jinja").read_text()
    conv = ChatPrompt(tok, template)
    assert conv.end_of_turn == "<|im_end|>\n"
    first = conv.next_turn("what?", videos=1)
    assert tok.decode(first) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>what?<|im_end|>\n<|im_start|>assistant\n"
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = tok.encode("a b", add_special_tokens=False) + [im_end]
    conv.commit(first, "what?", 1, answer, "a b", stop_ids=[im_end])
    second = conv.next_turn("and now?", videos=0)
    assert second[: len(first) + len(answer)] == first + answer  # the past keeps its ids: the prefix cache serves it
    assert (
        tok.decode(second[len(first) + len(answer) :])
        == "\n<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n"
    )
    # eager prefill: the open turn up to its videos is a prefix of the question's prompt
    conv.commit(second, "and now?", 0, answer, "a b", stop_ids=[im_end])
    prefill = conv.video_prefix(2)
    third = conv.next_turn("now?", videos=2)
    assert third[: len(prefill)] == prefill and tok.decode(prefill).endswith(
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
    )
    assert tok.decode(third[len(prefill) :]) == "now?<|im_end|>\n<|im_start|>assistant\n"


def test_a_forgotten_turn_leaves_its_videos_and_drops_its_words(tiny_model_path):
    """``remember: false``: the next question sees the same videos as a prefix, not the past question."""
    from transformers import AutoTokenizer

    from vllm_plugin.streams.prompt import ChatPrompt

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    conv = ChatPrompt(tok, (tiny_model_path / "chat_template.jinja").read_text())
    first = conv.next_turn("first?", videos=1)
    conv.forget(1)
    second = conv.next_turn("second?", videos=2)
    head = conv.video_prefix(1)
    assert first[: len(head)] == head and second[: len(head)] == head  # the first video's tokens are shared
    text = tok.decode(second)
    assert "first?" not in text and "<|im_start|>assistant" not in text[: text.rindex("<|im_start|>assistant")]
    assert text.endswith(
        "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "second?<|im_end|>\n<|im_start|>assistant\n"
    )
    # a remembered question after it keeps the forgotten turn's videos in its own turn
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    conv.commit(second, "second?", 2, [im_end], "", stop_ids=[im_end])
    third = conv.next_turn("third?", videos=0)
    assert third[: len(second)] == second and tok.decode(third).count("<|video_pad|>") == 2
    assert "first?" not in tok.decode(third) and tok.decode(third).count("second?") == 1
