"""Decoding video and images (PyAV, Pillow) for the plugin's stream routes and the workbench.

Two entry points with different trust:

* :func:`decode_video` reads a file the USER points at (workbench, benchmarks): FFmpeg probes its
  format as usual.
* :func:`decode_video_upload` / :func:`decode_image` read bytes a CLIENT sent (stream uploads).
  Those are decoded only as self-contained containers from :data:`UPLOAD_FORMATS`, the demuxer
  chosen explicitly from the leading bytes, never by FFmpeg's probing: demuxers that open other
  files or URLs (``concat``/ffconcat lists, HLS/DASH playlists, ``image2`` patterns, ``tee``,
  ``data:``/``subfile`` URLs, QuickTime external data references) are never reached. Frame size and
  frame count are checked from the container's codec parameters before anything is decoded, frames
  are decoded one at a time and handed to the caller at once (one full-size frame in memory), and
  a hostile file whose frames turn out larger or more numerous than its header says is stopped at
  the first frame over the budget.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

Source = Union[str, os.PathLike, bytes]


class VideoDecodeError(ValueError):
    """Missing, not a video, corrupt, or without frames."""


class MediaTooLarge(VideoDecodeError):
    """The media would decode to more pixels than a limit allows (HTTP 413 at the stream routes)."""


# Container formats a stream upload may use: FFmpeg demuxer name -> what it is. Each is
# self-contained (the demuxer reads only the bytes given; for QuickTime/MP4 external data
# references are switched off explicitly below).
UPLOAD_FORMATS = {
    "mov": "MP4 / QuickTime (ftyp, moov, mdat ... boxes)",
    "matroska": "Matroska / WebM (EBML header)",
    "avi": "AVI (RIFF ... AVI)",
    "mpegts": "MPEG transport stream (0x47 sync bytes every 188)",
}
_DEMUXER_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}
# FFmpeg decodes a frame of every track while it opens a file (stream-info probing), before any
# check of ours: a file of many large tracks would cost memory there. Few tracks, each capped.
MAX_UPLOAD_TRACKS = 4


def _refuse_nested_open(url, flags, options):
    """``io_open`` for uploads: a demuxer that tries to open anything besides the upload fails."""
    raise PermissionError(f"an upload may not open other files or URLs ({str(url)[:80]!r})")
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Video codecs an upload may use (FFmpeg codec names): what cameras, screen recorders and browsers
# produce. Any other of FFmpeg's hundreds of decoders is never run on client bytes.
UPLOAD_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg")
_PROBE_DECODERS = ",".join(UPLOAD_CODECS + ("libdav1d", "libvpx", "libvpx-vp9", "aac", "mp3", "opus", "vorbis"))


def sniff_container(data: bytes) -> str:
    """The FFmpeg demuxer of :data:`UPLOAD_FORMATS` for these bytes, from their leading bytes only.

    Raises :class:`VideoDecodeError` for anything else (playlists, concat lists, images, text...).
    """
    if len(data) >= 12 and data[4:8] in _MP4_BOXES:
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if len(data) >= 376 and data[0] == data[188] == data[376] == 0x47:
        return "mpegts"
    allowed = ", ".join(UPLOAD_FORMATS[k] for k in UPLOAD_FORMATS)
    raise VideoDecodeError(f"not a video container this server accepts (allowed: {allowed})")


def _sample(container, stream, fps, start, end, max_frames, check=None) -> Iterator[tuple[object, float]]:
    """For every time ``start + k/fps`` yield the first decoded frame at or after it, with its time
    relative to ``start`` (``fps=None``: every frame; ``start=None``: the first frame's time).
    ``check(frame)`` sees every decoded frame."""
    source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    next_t, n_out, n_in = start, 0, 0
    for frame in container.decode(stream):
        if check is not None:
            check(frame)
        t = float(frame.time) if frame.time is not None else n_in / source_fps
        n_in += 1
        if start is None:  # times from the first frame (a chunk's own clock may start anywhere)
            start = next_t = t
        if t + 1e-6 < start:
            continue
        if end is not None and t >= end:
            break
        if fps is None or t + 1e-6 >= next_t:
            yield frame, t - start
            n_out += 1
            if fps is not None:  # the next sampling instant after t
                next_t = start + (np.floor((t - start) * fps + 1e-6) + 1) / fps
            if max_frames is not None and n_out >= max_frames:
                return


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) RGB → (height, width, 3), bicubic (PIL): how a stream resizes its frames, and
    how tools that must send the same pixels resize them ahead. A frame already at size is returned."""
    from PIL import Image

    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def decode_video(
    source: Source,
    fps: Optional[float] = 1.0,
    max_frames: Optional[int] = None,
    start: float = 0.0,
    end: Optional[float] = None,
    fit: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Decode a file path or in-memory bytes the user trusts; for every time k/fps keep the first
    frame at or after it (``fit(frame)`` of it when given: e.g. resized, so a long video is never
    held at full size).

    Returns ``(frames uint8 (N, H, W, 3) RGB, timestamps (N,) s relative to start, source_fps,
    duration)``. ``fps=None`` keeps every frame. Raises :class:`VideoDecodeError`.
    """
    import av

    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise VideoDecodeError("empty video data")
        handle, name = io.BytesIO(source), "<bytes>"
    else:
        name = str(source)
        if not Path(name).is_file():
            raise VideoDecodeError(f"no such video file: {name}")
        handle = name
    frames: list[np.ndarray] = []
    times: list[float] = []
    last = [start]
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name} has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0

            def seen(frame):
                if frame.time is not None:
                    last[0] = float(frame.time)

            for frame, t in _sample(container, stream, fps, start, end, max_frames, check=seen):
                arr = frame.to_ndarray(format="rgb24")
                frames.append(fit(arr) if fit is not None else arr)
                times.append(t)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode {name}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"{name} has no decodable frames")
    return np.stack(frames), np.asarray(times, dtype=np.float64), source_fps, (last[0] - start) + 1.0 / source_fps


def _frames_from_header(container, stream) -> int:
    """The frame count the container declares (0 if it declares none)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return int(float(stream.duration * stream.time_base) * float(rate)) + 1
    if rate and container.duration:
        return int(container.duration / 1_000_000 * float(rate)) + 1
    return 0


@contextlib.contextmanager
def open_untrusted(data: bytes, max_frame_pixels: int, what: str = "the video"):
    """Open a client's video bytes: ``(container, its first video stream)``, closed on exit.

    Only :data:`UPLOAD_FORMATS` (demuxer chosen from the leading bytes, nested opens refused), at
    most :data:`MAX_UPLOAD_TRACKS` tracks, codecs of :data:`UPLOAD_CODECS`, and FFmpeg's own
    ``max_pixels`` limit on the decoders (frames decoded while opening included). The frame size
    is checked from the codec parameters before anything is decoded. Raises
    :class:`MediaTooLarge` / :class:`VideoDecodeError` (FFmpeg's errors while opening included).
    """
    import av

    if not data:
        raise VideoDecodeError("empty video data")
    fmt = sniff_container(data)
    capped = {"max_pixels": str(max_frame_pixels)}
    try:
        # codec_whitelist: the decoders FFmpeg's stream-info probing may open while the file is opened
        container = av.open(io.BytesIO(data), format=fmt, io_open=_refuse_nested_open,
                            container_options={**_DEMUXER_OPTIONS.get(fmt, {}), "max_streams": str(MAX_UPLOAD_TRACKS),
                                               "codec_whitelist": _PROBE_DECODERS},
                            stream_options=[capped] * MAX_UPLOAD_TRACKS)
    except av.error.MemoryError as e:  # ENOMEM: what FFmpeg's max_streams / max_pixels limits answer
        raise MediaTooLarge(f"{what} exceeds the decoder's limits (at most {MAX_UPLOAD_TRACKS} tracks, "
                            f"{max_frame_pixels} pixels per frame)") from e
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode {what}: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{what} has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec
        if getattr(codec, "canonical_name", codec.name) not in UPLOAD_CODECS:  # av1 may be decoded by libdav1d
            raise VideoDecodeError(f"video codec {codec.name!r} is not accepted "
                                   f"(accepted: {', '.join(UPLOAD_CODECS)})")
        stream.codec_context.options = capped  # the decoder refuses frames larger than the cap
        w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if w <= 0 or h <= 0:
            raise VideoDecodeError(f"{what} declares no frame size")
        if w * h > max_frame_pixels:
            raise MediaTooLarge(f"video frames of {w}x{h} pixels exceed the limit of {max_frame_pixels} pixels per frame")
        yield container, stream


def decode_video_upload(
    data: bytes,
    fps: float,
    fit: Callable[[np.ndarray], np.ndarray],
    max_frames: int,
    max_frame_pixels: int,
    max_decoded_pixels: int,
) -> tuple[list[np.ndarray], list[float]]:
    """Decode a client's video chunk: ``(fit(frame) for each sampled frame, times s from its start)``.

    ``fit`` gets one full-size uint8 (H, W, 3) frame at a time and returns what is kept (the
    stream resizes it). Limits: ``max_frame_pixels`` per frame and ``max_decoded_pixels`` over all
    frames the decoder produces (sampled or not), checked from the codec parameters before decoding
    and again on every decoded frame; at most ``max_frames`` sampled frames are kept. Raises
    :class:`MediaTooLarge` over a limit, :class:`VideoDecodeError` for anything unusable.
    """
    import av

    if not data:
        raise VideoDecodeError("empty video data")
    out: list[np.ndarray] = []
    times: list[float] = []
    try:
        with open_untrusted(data, max_frame_pixels, what="the video chunk") as (container, stream):
            w, h = int(stream.codec_context.width), int(stream.codec_context.height)
            declared = _frames_from_header(container, stream)
            if declared * w * h > max_decoded_pixels:
                raise MediaTooLarge(
                    f"the video chunk declares {declared} frames of {w}x{h} = {declared * w * h} pixels; "
                    f"at most {max_decoded_pixels} decoded pixels per upload")
            budget = [max_decoded_pixels]

            def check(frame):
                px = int(frame.width) * int(frame.height)
                if px > max_frame_pixels:
                    raise MediaTooLarge(f"a decoded frame of {frame.width}x{frame.height} pixels exceeds the limit "
                                        f"of {max_frame_pixels} pixels per frame")
                budget[0] -= px
                if budget[0] < 0:
                    raise MediaTooLarge(f"the video chunk decodes to more than {max_decoded_pixels} pixels "
                                        "(the limit per upload)")

            for frame, t in _sample(container, stream, fps, None, None, max_frames, check=check):
                out.append(fit(frame.to_ndarray(format="rgb24")))
                times.append(t)
    except av.error.MemoryError as e:  # ENOMEM: what FFmpeg's max_streams / max_pixels limits answer
        raise MediaTooLarge(f"the video chunk exceeds the decoder's limits (at most {MAX_UPLOAD_TRACKS} tracks, "
                            f"{max_frame_pixels} pixels per frame)") from e
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode the video chunk: {e}") from e
    if not out:
        raise VideoDecodeError("the video chunk has no decodable frames")
    return out, times


def decode_image(data: bytes, max_pixels: int = 4096 * 4096, max_side: int = 8192) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 (H, W, 3) RGB. The size is read from the header and checked
    before the pixels are decoded. Raises :class:`MediaTooLarge` over ``max_pixels``,
    ``ValueError`` for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if max(w, h) > max_side or min(w, h) < 1:
                raise ValueError(f"image size {im.size} outside 1..{max_side} pixels per side")
            if w * h > max_pixels:
                raise MediaTooLarge(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels per frame")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a decodable PNG, JPEG or WebP image: {e}") from None


def encode_png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
