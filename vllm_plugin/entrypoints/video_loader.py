"""A vLLM video loader that decodes only the frames the sampler keeps, scaled in FFmpeg (PyAV).

vLLM 0.32 loads a Qwen2.5-VL ``video_url`` with its ``qwen2_vl`` loader on the ``opencv`` codec: it
decodes EVERY frame up to the last sampled one, converts the sampled ones to full-size RGB, and the
HF video processor then resizes them (``vllm/multimodal/video.py``,
``video_decoders/opencv.py``). This loader, registered in vLLM's own ``VIDEO_LOADER_REGISTRY`` and
made the default of the served model's video processor when the plugin serves a DTD architecture
(:func:`install`), keeps vLLM's sampling and changes only how the sampled frames are obtained:

1. **Which frames**: the SAME loader class vLLM would use computes the indices
   (``compute_frames_index_to_sample``; this class subclasses it), from source metadata read by
   demuxing the packets, without decoding (OpenCV's rules: frame count from the header, else
   duration x fps; fps from ``avg_frame_rate``, else ``r_frame_rate``; vLLM's edit-list correction).
2. **Decode only what they need**: frame ``i`` is the ``i``-th frame in presentation order (what
   OpenCV counts); the decoder seeks to the keyframe at or before each run of needed frames, stops
   after the last one, and skips non-reference frames nothing needs (FFmpeg ``skip_frame=nonref``,
   set per packet: a needed frame is always decoded, and a reference frame is never skipped).
   Only for files whose packet timestamps place frames (:func:`_packets`, :data:`_PLANNED_FORMATS`);
   any other file, an FFmpeg error or a frame that does not come out as planned: vLLM's own loader
   decodes it (behind the same guards).
3. **Scale in the decoder's library**: each kept frame is converted to RGB and resized by swscale
   straight to the size the model's processor resizes to (its ``smart_resize`` of the processor
   config, :class:`FrameSizing`); the processor's own resize is then a no-op (same size in, same
   size out). Pixel values differ from vLLM's path only by the resampling filter.
4. **In parallel, bounded**: vLLM runs loaders in its media thread pool
   (``VLLM_MEDIA_LOADING_THREAD_COUNT``); FFmpeg decodes with frame threads and without the GIL;
   at most ``DTD_VIDEO_DECODE_CONCURRENCY`` (default: the CPU count) decodes run at once, the rest
   wait in vLLM's bounded pool.

Guards: the container allow-list, nested-open refusal, track and codec limits and FFmpeg's own
``max_pixels`` cap of :func:`vllm_plugin.media.open_untrusted` (the stream uploads' rules), and
vLLM's ``VLLM_MAX_IMAGE_PIXELS`` check, before any frame is decoded; only kept frames, at the
processor's size, are held. The codecs are the server's ``DTD_VIDEO_CODECS`` (comma-separated FFmpeg
decoder names; default :data:`vllm_plugin.media.DEFAULT_VIDEO_CODECS`, what vLLM's own loaders
commonly meet, MS-MPEG4 AVI included), one list for ``video_url`` requests and stream uploads,
checked when the server starts (:func:`install`); a video of another codec is refused with
:class:`vllm_plugin.media.CodecNotAccepted` (HTTP 400) whichever loader would decode it.

``fast_decode: false`` (``--media-io-kwargs '{"video": {"fast_decode": false}}'`` for the server, or a
request's ``media_io_kwargs``) runs vLLM's own loader unchanged (bit-identical frames) behind the
same guards. ``--media-io-kwargs '{"video": {"video_backend": "qwen2_vl"}}'`` selects vLLM's loader
with no plugin code at all.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_plugin import settings

if TYPE_CHECKING:  # FastDecodeMixin is put in front of these (loader_class, _FAST_BASES)
    from vllm.multimodal.video import VideoBackend as _LoaderBase
else:
    _LoaderBase = object

logger = logging.getLogger("vllm.dtd_plugin")

LOADER_NAME = "dtd_fast"
NATIVE_TAG, SCALED_TAG = f"pyav_{LOADER_NAME}", f"pyav_{LOADER_NAME}_scaled"  # the metadata's video_backend
FAST_DECODE_KEY = "fast_decode"
# processor kwargs that change the frame size: the loader cannot see a request's processor kwargs
SIZE_KWARGS = (
    "size",
    "min_pixels",
    "max_pixels",
    "shortest_edge",
    "longest_edge",
    "resized_height",
    "resized_width",
    "cap_pixels_per_frame",
    "max_video_tokens",
)
# the Qwen processors resize with bicubic (antialiased) too; scaling the YUV planes before the RGB
# conversion: 3.0 ms per 2048x1810 -> 476x420 frame, converting first then scaling: 15.4 ms
_SWS_INTERPOLATION = "BICUBIC"


def size_keys(kwargs) -> list[str]:
    """The frame-size keys among processor kwargs, top level or nested (``videos_kwargs``…)."""
    found: list[str] = []
    for k, v in (kwargs or {}).items() if isinstance(kwargs, dict) else ():
        if k in SIZE_KWARGS:
            found.append(k)
        elif isinstance(v, dict):
            found += [f"{k}.{n}" for n in size_keys(v)]
    return sorted(found)


# Prefixed to the bytes vLLM hashes a video by, for frames this loader made: its items never share
# a multimodal hash (processor cache, prefix cache, a KV store shared with other servers) with the
# frames vLLM's loader makes from the same file.
HASH_TAG = f"vllm_dtd:{LOADER_NAME}:v1\0".encode()


def tag_for_hash(result):
    """``result`` of ``VideoMediaIO.load_*`` (``MediaWithBytes((frames, metadata), bytes)``), its
    bytes tagged when this loader decoded it (idempotent)."""
    media = getattr(result, "media", None)
    meta = media[1] if isinstance(media, tuple) and len(media) == 2 else None
    if (
        isinstance(meta, Mapping)
        and meta.get("video_backend") in (NATIVE_TAG, SCALED_TAG)
        and not result.original_bytes.startswith(HASH_TAG)
    ):
        result.original_bytes = HASH_TAG + result.original_bytes
    return result


class FastDecodeUnavailable(Exception):
    """The decode plan does not fit this file: vLLM's own loader decodes it."""


@dataclass(frozen=True)
class FrameSizing:
    """The frame size a Qwen-VL video processor resizes to: transformers' ``smart_resize`` with the
    processor's ``patch_size * merge_size`` factor and ``size`` (``shortest_edge`` = min pixels,
    ``longest_edge`` = max pixels). Idempotent: a frame already at :meth:`size` keeps it."""

    factor: int
    min_pixels: int
    max_pixels: int

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes a ``height x width`` frame to."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    @classmethod
    def of(cls, video_processor, server_kwargs: dict) -> FrameSizing | None:
        """The sizing of ``video_processor``; None when the server's processor kwargs change it (then
        frames are decoded at their own size and the processor resizes them, as in vLLM)."""
        if size_keys(server_kwargs):
            return None
        # a processor that does not resize, or caps pixels per frame by the frame count (transformers'
        # cap_pixels_per_frame, off by default in 5.19, announced as the default for 5.22): not scaled
        if not getattr(video_processor, "do_resize", True) or getattr(video_processor, "cap_pixels_per_frame", None):
            return None
        size = getattr(video_processor, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        patch, merge = getattr(video_processor, "patch_size", None), getattr(video_processor, "merge_size", None)
        lo, hi = get("shortest_edge"), get("longest_edge")
        if not (patch and merge and lo and hi):
            return None
        return cls(factor=int(patch) * int(merge), min_pixels=int(lo), max_pixels=int(hi))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _concurrency() -> int:
    return settings.get("DTD_VIDEO_DECODE_CONCURRENCY") or _cpus()


_SIZING: FrameSizing | None = None
_LOGGED_CODECS: list = [None]  # the codec list install() last logged
_THREADS = min(16, _cpus())  # FFmpeg frame threads per decode (FFmpeg's own automatic choice caps at 16 too)
_SLOTS: list[threading.BoundedSemaphore] = []  # made at the first decode (a bad setting fails there, not at import)
_SLOTS_LOCK = threading.Lock()


def _slots() -> threading.BoundedSemaphore:
    """The process's decode slots (``DTD_VIDEO_DECODE_CONCURRENCY``, read once)."""
    with _SLOTS_LOCK:
        if not _SLOTS:
            _SLOTS.append(threading.BoundedSemaphore(_concurrency()))
        return _SLOTS[0]


def _cv2_fps(stream) -> float:
    """OpenCV's ``CAP_PROP_FPS`` for an FFmpeg stream: ``avg_frame_rate``, else ``r_frame_rate``,
    else 1 / the codec time base."""
    for rate in (stream.average_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    tb = stream.codec_context.time_base
    return 1.0 / float(tb) if tb else 0.0


def source_metadata(container, stream, visible_frames: int):
    """``VideoSourceMetadata`` as vLLM's OpenCV path reports it, from the container's parameters
    and the number of presentable packets (``visible_frames``, read by demuxing, no decoding)."""
    from vllm.multimodal.video_decoders import VideoSourceMetadata

    fps = _cv2_fps(stream)
    total = int(stream.frames or 0)
    if total == 0:
        seconds = container.duration / 1_000_000 if container.duration else 0.0
        if seconds <= 1e-6 and stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        total = int(math.floor(seconds * fps + 0.5))
    # vLLM's correction (video_decoders/opencv.py): an edit list hides a decode lead-in
    if total > 0 and 0 < visible_frames < total - 1:
        total = visible_frames
    return VideoSourceMetadata(total_frames_num=total, original_fps=fps, duration=total / fps if fps > 0 else 0)


def _scaler(sizing: FrameSizing | None, width: int, height: int):
    out_h, out_w = sizing.size(height, width) if sizing is not None else (height, width)

    def scale(frame) -> np.ndarray:
        if (out_h, out_w) != (height, width):  # scale the YUV planes, then convert the small frame
            frame = frame.reformat(width=out_w, height=out_h, interpolation=_SWS_INTERPOLATION)
        return frame.to_ndarray(format="rgb24")

    return scale, (out_h, out_w)


def _decode_planned(
    container, stream, frame_pts: list[int], keys: list[int], indices: list[int], scale
) -> dict[int, np.ndarray]:
    """Decode the frames at ``indices`` (presentation order), seeking to the keyframe before each
    run and skipping non-reference frames nothing needs. Raises :class:`FastDecodeUnavailable`
    when a needed frame does not come out as planned."""
    want = {frame_pts[i]: i for i in indices}
    pending = sorted(want)
    got: dict[int, np.ndarray] = {}
    cc = stream.codec_context
    j = 0

    def key_before(pts: int) -> int | None:
        k = bisect.bisect_right(keys, pts) - 1
        return keys[k] if k >= 0 else None

    last = [None]  # pts of the last frame out since the last seek: presentation order only goes forward

    def take(frames) -> None:
        nonlocal j
        for frame in frames:
            if frame.pts is not None:
                if last[0] is not None and frame.pts <= last[0]:
                    raise FastDecodeUnavailable("frames came out of presentation order")
                last[0] = frame.pts
            if frame.pts in want and want[frame.pts] not in got:
                got[want[frame.pts]] = scale(frame)
            while j < len(pending) and want[pending[j]] in got:
                j += 1
            if j < len(pending) and frame.pts is not None and frame.pts > pending[j]:
                raise FastDecodeUnavailable(f"frame at pts {pending[j]} did not come out")

    while j < len(pending):
        start = key_before(pending[j])
        container.seek(start if start is not None else frame_pts[0], stream=stream, backward=True, any_frame=False)
        last[0] = None
        at_end = True
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end of stream
                break
            if packet.pts is None:
                raise FastDecodeUnavailable("a packet without a timestamp")
            if packet.is_keyframe and start is not None and packet.pts > start:
                nxt = key_before(pending[j])
                if nxt is not None and nxt > packet.pts:  # the next needed frame is past another keyframe: seek
                    at_end = False
                    break
            cc.skip_frame = "DEFAULT" if (packet.pts in want or packet.is_keyframe) else "NONREF"
            take(cc.decode(packet))
            if j == len(pending):
                at_end = False
                break
        if at_end:
            cc.skip_frame = "DEFAULT"
            take(cc.decode(None))  # drain the decoder at the end of the stream
            if j < len(pending):
                raise FastDecodeUnavailable(f"frame at pts {pending[j]} is missing")
    cc.skip_frame = "DEFAULT"
    return got


# containers whose packet timestamps are presentation times, with an index (MP4/QuickTime,
# Matroska/WebM); AVI stores none and MPEG-TS may jump: those go to vLLM's loader
_PLANNED_FORMATS = ("mov", "matroska")


@contextlib.contextmanager
def _guarded(data: bytes):
    """``(container, stream)`` once every check a video passes before a decoder sees it, whichever
    loader decodes it, has passed: :func:`vllm_plugin.media.open_untrusted` (containers, tracks,
    codecs, FFmpeg's ``max_pixels``) and vLLM's ``VLLM_MAX_IMAGE_PIXELS``."""
    from vllm import envs
    from vllm.multimodal.video_decoders import check_frame_pixel_limit

    from vllm_plugin.media import open_untrusted

    max_pixels = envs.VLLM_MAX_IMAGE_PIXELS if envs.VLLM_MAX_IMAGE_PIXELS > 0 else 2**31 - 1
    with open_untrusted(data, max_pixels) as (container, stream):
        check_frame_pixel_limit(int(stream.codec_context.width), int(stream.codec_context.height))
        yield container, stream


def _packets(container, stream):
    """Presentable packets in decode order: ``(pts array('q'), keyframe flags bytearray, discarded
    count)``. Raises :class:`FastDecodeUnavailable` where the timestamps cannot place frames."""
    from array import array

    pts, keys, discarded = array("q"), bytearray(), 0
    for p in container.demux(stream):
        if not p.size:
            continue
        if p.is_discard:
            discarded += 1
            continue
        if p.pts is None:
            raise FastDecodeUnavailable("a packet without a timestamp")
        pts.append(p.pts)
        keys.append(1 if p.is_keyframe else 0)
    if not pts or not keys[0]:
        raise FastDecodeUnavailable("the stream does not start with a keyframe")
    if min(pts) < pts[0]:  # leading pictures of an open GOP: the decoder may drop them
        raise FastDecodeUnavailable("frames before the first keyframe")
    if len(set(pts)) != len(pts):
        raise FastDecodeUnavailable("two frames with one timestamp")
    if (stream.codec_context.has_b_frames or 0) > 0 and all(a < b for a, b in zip(pts, pts[1:])):
        raise FastDecodeUnavailable("reordered frames with timestamps in decode order")
    declared = int(stream.frames or 0)
    if declared and declared != len(pts) + discarded:  # a truncated or inconsistent file
        raise FastDecodeUnavailable(f"{declared} frames declared, {len(pts) + discarded} present")
    return pts, keys, discarded


def decode_sampled(loader_cls, data: bytes, target, sampling_kwargs: dict, sizing: FrameSizing | None):
    """``(frames uint8 (N, h, w, 3) RGB, source metadata, sampled indices, indices decoded)`` — the
    return of vLLM's ``decode_video`` — with the frames at ``sizing``'s size. Raises
    :class:`FastDecodeUnavailable` when only vLLM's loader gives vLLM's frames for this file (the
    guards of :func:`_guarded` have passed then), :class:`vllm_plugin.media.VideoDecodeError` when a
    guard refuses it."""
    import av

    with _guarded(data) as (container, stream):
        if container.format.name.split(",")[0] not in _PLANNED_FORMATS:
            raise FastDecodeUnavailable(f"container {container.format.name}")
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        try:
            pts, keys, _ = _packets(container, stream)
            source = loader_cls._prepare_source(source_metadata(container, stream, len(pts)))
            frame_idx = loader_cls.compute_frames_index_to_sample(source=source, target=target, **sampling_kwargs)
            stream.thread_type = (
                "FRAME"  # measured here: FRAME threads 0.97 s, AUTO 1.56 s, SLICE 1.38 s (636 frames, 2048x1810)
            )
            stream.codec_context.thread_count = _THREADS
            scale, (out_h, out_w) = _scaler(sizing, width, height)
            frame_pts = sorted(pts)
            needed = sorted({i for i in frame_idx if 0 <= i < len(frame_pts)})
            key_pts = sorted(p for p, k in zip(pts, keys) if k)
            got = _decode_planned(container, stream, frame_pts, key_pts, needed, scale) if needed else {}
        except (av.error.FFmpegError, OSError) as e:  # a corrupt stretch, a failed seek: vLLM's loader
            raise FastDecodeUnavailable(f"{type(e).__name__}: {e}") from e
    valid = [i for i in frame_idx if i in got]
    frames = np.stack([got[i] for i in valid]) if valid else np.empty((0, out_h, out_w, 3), np.uint8)
    return frames, source, frame_idx, valid


class FastDecodeMixin(_LoaderBase):
    """Put in front of the vLLM loader class vLLM would use (:func:`loader_class`): the same
    sampling, decoded with :func:`decode_sampled`; ``fast_decode=False``, and any file the plan
    does not fit, run the vLLM loader (behind the same guards)."""

    @classmethod
    def load_bytes(cls, data: bytes, **kwargs: Any):  # type: ignore[override]  # vLLM passes keywords (bound below)
        from vllm.multimodal.video_decoders import VideoTargetMetadata, resolve_video_backend_kwargs

        fast = kwargs.pop(FAST_DECODE_KEY, True)
        if not isinstance(fast, bool):
            raise ValueError(f"media_io_kwargs.video.{FAST_DECODE_KEY} must be true or false, got {fast!r}")
        bound = inspect.signature(super().load_bytes).bind(data, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        extra = dict(a.pop("kwargs", {}) or {})
        backend = a.get("backend", "opencv")
        if not fast or backend != "opencv" or a.get("frame_recovery"):
            # exact mode, another codec (GPU ones included) or OpenCV's frame recovery: vLLM's loader
            with _guarded(data):
                pass
            return super().load_bytes(data, **kwargs)
        target = VideoTargetMetadata(
            num_frames=a.get("num_frames", -1), fps=a.get("fps", -1), max_duration=a.get("max_duration", 300)
        )
        sampling_kwargs, _ = resolve_video_backend_kwargs(backend, extra)
        try:
            with _slots():
                frames, source, frame_idx, valid = decode_sampled(cls, data, target, sampling_kwargs, _SIZING)
        except FastDecodeUnavailable as e:
            logger.debug("DTD video loader: vLLM's loader decodes this video (%s)", e)
            return super().load_bytes(data, **kwargs)
        if len(valid) < len(frame_idx):
            logger.warning("DTD video loader: expected %d frames but got %d.", len(frame_idx), len(valid))
        return frames, cls.create_hf_metadata(
            source=source, valid_frame_indices=valid, video_backend=SCALED_TAG if _SIZING is not None else NATIVE_TAG
        )


def split_request_options(media_io_kwargs):
    """``(fast_decode or None, the rest of a request's media_io_kwargs or None)``. ``fast_decode``
    only chooses between two decoders of the same frames (vLLM's loader or this one), so it needs no
    ``--trust-request-mm-kwargs``. Raises ValueError naming the field for a non-boolean value."""
    if not isinstance(media_io_kwargs, dict) or not isinstance(media_io_kwargs.get("video"), dict):
        return None, media_io_kwargs
    video = dict(media_io_kwargs["video"])
    if FAST_DECODE_KEY not in video:
        return None, media_io_kwargs
    fast = video.pop(FAST_DECODE_KEY)
    if not isinstance(fast, bool):
        raise ValueError(f"video.{FAST_DECODE_KEY}: must be true or false, got {fast!r}")
    rest = {**media_io_kwargs, "video": video} if video else {k: v for k, v in media_io_kwargs.items() if k != "video"}
    return fast, rest or None


def check_request(item, request_kwargs) -> None:
    """A video this loader scaled cannot be processed with a request's own frame size (its
    processor kwargs are not visible to the loader): a clear error instead of other tokens."""
    media = getattr(item, "media", item)  # vLLM may wrap (frames, metadata) with the original bytes
    meta = media[1] if isinstance(media, tuple) and len(media) == 2 else None
    if isinstance(meta, Mapping) and meta.get("video_backend") == SCALED_TAG:
        clash = size_keys(request_kwargs)
        if clash:
            raise ValueError(
                f"mm_processor_kwargs.{clash[0]}: the frame size of a request cannot be changed when the "
                f"server's video loader scales frames; send media_io_kwargs "
                f'{{"video": {{"{FAST_DECODE_KEY}": false}}}} with it'
            )


# vLLM loader classes whose load_bytes is VideoBackend.load_bytes (sampling + one codec call): the
# fast path reproduces exactly those. Others (their own load_bytes) stay vLLM's.
_FAST_BASES = ("VideoBackend", "Qwen2VLVideoBackend")
_CLASSES: dict[type, type] = {}


def loader_class(base: type) -> type | None:
    """The fast loader in front of vLLM's ``base`` loader class (None if ``base`` is not one it reproduces)."""
    if base.__name__ not in _FAST_BASES:
        return None
    if base not in _CLASSES:
        _CLASSES[base] = type(f"DTDFast{base.__name__}", (FastDecodeMixin, base), {"__doc__": FastDecodeMixin.__doc__})
    return _CLASSES[base]


def check_vllm(base: type) -> None:
    """The vLLM loader hooks this loader calls, as written for vLLM 0.32 (``VLLMMismatch`` otherwise)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from vllm_plugin.entrypoints.vllm_patches import require

    require(base, "compute_frames_index_to_sample", ["source", "target", "kwargs"])
    require(base, "_prepare_source", ["source"])
    require(base, "create_hf_metadata", ["source", "valid_frame_indices", "video_backend"])
    require(base, "load_bytes", ["data", "num_frames", "fps", "max_duration", "frame_recovery", "backend", "kwargs"])
    require(type(VIDEO_LOADER_REGISTRY), "register", ["name", "video_processor", "requires_gpu"])


def install(model_config, video_processor, server_kwargs: dict) -> str | None:
    """Register the fast loader for the served model's video processor in vLLM's
    ``VIDEO_LOADER_REGISTRY`` (the API server's process only; idempotent) and set the frame sizing.
    ``DTD_FAST_VIDEO_LOADER=0`` leaves vLLM's choice alone. Returns the backend name or None.
    Checks ``DTD_VIDEO_CODECS`` first (ValueError naming it: the server does not start)."""
    global _SIZING
    from vllm import envs
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.processor import get_video_processor_cls_name

    from vllm_plugin.media import CODECS_ENV, video_codecs

    # the guards apply whichever loader decodes: a bad DTD_VIDEO_CODECS fails the server's start
    accepted = video_codecs().describe()
    if _LOGGED_CODECS[0] != accepted:
        _LOGGED_CODECS[0] = accepted
        logger.info("DTD video guards: video codecs accepted (%s): %s", CODECS_ENV, accepted)
    if not settings.get("DTD_FAST_VIDEO_LOADER"):
        logger.info("DTD video loader: off (DTD_FAST_VIDEO_LOADER=0), vLLM's loader decodes videos")
        return None
    name = get_video_processor_cls_name(model_config)
    vllm_backend = VIDEO_LOADER_REGISTRY.get_backend_for_video_processor(name)
    if vllm_backend == LOADER_NAME:
        return LOADER_NAME  # installed already
    base = VIDEO_LOADER_REGISTRY.name2class[vllm_backend or envs.VLLM_VIDEO_LOADER_BACKEND]
    cls = loader_class(base)
    if cls is None or name is None:
        logger.info("DTD video loader: not used for %s (vLLM loader %s has its own decoding)", name, vllm_backend)
        return None
    check_vllm(base)
    _SIZING = FrameSizing.of(video_processor, server_kwargs)
    VIDEO_LOADER_REGISTRY.register(LOADER_NAME, video_processor=name)(cls)
    logger.info(
        "DTD video loader %r: decodes the frames vLLM's %r loader samples, scaled to the processor's "
        'size (%s); media_io_kwargs {"video": {"fast_decode": false}} runs vLLM\'s loader',
        LOADER_NAME,
        vllm_backend or envs.VLLM_VIDEO_LOADER_BACKEND,
        "per processor config" if _SIZING else "not scaled: the server's processor kwargs set the size",
    )
    return LOADER_NAME
