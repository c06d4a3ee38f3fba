"""Never down, in process (fast tier: no server): positions stay within the rotary table, work stays bounded.

The processor's position bound is checked against the model class's own M-RoPE rule (the one the
engine runs), the rotary table is sized in place, and the stream's helpers refuse or bound what
would pass it."""

import types

import numpy as np
import pytest
import torch

from conftest import mm_processor

PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens<|im_end|>\n"


def _process(processor, frames: np.ndarray, fps: float, **kwargs):
    n = len(frames)
    meta = {
        "fps": fps,
        "duration": n / fps,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "test",
        "do_sample_frames": False,
    }
    items = processor.info.parse_mm_data({"video": [(frames, meta)]})
    return processor(PROMPT, items, hf_processor_mm_kwargs=kwargs)


def _model_positions(arch: str, processor, result) -> torch.Tensor:
    """The engine's M-RoPE positions of a processed prompt: the DTD model class's own rule, run on a
    stand-in that has only what the rule reads (the HF config)."""
    from vllm_plugin.models.families import family_for_architecture

    module, name = family_for_architecture(arch).model_class.split(":")
    cls = getattr(__import__(module, fromlist=[name]), name)
    view = types.SimpleNamespace(config=processor.info.get_hf_config())
    if hasattr(cls, "iter_mm_grid_thw"):  # Qwen2-VL / Qwen2.5-VL's rule reads the grids through it
        view.iter_mm_grid_thw = types.MethodType(cls.iter_mm_grid_thw, view)
    features = [
        types.SimpleNamespace(data=item, modality="video", mm_position=where)
        for item, where in zip(result["mm_kwargs"]["video"], result["mm_placeholders"]["video"])
    ]
    positions, _ = cls.get_mrope_input_positions(view, list(result["prompt_token_ids"]), features)
    return positions


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 1.0])
def test_the_processors_position_bound_is_the_models_largest_position(family, threshold, synthetic_clip, qwen3_clip):
    """largest position = prompt length - 1 + what the items span beyond their tokens (the processor's
    record), for DTD keeping all, some, or one token; static frames far apart in time included."""
    from analysis.harness.tiny_model import ensure_tiny_model
    from vllm_plugin.models.base import ITEM_EXTRA_POSITIONS
    from vllm_plugin.models.families import get_family

    arch = get_family(family).dtd_architecture
    processor = mm_processor(ensure_tiny_model("test", family=family), arch)
    clip = synthetic_clip if family == "qwen2_5_vl" else qwen3_clip
    for frames, fps in [(clip.frames[:16], 2.0), (np.repeat(clip.frames[:1], 24, axis=0), 0.05)]:
        result = _process(processor, frames, fps, dtd_threshold=threshold)
        positions = _model_positions(arch, processor, result)
        extra = ITEM_EXTRA_POSITIONS.lookup(result["mm_hashes"]["video"][0])
        assert int(positions.max()) == len(result["prompt_token_ids"]) - 1 + extra, (frames.shape, fps)


def test_a_video_whose_frames_are_far_apart_is_refused_before_the_engine(dtd_processor, synthetic_clip):
    """Frames 100,000 s apart: Qwen2.5-VL's temporal index passes the rotary table (stock vLLM's engine
    dies on it); the processor refuses it with a 400 that names the table."""
    from vllm_plugin.models.base import PositionLimitError

    _process(dtd_processor, synthetic_clip.frames[:8], 2.0)  # an ordinary video passes
    with pytest.raises(PositionLimitError, match="rotary table of 131072 positions") as e:
        _process(dtd_processor, synthetic_clip.frames[:8], 1e-5)
    assert isinstance(e.value, ValueError)


def test_rotary_tables_are_sized_in_place_and_checked():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_plugin.entrypoints.vllm_patches import VLLMMismatch, size_rotary_tables

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            64,
            1024,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12]},
            dtype=torch.float32,
            mrope_positions_factor=1,
        )
    model = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    model[0].rotary_emb = model[1].rotary_emb = rope  # one table shared by the layers, as get_rope does
    before = rope.cos_sin_cache.clone()
    assert before.shape[0] == 1024
    assert size_rotary_tables(model, 4096) == 1
    assert rope.cos_sin_cache.shape[0] == 4096
    assert torch.equal(rope.cos_sin_cache[:1024], before)  # the positions it had keep their values
    with pytest.raises(VLLMMismatch, match="has M-RoPE tables"):
        size_rotary_tables(torch.nn.Linear(2, 2), 4096)


def test_a_yarn_rotary_table_keeps_its_frequencies_when_enlarged():
    """YaRN's frequencies depend on max_position_embeddings: the enlarged table continues vLLM's rows
    exactly (changing that attribute, as for a plain table, would change every row)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_plugin.entrypoints.vllm_patches import size_rotary_tables

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            64,
            256,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "mrope_section": [8, 12, 12],
            },
            dtype=torch.float32,
            mrope_positions_factor=1,
        )
    assert rope.scaling_factor == 4.0 and rope.cos_sin_cache.shape[0] == 1024
    before = rope.cos_sin_cache.clone()
    model = torch.nn.Module()
    model.rotary_emb = rope
    size_rotary_tables(model, 4096)
    assert rope.cos_sin_cache.shape[0] == 4096 and torch.equal(rope.cos_sin_cache[:1024], before)
    assert rope.max_position_embeddings == 256  # YaRN's own parameter is left as it was


def _service():
    from types import SimpleNamespace

    from vllm_plugin.streams.service import StreamService
    from vllm_plugin.streams.session import StreamManager

    engine = SimpleNamespace(
        server_dtd={}, max_model_len=16384, position_room=131072 - 16384, step_positions=lambda fps: 2 / fps * 2
    )
    return StreamService(engine, StreamManager())


def test_a_stream_fps_that_would_pass_the_table_is_refused_at_open():
    from vllm_plugin.errors import InvalidOption
    from vllm_plugin.streams.routes import OpenStreamRequest

    svc = _service()
    assert svc.settings(OpenStreamRequest(fps=0.1)).fps == 0.1  # 40 positions per step: fine
    with pytest.raises(InvalidOption, match="rotary table"):
        svc.settings(OpenStreamRequest(fps=1e-5))
    with pytest.raises(InvalidOption, match="standing_question has"):
        svc.settings(OpenStreamRequest(standing_question="x" * (32 * 16384 + 1)))


def test_the_encoder_queue_never_calls_the_tower_with_more_than_its_step_limit():
    from vllm_plugin.streams.encoding import EncodeQueue

    calls = []

    def encode_many(inputs):
        calls.append(sum(int(g[0]) for _, g in inputs))
        return [pv.repeat(1, 3) for pv, _ in inputs]

    def patchify(frames):  # 2 frames per step, 4 tokens per step; the first frame's value tags the rows
        steps = len(frames) // 2
        return torch.tensor(frames[::2, 0, 0, :1], dtype=torch.float32).repeat_interleave(4, 0), torch.tensor(
            [steps, 4, 4]
        )

    q = EncodeQueue(patchify, encode_many, max_pending_steps=256, max_batch_steps=16)
    frames = np.arange(256, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)  # 128 steps
    q.reserve(128)
    out = q.submit(frames, 128).result(timeout=60)
    assert max(calls) <= 16 and sum(calls) == 128
    assert out.shape == (128 * 4, 3)
    assert torch.equal(out[::4, 0], torch.arange(0, 256, 2, dtype=torch.float32))  # in order
    assert q.pending == 0


def test_a_data_uri_without_a_comma_is_a_400():
    from vllm_plugin.errors import InvalidRequest
    from vllm_plugin.streams.routes import _b64, http_status

    with pytest.raises(InvalidRequest, match="comma") as e:
        _b64("data:image/png;base64", 1024)
    assert http_status(e.value) == 400


def test_a_video_over_the_per_item_token_cap_is_refused_with_dtd_on(dtd_processor, synthetic_clip, monkeypatch):
    from vllm_plugin.models.base import MAX_VIDEO_TOKENS_ENV, VideoTooLargeError

    frames = synthetic_clip.frames[:8]  # 4 steps of 64 tokens: 256 before DTD
    monkeypatch.setenv(MAX_VIDEO_TOKENS_ENV, "255")
    with pytest.raises(
        VideoTooLargeError, match=f"256 video tokens before DTD.*at most 255 per video \\({MAX_VIDEO_TOKENS_ENV}\\)"
    ):
        _process(dtd_processor, frames, 2.0)
    # without DTD every token is in the prompt: vLLM's own admission bounds it, the cap does not apply
    _process(dtd_processor, frames, 2.0, dtd_enabled=False)
    monkeypatch.setenv(MAX_VIDEO_TOKENS_ENV, "256")
    _process(dtd_processor, frames, 2.0)
    monkeypatch.setenv(MAX_VIDEO_TOKENS_ENV, "many")
    with pytest.raises(ValueError, match=MAX_VIDEO_TOKENS_ENV):
        _process(dtd_processor, frames, 2.0)


def test_a_streams_backlog_is_cut_into_items_bounded_in_frames_and_bytes():
    from vllm_plugin.streams.session import Geometry, Limits, StreamManager, StreamSettings

    m = StreamManager(Limits(max_chunk_frames=64, max_chunk_bytes=40 * 224 * 224 * 3), Geometry(max_pixels=224 * 224))
    s = m.open(StreamSettings(fps=2.0, prefill="lazy"))
    s.add_frames([np.full((224, 224, 3), 60, np.uint8)] * 100)
    assert s.chunk_frames() == 40  # the byte limit is the tighter one here (whole temporal steps)
    assert s.backlog()
    cuts = []
    while (c := s.cut_chunk()) is not None:
        cuts.append(c)
    assert cuts == [(0, 40), (40, 80), (80, 100)] and not s.backlog()


def test_the_engine_gets_the_patches_of_the_steps_that_keep_a_token_only(dtd_processor):
    """A static video: only its first step keeps tokens, so only that step's patches go to the engine
    (before: every patch of the video, hundreds of MB for a long one)."""
    from vllm_plugin.models.base import MASK_KEY

    frames = np.full((16, 112, 112, 3), 100, np.uint8)
    frames[8:, :56] = 200  # a change at step 4
    item = _process(dtd_processor, frames, 2.0)["mm_kwargs"]["video"][0]
    t, h, w = (int(x) for x in item["video_grid_thw"].data.tolist())
    steps = item[MASK_KEY].data.view(t, -1).any(1)
    assert steps.tolist() == [True, False, False, False, True, False, False, False]
    assert item["pixel_values_videos"].data.shape[0] == 2 * h * w


def test_off_loop_waits_for_its_thread_however_often_it_is_cancelled():
    import asyncio
    import threading
    import time

    from vllm_plugin.streams.service import off_loop

    done = threading.Event()

    def work():
        time.sleep(0.3)
        done.set()
        return 1

    async def run():
        task = asyncio.ensure_future(off_loop(work))
        for _ in range(3):  # three cancellations while the thread runs
            await asyncio.sleep(0.05)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return done.is_set()  # the caller's cleanup runs only after the thread's work
        return None

    assert asyncio.run(run()) is True
    assert asyncio.run(off_loop(lambda: 7)) == 7


def test_an_item_without_data_is_checked_from_its_record_or_refused(dtd_processor, synthetic_clip):
    """vLLM's processor cache gives the API server no data for a cached item (LRU: None; shared memory:
    an address entry): the check reads the record made when it was processed; with none it refuses."""
    from vllm_plugin.models.base import ITEM_EXTRA_POSITIONS, PositionLimitError

    result = _process(dtd_processor, synthetic_clip.frames[:8], 2.0)
    mm_hash = result["mm_hashes"]["video"][0]
    extra = ITEM_EXTRA_POSITIONS.lookup(mm_hash)
    assert extra is not None
    for stand_in in (None, {"address": 0, "monotonic_id": 1, "signature": "x"}):
        cached = {**result, "mm_kwargs": {"video": [stand_in]}}
        dtd_processor._dtd_check_positions(cached)  # from the record: accepted
        unknown = {**cached, "mm_hashes": {"video": ["never-seen"]}}
        with pytest.raises(PositionLimitError, match="could not be checked"):
            dtd_processor._dtd_check_positions(unknown)
