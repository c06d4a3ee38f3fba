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

Video codecs: only the FFmpeg decoders of :func:`video_codecs` ever see client bytes, for stream
uploads and for ``video_url`` requests alike (the plugin's video loader opens them with
:func:`open_untrusted` too): :data:`DEFAULT_VIDEO_CODECS`, or the server's ``DTD_VIDEO_CODECS``
(comma-separated FFmpeg decoder names, read in the process that decodes, checked when the server
starts: :func:`vllm_plugin.entrypoints.video_loader.install`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vllm_plugin import settings
from vllm_plugin.settings import SettingsError

if TYPE_CHECKING:
    from av import VideoFrame

Source = str | os.PathLike | bytes


class VideoDecodeError(ValueError):
    """Missing, not a video, corrupt, or without frames."""


class MediaTooLarge(VideoDecodeError):
    """The media would decode to more pixels than a limit allows (HTTP 413 at the stream routes)."""


class CodecNotAccepted(VideoDecodeError):
    """The video's codec is not one of the server's :func:`video_codecs` (HTTP 400)."""


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
# Video codecs a client's video may use by default (FFmpeg decoder names): what cameras, phones,
# screen recorders and browsers produce, and what older cameras and computer-vision sample data
# store in AVI / MPEG / WMV-era files (MS-MPEG4 v1-v3, H.263, WMV 1-3 / VC-1, Theora, Sorenson
# FLV) — the files vLLM's own loaders (OpenCV, PyAV/torchcodec: any FFmpeg decoder) open. Any other
# of FFmpeg's hundreds of decoders is never run on client bytes. ``DTD_VIDEO_CODECS`` replaces the
# list; a default decoder this FFmpeg build lacks is left out.
CODECS_ENV = "DTD_VIDEO_CODECS"
DEFAULT_VIDEO_CODECS = (
    "h264",
    "hevc",
    "vp8",
    "vp9",
    "av1",
    "mpeg4",
    "mpeg1video",
    "mpeg2video",
    "mjpeg",
    "msmpeg4v1",
    "msmpeg4v2",
    "msmpeg4",
    "h263",
    "wmv1",
    "wmv2",
    "wmv3",
    "vc1",
    "theora",
    "flv",
)
UPLOAD_CODECS = DEFAULT_VIDEO_CODECS  # the name of the fixed list before DTD_VIDEO_CODECS
# Audio decoders FFmpeg's stream-info probing may open while a file is opened (its audio track is
# never decoded by us): the usual tracks of the allowed containers.
_PROBE_AUDIO = ("aac", "mp3", "opus", "vorbis")
_NOT_SOFTWARE = (1 << 18) | (1 << 19) | (1 << 9)  # AV_CODEC_CAP_HARDWARE, _HYBRID, _EXPERIMENTAL


@dataclass(frozen=True)
class VideoCodecs:
    """The video codecs client bytes may use. ``names``: the decoder names configured; ``ids``: their
    codecs (FFmpeg's canonical codec names: ``msmpeg4`` decodes ``msmpeg4v3``, ``libdav1d``
    ``av1``); ``probe``: FFmpeg's ``codec_whitelist`` while a file is opened (every decoder of this
    build for those codecs, e.g. ``libdav1d`` for ``av1``, and :data:`_PROBE_AUDIO`)."""

    names: tuple[str, ...]
    ids: frozenset
    probe: str

    def accepts(self, codec) -> bool:
        """Whether a stream's decoder (``av.codec.Codec``) decodes one of these codecs."""
        return codec.name in self.names or getattr(codec, "canonical_name", codec.name) in self.ids

    def describe(self) -> str:
        return ", ".join(self.names)


def _decoder(name: str):
    """``av.codec.Codec(name, "r")``, None when this FFmpeg has no decoder of that name."""
    import av

    try:
        return av.codec.Codec(name, "r")
    except Exception:  # av.codec.codec.UnknownCodecError (a ValueError), or FFmpeg's own error
        return None


@functools.lru_cache(maxsize=8)
def _parse_codecs(given: tuple[str, ...] | None) -> VideoCodecs:
    import av

    if given is None:
        names = tuple(n for n in DEFAULT_VIDEO_CODECS if _decoder(n) is not None)
    else:
        names = given
        unknown = [n for n in names if _decoder(n) is None]
        if unknown:
            raise SettingsError(
                CODECS_ENV,
                ",".join(given),
                f"{CODECS_ENV}: this FFmpeg (PyAV {av.__version__}) has no decoder named "
                f"{', '.join(map(repr, unknown))}; give FFmpeg decoder names "
                f"(`ffmpeg -decoders`; default: {','.join(DEFAULT_VIDEO_CODECS)})",
            )
        audio = [n for n in names if _decoder(n).type != "video"]
        if audio:
            raise SettingsError(
                CODECS_ENV,
                ",".join(given),
                f"{CODECS_ENV}: {', '.join(map(repr, audio))} "
                f"{'is not a video decoder' if len(audio) == 1 else 'are not video decoders'}",
            )
    ids = frozenset(_decoder(n).canonical_name for n in names)
    probe = [_decoder(n).name for n in names]  # (msmpeg4v3 is decoded by msmpeg4, flv1 by flv)
    for n in sorted(av.codecs_available):  # the other software decoders of these codecs (libdav1d for av1...)
        c = _decoder(n) if n not in probe else None
        if c is not None and c.type == "video" and c.canonical_name in ids and not c.capabilities & _NOT_SOFTWARE:
            probe.append(c.name)
    return VideoCodecs(names, ids, ",".join(dict.fromkeys(probe + list(_PROBE_AUDIO))))


def video_codecs(env=None) -> VideoCodecs:
    """The video codecs client bytes may use: ``DTD_VIDEO_CODECS`` of ``env`` (default
    ``os.environ``, read at each call: the process that decodes reads it) — comma-separated FFmpeg
    decoder names — else :data:`DEFAULT_VIDEO_CODECS` (those this FFmpeg has). Raises
    :class:`~vllm_plugin.settings.SettingsError` (a ValueError) naming the variable for a list that
    names nothing or a name this FFmpeg has no video decoder of."""
    return _parse_codecs(settings.get(CODECS_ENV, env))


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


def _sample(container, stream, fps, start, end, max_frames, check=None) -> Iterator[tuple[VideoFrame, float]]:
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
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def decode_video(
    source: Source,
    fps: float | None = 1.0,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    fit: Callable[[np.ndarray], np.ndarray] | None = None,
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
        handle: io.BytesIO | str = io.BytesIO(source)
        name = "<bytes>"
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


def _container_frame_size(data: bytes, fmt: str) -> tuple[int, int]:
    """The first video track's frame size as the container header declares it, opened with no
    decoder allowed (``(0, 0)`` when it declares none or cannot be opened)."""
    import av

    try:
        with av.open(
            io.BytesIO(data),
            format=fmt,
            io_open=_refuse_nested_open,
            container_options={
                **_DEMUXER_OPTIONS.get(fmt, {}),
                "max_streams": str(MAX_UPLOAD_TRACKS),
                "codec_whitelist": "none",
            },
        ) as container:
            if container.streams.video:
                cc = container.streams.video[0].codec_context
                return int(cc.width or 0), int(cc.height or 0)
    except av.error.FFmpegError:
        pass
    return 0, 0


@contextlib.contextmanager
def _decoder_errors(what: str, max_frame_pixels: int):
    """FFmpeg's errors inside as the plugin's: :class:`MediaTooLarge` for ENOMEM (what FFmpeg's
    ``max_streams`` / ``max_pixels`` limits answer), :class:`VideoDecodeError` for any other."""
    import av

    try:
        yield
    except av.error.MemoryError as e:
        raise MediaTooLarge(
            f"{what} exceeds the decoder's limits (at most {MAX_UPLOAD_TRACKS} tracks, "
            f"{max_frame_pixels} pixels per frame)"
        ) from e
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode {what}: {e}") from e


@contextlib.contextmanager
def open_untrusted(data: bytes, max_frame_pixels: int, what: str = "the video"):
    """Open a client's video bytes: ``(container, its first video stream)``, closed on exit.

    Only :data:`UPLOAD_FORMATS` (demuxer chosen from the leading bytes, nested opens refused), at
    most :data:`MAX_UPLOAD_TRACKS` tracks, codecs of :func:`video_codecs`, and FFmpeg's own
    ``max_pixels`` limit on the decoders (frames decoded while opening included). The frame size
    is checked from the codec parameters before anything is decoded. Raises
    :class:`MediaTooLarge` / :class:`CodecNotAccepted` / :class:`VideoDecodeError` (FFmpeg's errors
    while opening included); SettingsError (a ValueError) when ``DTD_VIDEO_CODECS`` is invalid.
    """
    import av

    codecs = video_codecs()  # a misconfigured server fails here (ValueError), not with the client's error
    if not data:
        raise VideoDecodeError("empty video data")
    fmt = sniff_container(data)
    capped = {"max_pixels": str(max_frame_pixels)}
    with _decoder_errors(what, max_frame_pixels):
        # codec_whitelist: the decoders FFmpeg's stream-info probing may open while the file is opened
        container = av.open(
            io.BytesIO(data),
            format=fmt,
            io_open=_refuse_nested_open,
            container_options={
                **_DEMUXER_OPTIONS.get(fmt, {}),
                "max_streams": str(MAX_UPLOAD_TRACKS),
                "codec_whitelist": codecs.probe,
            },
            stream_options=[capped] * MAX_UPLOAD_TRACKS,  # type: ignore[list-item]  # PyAV's stub: per-stream dicts
        )
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{what} has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec
        if not codecs.accepts(codec):  # by decoder or codec name: av1 may be decoded by libdav1d
            raise CodecNotAccepted(
                f"video codec {codec.name!r} is not accepted by this server (accepted: "
                f"{codecs.describe()}; the server's {CODECS_ENV} sets the list)"
            )
        stream.codec_context.options = capped  # the decoder refuses frames larger than the cap
        w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if w <= 0 or h <= 0:
            # a decoder that refused the cap while the file was opened (the MPEG-4 / H.263 family
            # checks its size when it opens) leaves no size: the container's own, no decoder run
            dw, dh = _container_frame_size(data, fmt)
            if dw * dh > max_frame_pixels:
                raise MediaTooLarge(
                    f"video frames of {dw}x{dh} pixels exceed the limit of {max_frame_pixels} pixels per frame"
                )
            raise VideoDecodeError(f"{what} declares no frame size")
        if w * h > max_frame_pixels:
            raise MediaTooLarge(
                f"video frames of {w}x{h} pixels exceed the limit of {max_frame_pixels} pixels per frame"
            )
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
    if not data:
        raise VideoDecodeError("empty video data")
    out: list[np.ndarray] = []
    times: list[float] = []
    what = "the video chunk"
    with _decoder_errors(what, max_frame_pixels), open_untrusted(data, max_frame_pixels, what) as (container, stream):
        w, h = int(stream.codec_context.width), int(stream.codec_context.height)
        declared = _frames_from_header(container, stream)
        if declared * w * h > max_decoded_pixels:
            raise MediaTooLarge(
                f"the video chunk declares {declared} frames of {w}x{h} = {declared * w * h} pixels; "
                f"at most {max_decoded_pixels} decoded pixels per upload"
            )
        budget = [max_decoded_pixels]

        def check(frame):
            px = int(frame.width) * int(frame.height)
            if px > max_frame_pixels:
                raise MediaTooLarge(
                    f"a decoded frame of {frame.width}x{frame.height} pixels exceeds the limit "
                    f"of {max_frame_pixels} pixels per frame"
                )
            budget[0] -= px
            if budget[0] < 0:
                raise MediaTooLarge(
                    f"the video chunk decodes to more than {max_decoded_pixels} pixels (the limit per upload)"
                )

        for frame, t in _sample(container, stream, fps, None, None, max_frames, check=check):
            out.append(fit(frame.to_ndarray(format="rgb24")))
            times.append(t)
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
