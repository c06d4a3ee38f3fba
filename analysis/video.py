"""Video decoding (PyAV) at a chosen frame rate, and writing clips (for the synthetic generator)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_VIDEO = ASSETS / "moviepy_airplane.mp4"


class VideoDecodeError(ValueError):
    """The file is missing, not a video, corrupt, or has no frames."""


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


def sample_times(duration: float, fps: float) -> np.ndarray:
    """Times k / fps for k = 0, 1, ... strictly before ``duration``."""
    n = max(1, int(np.floor(duration * fps + 1e-9)))
    return np.arange(n) / fps


def load_video(
    path: str | os.PathLike,
    fps: float | None = 1.0,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> Video:
    """Decode ``path`` with PyAV and keep, for every time k/fps, the first frame at or after it.

    ``fps=None`` keeps every decoded frame. ``start``/``end`` (seconds) cut a window; timestamps in
    the result are relative to ``start``. Raises :class:`VideoDecodeError` for unreadable input.
    """
    import av

    path = str(path)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not Path(path).is_file():
        raise VideoDecodeError(f"no such video file: {path}")
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path} has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            next_t = start
            last_t = start
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
                    if fps is not None:
                        # next sampling instant after t (skip instants with no frame of their own)
                        next_t = start + (np.floor((t - start) * fps + 1e-6) + 1) / fps
                    if max_frames is not None and len(frames) >= max_frames:
                        break
    except av.error.FFmpegError as e:  # corrupt / truncated / not a video
        raise VideoDecodeError(f"cannot decode {path}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"{path} has no decodable frames")
    duration = (last_t - start) + 1.0 / source_fps
    return Video(
        frames=np.stack(frames),
        timestamps=np.asarray(times, dtype=np.float64),
        fps=float(fps) if fps is not None else source_fps,
        source_fps=source_fps,
        duration=duration,
        path=path,
    )


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, lossless: bool = True) -> Path:
    """Encode uint8 (N, H, W, 3) RGB frames as H.264 MP4 (lossless RGB when ``lossless``)."""
    import av
    from fractions import Fraction

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=Fraction(fps).limit_denominator(1000))
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
