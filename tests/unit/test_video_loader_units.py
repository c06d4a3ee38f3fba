"""The plugin's video loader against vLLM's own (fast tier: no server).

vLLM's ``qwen2_vl`` / ``opencv`` loaders on the OpenCV codec are the oracle: same sampled frame
indices and source metadata over a table of containers, the same pixels when nothing is scaled,
and the processor's grid when frames are scaled to its size."""

from __future__ import annotations

import threading
from fractions import Fraction

import av
import numpy as np
import pytest
from vllm.multimodal.video import Qwen2VLVideoBackend, VideoBackend

from vllm_plugin.entrypoints import video_loader as vl
from vllm_plugin.media import MediaTooLarge, VideoDecodeError

FAST = vl.loader_class(Qwen2VLVideoBackend)
FAST_GENERIC = vl.loader_class(VideoBackend)


def _frames(n: int, h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A moving gradient with noise: every frame differs (B-frames, motion vectors)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (x * 2 + i * 5) % 256
        out[i, ..., 1] = (y * 2 + i * 3) % 256
        out[i, ..., 2] = rng.integers(0, 40, (h, w)) + (i * 7) % 200
    return out


def encode(
    path, frames, fmt=None, codec="libx264", fps=25, gop=12, bframes=3, pts=None, time_base=None, options=None
) -> bytes:
    """Encode with PyAV; ``pts`` (in ``time_base``) gives a variable frame rate."""
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        if time_base is not None:
            s.time_base = s.codec_context.time_base = time_base
        opts = {"g": str(gop)}
        if codec == "libx264":
            opts.update({"bf": str(bframes), "preset": "veryfast"})
        s.options = {**opts, **(options or {})}
        for i, arr in enumerate(frames):
            f = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


CASES = {
    "mp4_bframes": dict(n=60, fmt="mp4"),
    "mp4_one_keyframe": dict(n=50, fmt="mp4", gop=1000),
    "mp4_no_bframes": dict(n=40, fmt="mp4", bframes=0),
    "mp4_vfr": dict(
        n=45,
        fmt="mp4",
        time_base=Fraction(1, 1000),
        bframes=0,
        pts=list(np.cumsum([0] + [33 if i % 3 else 90 for i in range(44)]).astype(int)),
    ),
    "mkv_no_frame_count": dict(n=40, fmt="matroska"),
    "mpegts_no_frame_count": dict(n=40, fmt="mpegts"),
    "avi_mpeg4": dict(n=30, fmt="avi", codec="mpeg4"),
    "avi_h264_bframes": dict(n=60, fmt="avi", gop=20),  # AVI stores no presentation times
    "webm_vp9": dict(n=30, fmt="webm", codec="libvpx-vp9"),
    "mp4_very_short": dict(n=4, fmt="mp4"),
    "mp4_30fps_long_gop": dict(n=120, fmt="mp4", fps=30, gop=250),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader_clips")
    out = {}
    for name, spec in CASES.items():
        spec = dict(spec)
        n = spec.pop("n")
        out[name] = encode(
            d / f"{name}.{spec['fmt'] if spec['fmt'] != 'matroska' else 'mkv'}", _frames(n, seed=n), **spec
        )
    return out


def _meta(md):
    return {k: md[k] for k in ("total_num_frames", "fps", "duration", "frames_indices")}


@pytest.fixture(autouse=True)
def _no_scaling(monkeypatch):
    monkeypatch.setattr(vl, "_SIZING", None)


def _every_frame(data: bytes) -> list[np.ndarray]:
    """Ground truth: every frame in presentation order (FFmpeg, from the start)."""
    import io

    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def _check(name, data, ref, ref_md, got, md):
    assert md["frames_indices"] == ref_md["frames_indices"]
    assert {k: md[k] for k in ("total_num_frames", "fps", "duration")} == {
        k: ref_md[k] for k in ("total_num_frames", "fps", "duration")
    }
    assert np.array_equal(got, ref)  # nothing scaled: vLLM's pixels, bit for bit
    if name not in VLLMS_LOADER:  # decoded by the plan: the frames FFmpeg gives at those indices
        truth = _every_frame(data)
        assert np.array_equal(got, np.stack([truth[i] for i in md["frames_indices"]]))
        assert md["video_backend"] == vl.NATIVE_TAG


# containers the plan does not take (timestamps that cannot place frames): vLLM's loader decodes them
# (4 frames of I/P with a B-frame capable stream: timestamps in decode order, which the plan cannot
# tell from a muxer that wrote decode times as presentation times)
VLLMS_LOADER = {"mpegts_no_frame_count", "avi_mpeg4", "avi_h264_bframes", "mp4_very_short"}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 4.0])
def test_same_frames_and_metadata_as_vllms_loader(clips, name, fps):
    data = clips[name]
    ref, ref_md = Qwen2VLVideoBackend.load_bytes(data, fps=fps)
    got, md = FAST.load_bytes(data, fps=fps)
    _check(name, data, ref, ref_md, got, md)
    # the plan is vLLM's own sampling rule on the same source metadata
    from vllm.multimodal.video_decoders import VideoSourceMetadata, VideoTargetMetadata

    src = VideoSourceMetadata(md["total_num_frames"], md["fps"], md["duration"])
    assert name in VLLMS_LOADER or md["frames_indices"] == [
        i
        for i in Qwen2VLVideoBackend.compute_frames_index_to_sample(src, VideoTargetMetadata(-1, fps, 300))
        if i < len(_every_frame(data))
    ]


@pytest.mark.parametrize("name", ["mp4_bframes", "mpegts_no_frame_count", "mp4_vfr", "mp4_very_short"])
@pytest.mark.parametrize("num_frames", [2, 8, 32, -1])
def test_generic_loader_by_frame_count(clips, name, num_frames):
    data = clips[name]
    ref, ref_md = VideoBackend.load_bytes(data, num_frames=num_frames)
    got, md = FAST_GENERIC.load_bytes(data, num_frames=num_frames)
    _check(name, data, ref, ref_md, got, md)


def test_exact_mode_is_vllms_loader_bit_for_bit(clips):
    data = clips["mp4_bframes"]
    ref, ref_md = Qwen2VLVideoBackend.load_bytes(data, fps=2)
    got, md = FAST.load_bytes(data, fps=2, fast_decode=False)
    assert md == ref_md and np.array_equal(got, ref)


def test_scaled_frames_have_the_processors_size_and_grid(clips, monkeypatch):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vp = Qwen2VLVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56 * 2})
    sizing = vl.FrameSizing.of(vp, {})
    assert sizing == vl.FrameSizing(28, 28 * 28, 56 * 56 * 2)
    assert vl.FrameSizing.of(vp, {"max_pixels": 1}) is None  # the server's own size: not scaled
    assert vl.FrameSizing.of(Qwen2VLVideoProcessor(do_resize=False), {}) is None
    monkeypatch.setattr(vl, "_SIZING", sizing)
    data = clips["mp4_bframes"]
    ref, ref_md = Qwen2VLVideoBackend.load_bytes(data, fps=2)
    got, md = FAST.load_bytes(data, fps=2)
    assert got.shape[1:3] == sizing.size(96, 128) != ref.shape[1:3] and md["video_backend"] == vl.SCALED_TAG
    grid = lambda frames: vp(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)[
        "video_grid_thw"
    ].tolist()
    assert grid(got) == grid(ref)
    assert sizing.size(*got.shape[1:3]) == got.shape[1:3]  # the processor's resize is a no-op


def test_bad_bytes_are_errors_before_decoding(tmp_path):
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    concat = b"ffconcat version 1.0\nfile '/etc/passwd'\n"
    for data in (playlist, concat, b"", b"\x89PNG\r\n\x1a\n" + b"0" * 64, b"not a video at all"):
        for fast in (True, False):
            with pytest.raises(VideoDecodeError):
                FAST.load_bytes(data, fps=2, fast_decode=fast)
    clip = encode(tmp_path / "c.mp4", _frames(20), fmt="mp4")
    with pytest.raises(ValueError):  # truncated: FFmpeg cannot read it (a ValueError: the server answers 400)
        FAST.load_bytes(clip[: len(clip) // 3], fps=2)
    with pytest.raises(ValueError, match="fast_decode"):
        FAST.load_bytes(clip, fps=2, fast_decode="yes")


def test_frame_size_limit_before_decoding(tmp_path, monkeypatch):
    import vllm.envs as envs

    clip = encode(tmp_path / "c.mp4", _frames(10), fmt="mp4")
    monkeypatch.setattr(envs, "VLLM_MAX_IMAGE_PIXELS", 96 * 128 - 1, raising=False)
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", str(96 * 128 - 1))
    with pytest.raises((ValueError, MediaTooLarge), match="pixels"):
        FAST.load_bytes(clip, fps=2)


def test_concurrent_decodes_are_all_correct(clips):
    names = ["mp4_bframes", "mkv_no_frame_count", "mp4_vfr", "webm_vp9"] * 2
    want = {n: Qwen2VLVideoBackend.load_bytes(clips[n], fps=2)[0] for n in set(names)}
    got: dict[int, np.ndarray] = {}

    def run(i, n):
        got[i] = FAST.load_bytes(clips[n], fps=2)[0]

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[i], want[n]) for i, n in enumerate(names))


def test_request_options():
    assert vl.split_request_options(None) == (None, None)
    assert vl.split_request_options({"video": {"fast_decode": False}}) == (False, None)
    assert vl.split_request_options({"video": {"fast_decode": True, "fps": 1}}) == (True, {"video": {"fps": 1}})
    with pytest.raises(ValueError, match="video.fast_decode"):
        vl.split_request_options({"video": {"fast_decode": 1}})
    scaled = (np.zeros((2, 28, 28, 3), np.uint8), {"video_backend": vl.SCALED_TAG})
    vl.check_request(scaled, {"dtd_threshold": 0.1})
    with pytest.raises(ValueError, match="fast_decode"):
        vl.check_request(scaled, {"max_pixels": 100000})
    vl.check_request((scaled[0], {"video_backend": "opencv"}), {"max_pixels": 100000})  # vLLM's frames: fine


def test_other_codecs_and_frame_recovery_stay_vllms(clips, monkeypatch):
    """GPU codecs (torchcodec on CUDA, PyNvVideoCodec, DeepStream) and OpenCV's frame recovery are
    vLLM's own paths: the loader hands them over untouched."""
    import vllm.multimodal.video as vmv

    calls = []

    class Handed(Exception):
        pass

    def decode_video(backend, loader_cls, data, target, sampling_kwargs, backend_kwargs, *, frame_recovery):
        calls.append((backend, frame_recovery, backend_kwargs.get("device")))
        raise Handed

    monkeypatch.setattr(vmv, "decode_video", decode_video)  # what vLLM's VideoBackend.load_bytes calls
    with pytest.raises(Handed):
        FAST.load_bytes(clips["mp4_bframes"], fps=2, backend="torchcodec", device="cuda")
    with pytest.raises(Handed):
        FAST.load_bytes(clips["mp4_bframes"], fps=2, frame_recovery=True)
    assert calls == [("torchcodec", False, "cuda"), ("opencv", True, None)]


def test_the_vllm_hooks_it_relies_on_are_checked():
    vl.check_vllm(Qwen2VLVideoBackend)
    vl.check_vllm(VideoBackend)
    assert vl.loader_class(type("Other", (VideoBackend,), {})) is None  # a loader with its own decoding: vLLM's


def test_files_the_plan_cannot_place_go_to_vllms_loader(clips, tmp_path):
    """Truncated (index at the front, data cut), corrupt in the middle: vLLM's frames, bit for bit."""
    data = encode(tmp_path / "fs.mp4", _frames(100, seed=3), fmt="mp4", options={"movflags": "+faststart"})
    rng = np.random.default_rng(0)
    corrupt = bytearray(data)
    for i in rng.integers(len(data) // 3, len(data) - 100, 20):
        corrupt[i] ^= 0xFF
    for variant in (data[: len(data) * 4 // 5], bytes(corrupt)):
        try:
            ref, ref_md = Qwen2VLVideoBackend.load_bytes(variant, fps=4)
        except Exception as e:  # vLLM cannot either: the same kind of failure
            with pytest.raises(type(e)):
                FAST.load_bytes(variant, fps=4)
            continue
        got, md = FAST.load_bytes(variant, fps=4)
        assert md == ref_md and np.array_equal(got, ref)


def test_the_hash_of_its_frames_differs_from_vllms():
    from vllm.multimodal.media import MediaWithBytes

    ours = MediaWithBytes((np.zeros((2, 4, 4, 3), np.uint8), {"video_backend": vl.NATIVE_TAG}), b"abc")
    theirs = MediaWithBytes((np.zeros((2, 4, 4, 3), np.uint8), {"video_backend": "opencv"}), b"abc")
    assert vl.tag_for_hash(vl.tag_for_hash(ours)).original_bytes == vl.HASH_TAG + b"abc"
    assert vl.tag_for_hash(theirs).original_bytes == b"abc"
    assert vl.size_keys({"videos_kwargs": {"max_pixels": 1}, "dtd_threshold": 0.1}) == ["videos_kwargs.max_pixels"]
