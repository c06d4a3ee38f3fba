"""Video decoding (PyAV) at a chosen frame rate, and writing clips (for the synthetic generator)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.lib.paths import ASSETS, SAMPLE_VIDEO
from vllm_plugin.media import VideoDecodeError, decode_video, resize_frame

__all__ = ["ASSETS", "SAMPLE_VIDEO", "Video", "VideoDecodeError", "load_video", "write_video"]


@dataclass
class Video:
    """Decoded frames. ``frames``: uint8 (N, H, W, 3) RGB; ``timestamps``: float seconds (N,)."""

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float  # sampling rate of ``frames`` (the source rate when not resampled)
    source_fps: float
    duration: float
    path: str | None = None

    def __len__(self) -> int:
        return len(self.frames)


def load_video(
    path: str | os.PathLike,
    fps: float | None = 1.0,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    size: tuple[int, int] | None = None,
) -> Video:
    """Decode ``path`` (PyAV) keeping, for every time k/fps, the first frame at or after it
    (:func:`vllm_plugin.media.decode_video`). ``fps=None`` keeps every frame. ``size``: (height,
    width) each frame is resized to as it is decoded (bicubic, as a stream resizes its frames).
    Raises :class:`VideoDecodeError` for unreadable input."""
    fit = None if size is None else (lambda f: resize_frame(f, *size))
    frames, times, source_fps, duration = decode_video(
        path, fps=fps, max_frames=max_frames, start=start, end=end, fit=fit
    )
    return Video(frames, times, float(fps) if fps is not None else source_fps, source_fps, duration, str(path))


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, lossless: bool = True) -> Path:
    """Encode uint8 (N, H, W, 3) RGB frames as H.264 MP4 (lossless RGB when ``lossless``)."""
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(
            "libx264rgb" if lossless else "libx264", rate=Fraction(fps).limit_denominator(1000)
        )
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        if lossless:
            stream.pix_fmt = "rgb24"
            stream.options = {"crf": "0", "preset": "ultrafast"}
        else:
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "preset": "veryfast"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
