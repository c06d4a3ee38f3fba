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
   Anything this plan cannot account for (a packet without a timestamp, a needed frame that does
   not come out where the packets said) falls back to decoding every frame in order, as OpenCV
   does.
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
processor's size, are held.

``fast_decode: false`` (``--media-io-kwargs '{"video": {"fast_decode": false}}'`` for the server, or a
request's ``media_io_kwargs``) runs vLLM's own loader unchanged (bit-identical frames) behind the
same guards. ``--media-io-kwargs '{"video": {"video_backend": "qwen2_vl"}}'`` selects vLLM's loader
with no plugin code at all.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

logger = logging.getLogger("vllm.dtd_plugin")

LOADER_NAME = "dtd_fast"
NATIVE_TAG, SCALED_TAG = f"pyav_{LOADER_NAME}", f"pyav_{LOADER_NAME}_scaled"  # the metadata's video_backend
FAST_DECODE_KEY = "fast_decode"
# processor kwargs that change the frame size: the loader cannot see a request's processor kwargs
SIZE_KWARGS = ("size", "min_pixels", "max_pixels", "shortest_edge", "longest_edge", "resized_height",
               "resized_width", "cap_pixels_per_frame", "max_video_tokens")
# the Qwen processors resize with bicubic (antialiased) too; scaling the YUV planes before the RGB
# conversion: 3.0 ms per 2048x1810 -> 476x420 frame, converting first then scaling: 15.4 ms
_SWS_INTERPOLATION = "BICUBIC"


class FastDecodeUnavailable(Exception):
    """The decode plan does not fit this file: decode every frame in order instead."""


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
    def of(cls, video_processor, server_kwargs: dict) -> Optional["FrameSizing"]:
        """The sizing of ``video_processor``; None when the server's processor kwargs change it (then
        frames are decoded at their own size and the processor resizes them, as in vLLM)."""
        if any(k in (server_kwargs or {}) for k in SIZE_KWARGS):
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


_SIZING: Optional[FrameSizing] = None
_THREADS = os.cpu_count() or 1
_SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get("DTD_VIDEO_DECODE_CONCURRENCY", "0") or 0) or (os.cpu_count() or 1)))


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


def _scaler(sizing: Optional[FrameSizing], width: int, height: int):
    out_h, out_w = sizing.size(height, width) if sizing is not None else (height, width)

    def scale(frame) -> np.ndarray:
        if (out_h, out_w) != (height, width):  # scale the YUV planes, then convert the small frame
            frame = frame.reformat(width=out_w, height=out_h, interpolation=_SWS_INTERPOLATION)
        return frame.to_ndarray(format="rgb24")

    return scale, (out_h, out_w)


def _decode_planned(container, stream, frame_pts: list[int], keys: list[int], indices: list[int], scale) -> dict[int, np.ndarray]:
    """Decode the frames at ``indices`` (presentation order), seeking to the keyframe before each
    run and skipping non-reference frames nothing needs. Raises :class:`FastDecodeUnavailable`
    when a needed frame does not come out as planned."""
    want = {frame_pts[i]: i for i in indices}
    pending = sorted(want)
    got: dict[int, np.ndarray] = {}
    cc = stream.codec_context
    j = 0

    def key_before(pts: int) -> Optional[int]:
        k = bisect.bisect_right(keys, pts) - 1
        return keys[k] if k >= 0 else None

    def take(frames) -> None:
        nonlocal j
        for frame in frames:
            if frame.pts in want and want[frame.pts] not in got:
                got[want[frame.pts]] = scale(frame)
            while j < len(pending) and want[pending[j]] in got:
                j += 1
            if j < len(pending) and frame.pts is not None and frame.pts > pending[j]:
                raise FastDecodeUnavailable(f"frame at pts {pending[j]} did not come out")

    while j < len(pending):
        start = key_before(pending[j])
        container.seek(start if start is not None else frame_pts[0], stream=stream, backward=True, any_frame=False)
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


def _decode_in_order(container, stream, indices: list[int], scale) -> dict[int, np.ndarray]:
    """Every frame in order from the start (OpenCV's way of counting); only ``indices`` are scaled."""
    container.seek(0, stream=stream, backward=True, any_frame=False)
    stream.codec_context.skip_frame = "DEFAULT"
    want, last = set(indices), max(indices)
    got: dict[int, np.ndarray] = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            got[i] = scale(frame)
        if i >= last:
            break
    return got


def decode_sampled(loader_cls, data: bytes, target, sampling_kwargs: dict, sizing: Optional[FrameSizing]):
    """``(frames uint8 (N, h, w, 3) RGB, source metadata, sampled indices, indices decoded)`` — the
    return of vLLM's ``decode_video`` — with the frames at ``sizing``'s size."""
    import av

    from vllm import envs
    from vllm.multimodal.video_decoders import check_frame_pixel_limit

    from vllm_plugin.media import open_untrusted

    max_pixels = envs.VLLM_MAX_IMAGE_PIXELS if envs.VLLM_MAX_IMAGE_PIXELS > 0 else 2**31 - 1
    with open_untrusted(data, max_pixels) as (container, stream):
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        check_frame_pixel_limit(width, height)
        packets = [(p.pts, bool(p.is_keyframe)) for p in container.demux(stream) if p.size and not p.is_discard]
        source = loader_cls._prepare_source(source_metadata(container, stream, len(packets)))
        frame_idx = loader_cls.compute_frames_index_to_sample(source=source, target=target, **sampling_kwargs)
        stream.thread_type = "FRAME"  # measured here: FRAME threads 0.97 s, AUTO 1.56 s, SLICE 1.38 s (636 frames, 2048x1810)
        stream.codec_context.thread_count = _THREADS
        scale, (out_h, out_w) = _scaler(sizing, width, height)
        needed = sorted({i for i in frame_idx if 0 <= i})
        got: dict[int, np.ndarray] = {}
        if needed:
            try:
                if any(p is None for p, _ in packets):
                    raise FastDecodeUnavailable("a packet without a timestamp")
                frame_pts = sorted(p for p, _ in packets)
                if len(set(frame_pts)) != len(frame_pts):
                    raise FastDecodeUnavailable("two frames with one timestamp")
                keys = sorted(p for p, k in packets if k)
                got = _decode_planned(container, stream, frame_pts, keys, [i for i in needed if i < len(frame_pts)], scale)
            except FastDecodeUnavailable as e:
                logger.debug("DTD video loader: decoding every frame (%s)", e)
                got = _decode_in_order(container, stream, needed, scale)
    valid = [i for i in frame_idx if i in got]
    frames = np.stack([got[i] for i in valid]) if valid else np.empty((0, out_h, out_w, 3), np.uint8)
    return frames, source, frame_idx, valid


class FastDecodeMixin:
    """Put in front of the vLLM loader class vLLM would use (:func:`loader_class`): the same
    sampling, decoded with :func:`decode_sampled`; ``fast_decode=False`` runs the vLLM loader."""

    @classmethod
    def load_bytes(cls, data: bytes, **kwargs: Any):
        from vllm.multimodal.video_decoders import VideoTargetMetadata, resolve_video_backend_kwargs

        fast = kwargs.pop(FAST_DECODE_KEY, True)
        if not isinstance(fast, bool):
            raise ValueError(f"media_io_kwargs.video.{FAST_DECODE_KEY} must be true or false, got {fast!r}")
        base = super()
        if not fast:
            from vllm_plugin.media import sniff_container

            sniff_container(data)  # the same container allow-list as the fast path
            return base.load_bytes(data, **kwargs)
        bound = inspect.signature(base.load_bytes).bind(data, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        extra = dict(a.pop("kwargs", {}) or {})
        backend = a.get("backend", "opencv")
        if backend != "opencv" or a.get("frame_recovery"):  # another codec, or OpenCV's recovery: vLLM's path
            return base.load_bytes(data, **kwargs)
        target = VideoTargetMetadata(num_frames=a.get("num_frames", -1), fps=a.get("fps", -1),
                                     max_duration=a.get("max_duration", 300))
        sampling_kwargs, _ = resolve_video_backend_kwargs(backend, extra)
        with _SLOTS:
            frames, source, frame_idx, valid = decode_sampled(cls, data, target, sampling_kwargs, _SIZING)
        if len(valid) < len(frame_idx):
            logger.warning("DTD video loader: expected %d frames but got %d.", len(frame_idx), len(valid))
        return frames, cls.create_hf_metadata(source=source, valid_frame_indices=valid,
                                              video_backend=SCALED_TAG if _SIZING is not None else NATIVE_TAG)


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
    from collections.abc import Mapping

    media = getattr(item, "media", item)  # vLLM may wrap (frames, metadata) with the original bytes
    meta = media[1] if isinstance(media, tuple) and len(media) == 2 else None
    if isinstance(meta, Mapping) and meta.get("video_backend") == SCALED_TAG:
        clash = sorted(k for k in SIZE_KWARGS if k in (request_kwargs or {}))
        if clash:
            raise ValueError(f"mm_processor_kwargs.{clash[0]}: the frame size of a request cannot be changed when the "
                             f"server's video loader scales frames; send media_io_kwargs "
                             f'{{"video": {{"{FAST_DECODE_KEY}": false}}}} with it')


# vLLM loader classes whose load_bytes is VideoBackend.load_bytes (sampling + one codec call): the
# fast path reproduces exactly those. Others (their own load_bytes) stay vLLM's.
_FAST_BASES = ("VideoBackend", "Qwen2VLVideoBackend")
_CLASSES: dict[type, type] = {}


def loader_class(base: type) -> Optional[type]:
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


def install(model_config, video_processor, server_kwargs: dict) -> Optional[str]:
    """Register the fast loader for the served model's video processor in vLLM's
    ``VIDEO_LOADER_REGISTRY`` (the API server's process only; idempotent) and set the frame sizing.
    ``DTD_FAST_VIDEO_LOADER=0`` leaves vLLM's choice alone. Returns the backend name or None."""
    global _SIZING
    from vllm import envs
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.processor import get_video_processor_cls_name

    if os.environ.get("DTD_FAST_VIDEO_LOADER", "1").strip().lower() in ("0", "false", "no", "off"):
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
    logger.info("DTD video loader %r: decodes the frames vLLM's %r loader samples, scaled to the processor's "
                "size (%s); media_io_kwargs {\"video\": {\"fast_decode\": false}} runs vLLM's loader",
                LOADER_NAME, vllm_backend or envs.VLLM_VIDEO_LOADER_BACKEND,
                "per processor config" if _SIZING else "not scaled: the server's processor kwargs set the size")
    return LOADER_NAME
