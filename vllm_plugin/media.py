"""Decoding video and images (PyAV, Pillow) for the plugin's stream routes and the workbench."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

Source = Union[str, os.PathLike, bytes]


class VideoDecodeError(ValueError):
    """Missing, not a video, corrupt, or without frames."""


def decode_video(
    source: Source,
    fps: Optional[float] = 1.0,
    max_frames: Optional[int] = None,
    start: float = 0.0,
    end: Optional[float] = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Decode a file path or in-memory bytes; for every time k/fps keep the first frame at or after it.

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
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name} has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            next_t, last_t = start, start
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(times) / source_fps
                last_t = t
                if t + 1e-6 < start:
                    continue
                if end is not None and t >= end:
                    break
                if fps is None or t + 1e-6 >= next_t:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(t - start)
                    if fps is not None:  # the next sampling instant after t
                        next_t = start + (np.floor((t - start) * fps + 1e-6) + 1) / fps
                    if max_frames is not None and len(frames) >= max_frames:
                        break
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode {name}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"{name} has no decodable frames")
    return np.stack(frames), np.asarray(times, dtype=np.float64), source_fps, (last_t - start) + 1.0 / source_fps


def decode_image(data: bytes, max_side: int = 8192) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 (H, W, 3) RGB. Raises ``ValueError`` for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > max_side or min(im.size) < 1:
                raise ValueError(f"image size {im.size} outside 1..{max_side} pixels per side")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a decodable image: {e}") from None


def encode_png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
