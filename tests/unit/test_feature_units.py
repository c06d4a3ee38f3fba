"""Feature-level DTD without a server: the API server's vision tower, the processor that decides on its
outputs and hands the engine the kept rows, the model side that takes them, and streams that encode
each temporal step once, on arrival (batched, bounded)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import DTD_ARCH, mm_processor
from vllm_plugin.core import DTDConfig, mask_digest

SPEC = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel"


@pytest.fixture(scope="module")
def processor32(tiny_model_path):
    """The DTD processor as a float32 server builds it (the tiny checkpoint is float32)."""
    return mm_processor(tiny_model_path, DTD_ARCH, dtype="float32")


@pytest.fixture(scope="module")
def tower(tiny_model_path, reference):
    from vllm_plugin.models.vision import VisionTower, VisionTowerSpec

    return VisionTower.load(VisionTowerSpec(SPEC), str(tiny_model_path), reference.config.vision_config, torch.float32)


def _request(processor, frames, **mm):
    from test_gpu_paths import _video_request

    return _video_request(processor, frames, **mm)


def _reference_feature(reference, frames, cfg):
    video = reference.process_video(frames, 2.0)
    prepared = reference.prepare("q", video=video, dtd=cfg)
    return prepared.mask, reference.video_embeddings(video)


def test_the_api_server_tower_is_the_reference_encoder(tower, reference, synthetic_clip):
    video = reference.process_video(synthetic_clip.frames, 2.0)
    whole = tower.encode(video.pixel_values, video.grid_thw)
    assert torch.equal(whole, reference.video_embeddings(video))
    # attention never crosses temporal steps: two steps at a time, in one batched call, give the same rows
    t, h, w = video.grid_thw
    per = h * w * 2
    parts = tower.encode_many([(video.pixel_values[i * per : (i + 1) * per], (2, h, w)) for i in range(t // 2)])
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


@pytest.mark.parametrize(
    "mm",
    [{"dtd_criterion": "feature"}, {"dtd_criterion": "feature", "dtd_threshold": 0.9, "dtd_reference": "last_kept"}],
)
def test_served_feature_mask_and_rows_are_the_reference(processor32, reference, synthetic_clip, mm):
    from vllm_plugin.models import vision
    from vllm_plugin.models.base import MASK_KEY

    cfg = DTDConfig(
        criterion="feature", threshold=mm.get("dtd_threshold"), reference=mm.get("dtd_reference", "previous")
    )
    mask, embeds = _reference_feature(reference, synthetic_clip.frames, cfg)
    assert 0 < int(mask.sum()) < mask.numel()
    before = sum(t.steps for t in vision.loaded_towers())
    out = _request(processor32, synthetic_clip.frames, **mm)
    item, (placeholder,) = out["mm_kwargs"]["video"][0], out["mm_placeholders"]["video"]
    assert "pixel_values_videos" not in item  # the engine gets rows, never encodes this video
    served = item[MASK_KEY].data.bool().reshape(mask.shape)
    assert mask_digest(served) == mask_digest(mask)
    assert item["video_embeds"].data.shape[0] == placeholder.length == int(mask.sum())
    assert torch.allclose(item["video_embeds"].data, embeds[mask.flatten()], atol=1e-5)
    assert sum(t.steps for t in vision.loaded_towers()) - before == mask.shape[0]  # each step encoded once


def test_feature_criterion_without_a_tower_is_a_400_naming_the_field(processor32, synthetic_clip, monkeypatch):
    monkeypatch.setenv("DTD_FEATURE_ENCODER", "off")
    with pytest.raises(ValueError, match="dtd_criterion"):
        _request(processor32, synthetic_clip.frames, dtd_criterion="feature")
    with pytest.raises(ValueError, match="dtd_criterion"):
        _request(processor32, synthetic_clip.frames, dtd_criterion="semantic")


def test_the_model_takes_the_kept_rows_as_they_are():
    from test_gpu_paths import _Input

    from vllm_plugin.models.base import MASK_KEY, DTDModelMixin

    class Base:
        visual = SimpleNamespace(dtype=torch.float32, spatial_merge_size=2)

        def _parse_and_validate_video_input(self, **kw):
            return _Input(type="video_embeds", video_embeds=kw["video_embeds"], video_grid_thw=kw["video_grid_thw"])

        def _process_video_input(self, video_input):
            raise AssertionError("the vision tower must not run for video_embeds")

    class Model(DTDModelMixin, Base):
        pass

    grid = torch.tensor([[2, 4, 4], [4, 2, 2]])  # 8 and 4 tokens
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)  # 3 and 2 kept
    rows = torch.arange(int(mask.sum()), dtype=torch.float32)[:, None].repeat(1, 3)
    model = object.__new__(Model)  # the engine-side mixin without a vLLM model under it (no rotary tables)
    video_input = model._parse_and_validate_video_input(video_embeds=rows, video_grid_thw=grid, **{MASK_KEY: mask})
    a, b = model._process_video_input(video_input)
    assert a.shape[0] == 3 and b.shape[0] == 2 and torch.equal(torch.cat([a, b]), rows)


# --- streams: encode on arrival ------------------------------------------------------------------


def _feature_stream(reference, tower, max_pending=64, **settings):
    from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
    from vllm_plugin.streams.session import StreamManager, StreamSettings

    queue = EncodeQueue(processor_patchify(reference.processor.video_processor), tower.encode_many, max_pending)
    dtd = DTDConfig(criterion="feature", **settings)
    return StreamManager().open(StreamSettings(fps=2.0, dtd=dtd), encoder=queue), queue


def test_feature_stream_encodes_each_step_once_and_chunked_equals_whole(reference, tower, synthetic_clip):
    from vllm_plugin.entrypoints.options import GIVEN_EMBEDS, GIVEN_MASK

    frames = synthetic_clip.frames
    whole_mask, embeds = _reference_feature(reference, frames, DTDConfig(criterion="feature"))
    stream, queue = _feature_stream(reference, tower)
    steps0 = tower.steps
    for a, b in ((0, 3), (3, 8), (8, 10), (10, 21), (21, 22), (22, len(frames))):  # ragged appends
        stream.add_frames(list(frames[a:b]))
        if a == 10:
            stream.cut_chunk()  # a question in the middle
    stream.cut_chunk()
    assert tower.steps - steps0 == whole_mask.shape[0] and queue.pending == 0
    assert torch.equal(torch.stack(stream.step_masks), whole_mask)
    items = stream.video_items()
    assert len(items) == 2
    served = torch.cat([torch.as_tensor(m[GIVEN_MASK]) for _, m in items])
    rows = torch.cat([m[GIVEN_EMBEDS] for _, m in items])
    assert torch.equal(served, whole_mask)
    assert torch.allclose(rows, embeds[whole_mask.flatten()], atol=1e-5)


def test_feature_stream_item_is_served_without_encoding_again(processor32, reference, tower, synthetic_clip):
    from vllm_plugin.models import vision
    from vllm_plugin.models.base import MASK_KEY

    stream, _ = _feature_stream(reference, tower)
    stream.add_frames(list(synthetic_clip.frames[:16]))
    stream.cut_chunk()
    (item,) = stream.video_items()
    before = sum(t.steps for t in vision.loaded_towers())
    items = processor32.info.parse_mm_data({"video": [item]})
    out = processor32(
        processor32.dummy_inputs.get_dummy_text({"video": 1}),
        items,
        hf_processor_mm_kwargs={"dtd_criterion": "feature"},
    )
    got = out["mm_kwargs"]["video"][0]
    assert sum(t.steps for t in vision.loaded_towers()) == before
    assert torch.equal(got[MASK_KEY].data.bool(), torch.stack(stream.step_masks).flatten())
    assert torch.equal(got["video_embeds"].data, torch.cat(stream.step_embeds))


def test_a_static_feature_chunk_serves_one_token_with_its_row(reference, tower):
    from vllm_plugin.entrypoints.options import GIVEN_EMBEDS, GIVEN_MASK

    frames = np.full((8, 56, 56, 3), 90, dtype=np.uint8)
    stream, _ = _feature_stream(reference, tower)
    stream.add_frames(list(frames[:2]))
    stream.cut_chunk()
    stream.add_frames(list(frames[2:]))  # identical to the step before: nothing kept
    stream.cut_chunk()
    _, (_, meta) = stream.video_items()
    mask, rows = torch.as_tensor(meta[GIVEN_MASK]), meta[GIVEN_EMBEDS]
    assert int(mask.sum()) == 1 and mask.view(-1)[0] and rows.shape[0] == 1


def test_an_encoder_that_falls_behind_refuses_appends_with_429_and_keeps_nothing(reference):
    from vllm_plugin.errors import RateLimited
    from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
    from vllm_plugin.streams.routes import http_status
    from vllm_plugin.streams.session import StreamManager, StreamSettings

    gate = threading.Event()

    def slow(videos):
        gate.wait(30)
        return [torch.zeros(int(torch.as_tensor(g).prod()) // 4, 8) for _, g in videos]

    queue = EncodeQueue(processor_patchify(reference.processor.video_processor), slow, max_pending_steps=3)
    manager = StreamManager()
    a = manager.open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature")), encoder=queue)
    b = manager.open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature")), encoder=queue)
    frames = list(np.zeros((6, 56, 56, 3), dtype=np.uint8))
    worker = threading.Thread(target=a.add_frames, args=(frames,))  # 3 steps: waits for the tower
    worker.start()
    deadline = time.monotonic() + 30
    while queue.pending < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RateLimited) as e:
        b.add_frames(frames[:2])
    assert http_status(e.value) == 429 and "retry" in str(e.value)
    assert (len(b.frames), b.nbytes, b.steps) == (0, 0, 0)
    gate.set()
    worker.join(30)
    assert a.steps == 3 and len(a.step_masks) == 3 and queue.pending == 0
    b.add_frames(frames[:2])  # room again
    assert b.steps == 1


def test_an_encoder_failure_leaves_the_stream_as_it_was(reference):
    from vllm_plugin.errors import Unavailable
    from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
    from vllm_plugin.streams.routes import http_status
    from vllm_plugin.streams.session import StreamManager, StreamSettings

    def broken(videos):
        raise RuntimeError("out of memory")

    queue = EncodeQueue(processor_patchify(reference.processor.video_processor), broken, max_pending_steps=8)
    s = StreamManager().open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature")), encoder=queue)
    with pytest.raises(Unavailable) as e:
        s.add_frames(list(np.zeros((4, 56, 56, 3), dtype=np.uint8)))
    assert http_status(e.value) == 503 and (len(s.frames), s.nbytes, queue.pending) == (0, 0, 0)


def test_an_append_that_can_never_fit_the_encoder_queue_is_413(reference):
    from vllm_plugin.errors import TooLarge
    from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
    from vllm_plugin.streams.routes import http_status
    from vllm_plugin.streams.session import StreamManager, StreamSettings

    queue = EncodeQueue(processor_patchify(reference.processor.video_processor), lambda v: [], max_pending_steps=2)
    s = StreamManager().open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature")), encoder=queue)
    with pytest.raises(TooLarge) as e:
        s.add_frames(list(np.zeros((6, 56, 56, 3), dtype=np.uint8)))  # 3 steps > 2: a retry would never help
    assert http_status(e.value) == 413 and (len(s.frames), queue.pending) == (0, 0)


def test_kept_encoder_outputs_count_against_the_byte_caps(reference, tower, synthetic_clip):
    from vllm_plugin.errors import RateLimited
    from vllm_plugin.streams.routes import http_status

    stream, queue = _feature_stream(reference, tower)
    stream.add_frames(list(synthetic_clip.frames[:8]))
    frame_bytes = sum(f.nbytes for f in stream.frames)
    held = sum(e.numel() * e.element_size() for e in stream.step_embeds + stream.step_first)
    assert held > 0 and stream.nbytes == frame_bytes + held
    # a server whose byte cap the outputs would pass: 429, nothing of the append kept, queue released
    stream.store.account.limit = stream.store.account.held + sum(f.nbytes for f in synthetic_clip.frames[8:12]) + 1
    before = (len(stream.frames), stream.nbytes, len(stream.step_masks))
    with pytest.raises(RateLimited) as e:
        stream.add_frames(list(synthetic_clip.frames[8:12]))
    assert http_status(e.value) == 429 and (len(stream.frames), stream.nbytes, len(stream.step_masks)) == before
    assert queue.pending == 0
    stream.release()
    assert stream.store.account is None


def test_a_tower_that_does_not_load_is_a_400_at_once_afterwards(monkeypatch):
    from vllm_plugin.models import vision

    model_config = SimpleNamespace(
        model="/nonexistent/model",
        revision=None,
        dtype=torch.float32,
        hf_config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)),
    )
    spec = vision.VisionTowerSpec(SPEC)
    for _ in range(2):
        with pytest.raises(vision.EncoderUnavailable, match="dtd_criterion.*did not load"):
            vision.tower_for(spec, model_config)
    assert any(k[1] == "/nonexistent/model" for k in vision._FAILED)


def test_a_question_does_not_wait_for_an_append_being_encoded(reference):
    """Cutting a chunk (a question, an eager prefill: on the event loop) takes the analysed steps at
    once; it never waits for the tower working on another append of the stream."""
    from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
    from vllm_plugin.streams.session import StreamManager, StreamSettings

    gate = threading.Event()
    gate.set()

    def gated(videos):
        gate.wait(30)
        return [torch.ones(int(torch.as_tensor(g).prod()) // 4, 8) for _, g in videos]

    queue = EncodeQueue(processor_patchify(reference.processor.video_processor), gated, max_pending_steps=8)
    s = StreamManager().open(StreamSettings(fps=2.0, dtd=DTDConfig(criterion="feature")), encoder=queue)
    frames = list(np.zeros((4, 56, 56, 3), dtype=np.uint8))
    s.add_frames(frames)  # 2 steps, analysed
    gate.clear()
    worker = threading.Thread(target=s.add_frames, args=(frames,))  # 2 more, held in the tower
    worker.start()
    deadline = time.monotonic() + 30
    while queue.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert s.cut_chunk() == (0, 4) and len(s.video_items()) == 1
    assert time.monotonic() - t0 < 5 and worker.is_alive()
    gate.set()
    worker.join(30)
    assert s.cut_chunk() == (4, 8) and len(s.video_items()) == 2
