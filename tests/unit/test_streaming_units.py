"""Stream bookkeeping without a server: causal chunked DTD, events, items, limits, ids."""

import numpy as np
import pytest
import torch

from vllm_plugin.core import DTDConfig, dtd_keep_mask, frame_tokens, mask_stats
from vllm_plugin.errors import InvalidOption, InvalidRequest
from vllm_plugin.streams.session import Geometry, Limits, StreamManager, StreamSettings


def _settings(**kw):
    return StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), **kw)


def test_geometry_sizes_are_token_aligned_and_bounded():
    g = Geometry()
    for hw in [(360, 640), (224, 224), (1810, 2048), (30, 40), (1080, 1920)]:
        h, w = g.target_size(*hw)
        assert h % 28 == 0 and w % 28 == 0 and g.min_pixels <= h * w <= g.max_pixels
    assert g.target_size(224, 224) == (224, 224)
    with pytest.raises(InvalidRequest, match="frame size 1000x1 is not usable"):
        g.target_size(1, 1000)


def test_appends_of_any_size_give_whole_video_dtd_and_events(synthetic_clip):
    c = synthetic_clip
    s = StreamManager().open(_settings(event_level=0.5))
    i, sizes = 0, [1, 3, 5, 2, 7, 11, 19]
    while i < len(c.frames):
        n = sizes[i % len(sizes)]
        s.add_frames(list(c.frames[i : i + n]))
        i += n
    whole = dtd_keep_mask(frame_tokens(torch.from_numpy(c.frames)), 0.05, "l1")
    assert s.kept_per_step == list(mask_stats(whole).kept_per_step) == c.expected_kept_per_step()
    steps = [e["step"] for e in s.events if e["type"] == "scene_change"]
    assert steps == [12, 16, 20]  # both cuts and the start of the fade; nothing in static stretches
    assert not set(steps) & set(c.static_steps)
    assert s.events[0]["time"] == pytest.approx(12.0) and s.events[0]["kept_fraction"] == 1.0


def test_chunks_carry_the_masks_decided_on_arrival_and_are_stable(synthetic_clip):
    from vllm_plugin.entrypoints.options import GIVEN_MASK

    c = synthetic_clip
    s = StreamManager().open(_settings())
    s.add_frames(list(c.frames[:9]))  # 4 complete steps + 1 pending frame
    assert s.cut_chunk() == (0, 8)
    assert s.cut_chunk() is None
    s.add_frames(list(c.frames[9:20]))
    assert s.cut_chunk() == (8, 20)
    items = s.video_items()
    assert len(items) == 2 and len(items[1][0]) == 12
    # the prompt's masks ARE the masks the events came from: DTD on the whole stream, cut at the chunk border
    whole = dtd_keep_mask(frame_tokens(torch.from_numpy(c.frames[:20])), 0.05, "l1").numpy()
    assert items[0][1][GIVEN_MASK].dtype == bool and items[0][1][GIVEN_MASK].shape == (4, 8, 8)
    assert np.array_equal(np.concatenate([items[0][1][GIVEN_MASK], items[1][1][GIVEN_MASK]]), whole)
    assert [int(m.sum()) for m in np.concatenate([i[1][GIVEN_MASK] for i in items])] == s.kept_per_step
    again = s.video_items()
    assert all(np.array_equal(a[0], b[0]) and a[1] is b[1] for a, b in zip(items, again))
    # one copy of the pixels: the stream's frames are views of the chunks
    assert all(np.shares_memory(s.frames[i], items[i >= 8][0]) for i in range(20))
    assert np.array_equal(s.frames[19], c.frames[19])


def test_limits_from_the_environment():
    assert Limits.from_env({"DTD_STREAM_MAX_STREAMS": "3"}).max_streams == 3
    assert Limits.from_env({"DTD_STREAM_IDLE_SECONDS": "2.5"}).idle_seconds == 2.5
    assert Limits.from_env({}) == Limits()
    # release 0.1's VLLM_DTD_STREAM_* names are not read (never released; vLLM warns about unknown VLLM_*)
    assert Limits.from_env({"VLLM_DTD_STREAM_MAX_FRAMES": "64"}).max_frames == Limits().max_frames
    with pytest.raises(ValueError, match="DTD_STREAM_MAX_FRAMES must be an integer >= 1, got 'many'"):
        Limits.from_env({"DTD_STREAM_MAX_FRAMES": "many"})


def test_limits_are_shared_between_api_server_processes():
    lim = Limits(max_streams=16, max_total_bytes=8 * 2**30)
    assert lim.per_process(1) == lim
    two = lim.per_process(2)
    assert (two.max_streams, two.max_total_bytes) == (8, 4 * 2**30) and two.max_frames == lim.max_frames


def test_stream_ids_name_the_process_that_holds_them():
    from vllm_plugin.streams.session import stream_owner

    s = StreamManager(owner=3).open(_settings())
    assert s.id.startswith("strm-3-") and stream_owner(s.id) == 3
    for bad in (
        "strm-nope",
        "strm--x",
        "strm-99999-x",
        "x-1-y",
        "strm-1",
        "strm-\u00b2-x",
        "strm-0001-x",
        "strm-1-a/b",
    ):
        assert stream_owner(bad) is None


def test_append_reports_the_steps_it_completed(synthetic_clip):
    s = StreamManager().open(_settings())
    first = s.add_frames(list(synthetic_clip.frames[:3]))  # one step + one pending frame
    assert len(first["kept_per_step"]) == 1
    second = s.add_frames(list(synthetic_clip.frames[3:4]))  # completes step 1 with ONE frame
    assert second["kept_per_step"] == s.kept_per_step[1:2]
    assert s.add_frames(list(synthetic_clip.frames[4:5]))["kept_per_step"] == []


def test_dtd_disabled_streams_count_every_token(synthetic_clip):
    s = StreamManager().open(StreamSettings(fps=2.0, dtd=DTDConfig(enabled=False), event_level=0.5))
    out = s.add_frames(list(synthetic_clip.frames[:8]))
    assert s.kept_per_step == [s.store.tokens_per_step] * 4
    assert out["events"] == []  # nothing is dropped, so the kept fraction signals nothing


def _engine(**facts):
    """The facts of a served model a StreamService reads to open streams (no engine behind it)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        **{
            "server_dtd": {},
            "max_model_len": 4096,
            "position_room": 12288,
            "step_positions": lambda fps: 4 / fps,
            **facts,
        }
    )


def test_every_reference_serves_streams_and_the_server_default_applies():
    from vllm_plugin.core import reference_names
    from vllm_plugin.streams.routes import OpenStreamRequest, http_status
    from vllm_plugin.streams.service import StreamService

    svc = StreamService(_engine(server_dtd={"dtd_reference": "last_kept", "dtd_threshold": 0.1}), StreamManager())
    settings = svc.settings(OpenStreamRequest())
    assert settings.dtd.reference == "last_kept" and settings.dtd.threshold == 0.1
    for name in reference_names():
        assert svc.settings(OpenStreamRequest(dtd_reference=name)).dtd.reference == name
    assert svc.settings(OpenStreamRequest(dtd_drop_ratio=0.5)).dtd.drop_ratio == 0.5
    with pytest.raises(InvalidOption, match="dtd_reference") as e:
        svc.settings(OpenStreamRequest(dtd_reference="nearest"))
    assert e.value.field == "dtd_reference" and http_status(e.value) == 400
    assert svc.settings(OpenStreamRequest(dtd_threshold="0.2")).dtd.threshold == 0.2  # coerced, as always
    with pytest.raises(InvalidOption) as e:
        svc.settings(OpenStreamRequest(dtd_threshold=2.0))
    assert e.value.field == "dtd_threshold" and http_status(e.value) == 400


def test_idle_streams_are_reaped_on_a_timer():
    import asyncio

    from vllm_plugin.streams.service import StreamService

    m = StreamManager(Limits(idle_seconds=0.1))
    s = m.open(_settings())

    async def run():
        task = asyncio.create_task(StreamService(_engine(), m).reap(0.05))
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(run())
    assert len(m) == 0 and s.id  # no other stream request was needed


@pytest.mark.parametrize(
    "server_kwargs",
    [{}, {"max_pixels": 128 * 28 * 28}, {"size": {"shortest_edge": 3136, "longest_edge": 96 * 28 * 28}}],
)
def test_stream_frames_are_not_resized_again_by_the_served_processor(tiny_model_path, server_kwargs):
    from transformers import AutoProcessor

    vp = AutoProcessor.from_pretrained(tiny_model_path).video_processor
    g = Geometry.from_video_processor(vp, server_kwargs)
    h, w = g.target_size(720, 1280)
    video = np.zeros((2, h, w, 3), np.uint8)
    out = vp(videos=[video], return_tensors="pt", **server_kwargs)  # as vLLM calls it with --mm-processor-kwargs
    assert out["video_grid_thw"][0].tolist() == [1, h // 14, w // 14]


def test_the_socket_directory_variable_passes_vllms_environment_validation(monkeypatch):
    """vLLM 0.32 warns about unknown VLLM_* variables and refuses them under
    --fail-on-environ-validation: what the plugin sets in the environment must not be one."""
    import os

    from vllm.platforms import current_platform

    from vllm_plugin.streams.forward import SOCKET_DIR_ENV, prepare_socket_dir

    for name in [n for n in os.environ if n.startswith("VLLM_") or n == SOCKET_DIR_ENV]:
        monkeypatch.delenv(name)
    prepare_socket_dir()
    try:
        assert os.path.isdir(os.environ[SOCKET_DIR_ENV])
        current_platform.validate_environ(hard_fail=True)
    finally:
        os.rmdir(os.environ[SOCKET_DIR_ENV])


def test_chunks_carry_their_steps_times_as_the_client_stamped_them(synthetic_clip):
    """Frame times given by the client (a pause after 4 frames) become each step's time in the chunk
    (the mean of its frames): what Qwen3-VL's prompt writes; nominal times without client stamps."""
    from vllm_plugin.entrypoints.options import GIVEN_TIMES

    c = synthetic_clip
    s = StreamManager().open(_settings())
    s.add_frames(list(c.frames[:4]))  # nominal: 0, 0.5, 1.0, 1.5 s
    s.add_frames(list(c.frames[4:8]), timestamps=[60.0, 60.5, 61.0, 61.5])
    s.cut_chunk()
    ((frames, meta),) = s.video_items()
    assert meta[GIVEN_TIMES] == [0.25, 1.25, 60.25, 61.25]
    assert meta["frames_indices"] == list(range(8))
    # a later chunk is a video of its own at the stream's rate: the processor's sampled fps is the
    # stream's (Qwen2.5-VL's second_per_grid_ts = 2 / fps), not shrinking with the chunk's start
    from transformers.video_utils import VideoMetadata

    s.add_frames(list(c.frames[8:40]))
    s.cut_chunk()
    for _, m in s.video_items():
        vm = VideoMetadata(**{k: m[k] for k in ("fps", "total_num_frames", "frames_indices", "duration")})
        assert vm.sampled_fps == pytest.approx(2.0)
