"""What a stream holds and what it costs: its frames (resized once, on arrival), their times, the
per-step results of its DTD decision (keep masks, kept counts, kept encoder outputs), and the bytes
all of it takes against the stream's cap and the server's (:class:`ByteAccount`). No vLLM import.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from vllm_plugin.errors import InvalidRequest, RateLimited, StreamFull
from vllm_plugin.media import resize_frame


class ByteAccount:
    """Decoded frame bytes held by all streams of one process, against ``limits.max_total_bytes``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.held + n > self.limit:
                raise RateLimited(
                    f"the server holds {self.held} bytes of stream frames and allows at most "
                    f"{self.limit}: retry when streams have closed"
                )
            self.held += n

    def release(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FrameStore:
    """Frames and per-step data of one stream, and their bytes.

    Args:
        geometry: the served sizing (:class:`vllm_plugin.streams.session.Geometry`).
        max_bytes: bytes the stream may hold (frames and kept encoder outputs).
        account: the server-wide :class:`ByteAccount` (None: none).

    Lists indexed by frame (``frames``, ``timestamps``) and by temporal step (``step_masks``,
    ``kept_per_step``; feature criterion: ``step_embeds``, the kept encoder outputs, and
    ``step_first``, the first token's row, served for a chunk that keeps none). A freed frame or
    step is ``None`` in them; times and kept counts stay. Appends are serialized by the stream;
    :meth:`free` may run beside an append (it touches only frames the append does not)."""

    def __init__(self, geometry, max_bytes: int, account: ByteAccount | None = None):
        self.geometry = geometry
        self.temporal_patch_size = geometry.temporal_patch_size
        self.max_bytes = max_bytes
        self.account = account
        self.size: tuple[int, int] | None = None  # (height, width) after resizing
        self.frames: list[np.ndarray | None] = []
        self.timestamps: list[float] = []
        self.step_masks: list[torch.Tensor | None] = []  # bool (H, W) per temporal step: decided once, served as is
        self.step_embeds: list[torch.Tensor | None] = []
        self.step_first: list[torch.Tensor | None] = []
        self.kept_per_step: list[int] = []
        self.tokens_per_step = 0
        self.nbytes = 0
        self.evicted_frames = 0
        self._lock = threading.Lock()  # the byte counts and the account
        self._size_lock = threading.Lock()

    # -- frames -----------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Complete temporal steps received."""
        return len(self.frames) // self.temporal_patch_size

    @property
    def held_frames(self) -> int:
        return len(self.frames) - self.evicted_frames

    def fit(self, frame: np.ndarray) -> np.ndarray:
        """One frame resized to the stream's size (set by its first frame)."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InvalidRequest(f"a frame must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}", "frames")
        if self.size is None:
            with self._size_lock:  # concurrent first appends agree on one size
                if self.size is None:
                    self.size = self.geometry.target_size(*frame.shape[:2])
        return resize_frame(frame, *self.size)

    def check(
        self, frames: Sequence[np.ndarray], timestamps: Sequence[float] | None, fps: float
    ) -> tuple[int, list[float]]:
        """Whether resized ``frames`` stamped ``timestamps`` (None: spaced ``1/fps`` after the last)
        may be added: (their bytes, their times), or the error; nothing changes."""
        add_bytes = sum(f.nbytes for f in frames)
        if self.nbytes + add_bytes > self.max_bytes:
            raise StreamFull(f"stream is full: at most {self.max_bytes} bytes of frames")
        last = self.timestamps[-1] if self.timestamps else -1.0 / fps
        if timestamps is None:
            timestamps = [last + (i + 1) / fps for i in range(len(frames))]
        if len(timestamps) != len(frames) or any(not math.isfinite(t) for t in timestamps):
            raise InvalidRequest("timestamps must be finite numbers, one per frame", "timestamps")
        if any(b <= a for a, b in zip([last, *timestamps], timestamps)):
            raise InvalidRequest("timestamps must increase", "timestamps")
        return add_bytes, [float(t) for t in timestamps]

    def add(self, frames: Sequence[np.ndarray], timestamps: Sequence[float], add_bytes: int) -> None:
        """Add what :meth:`check` accepted; the server's account first (raises before anything is added)."""
        if self.account is not None:
            self.account.reserve(add_bytes)
        self.frames.extend(frames)
        self.timestamps.extend(timestamps)
        self._count(add_bytes)

    def take_back(self, count: int, add_bytes: int) -> None:
        """Undo the last :meth:`add` (``count`` frames of ``add_bytes`` bytes)."""
        del self.frames[-count:], self.timestamps[-count:]
        self._count(-add_bytes)
        with self._lock:
            if self.account is not None:
                self.account.release(add_bytes)

    def _count(self, n: int) -> None:
        with self._lock:
            self.nbytes += n

    # -- per-step results --------------------------------------------------------------------------
    def add_outputs(self, embeds: list[torch.Tensor], firsts: list[torch.Tensor]) -> None:
        """Hold the kept encoder outputs of new steps, as frames are held: against the stream's and the
        server's byte caps (raises before anything is held)."""
        extra = sum(_nbytes(e) for e in embeds + firsts)
        if self.nbytes + extra > self.max_bytes:
            raise StreamFull(f"stream is full: at most {self.max_bytes} bytes of frames and kept encoder outputs")
        if self.account is not None:
            self.account.reserve(extra)
        self._count(extra)
        self.step_embeds += embeds
        self.step_first += firsts

    def add_masks(self, mask: torch.Tensor) -> list[int]:
        """Record the keep masks, bool (steps, H, W), of new steps; their kept counts. The counts are
        recorded by :meth:`add_kept`, after: a step with a count is a step a chunk may take."""
        self.tokens_per_step = int(mask[0].numel())
        self.step_masks.extend(mask.unbind(0))
        return [int(k) for k in mask.reshape(mask.shape[0], -1).sum(1).tolist()]

    def take_back_steps(self, steps: int) -> None:
        """Undo :meth:`add_outputs` / :meth:`add_masks` back to ``steps`` steps (an append whose analysis
        failed after they were recorded: a memory policy that raised), the bytes with them."""
        freed = 0
        while len(self.step_embeds) > steps:
            for t in (self.step_embeds.pop(), self.step_first.pop()):
                freed += 0 if t is None else _nbytes(t)
        del self.step_masks[steps:]
        if freed:
            self._count(-freed)
            with self._lock:
                if self.account is not None:
                    self.account.release(freed)

    def add_kept(self, kept: Sequence[int]) -> None:
        self.kept_per_step.extend(kept)

    # -- freeing ----------------------------------------------------------------------------------
    def free(self, frames: Sequence[int]) -> list[int]:
        """Free these frames and the per-step data of the steps left with no frame (pixels, keep
        masks, kept encoder outputs); the byte counts follow. Returns the steps freed."""
        tps = self.temporal_patch_size
        freed, steps = 0, []
        for i in frames:
            f = self.frames[i]
            if f is not None:
                freed += f.nbytes
                self.frames[i] = None
                self.evicted_frames += 1
        for s in sorted({i // tps for i in frames}):
            if self.step_masks[s] is not None and all(f is None for f in self.frames[s * tps : (s + 1) * tps]):
                self.step_masks[s] = None
                steps.append(s)
                if s < len(self.step_embeds) and self.step_embeds[s] is not None:
                    freed += _nbytes(self.step_embeds[s]) + _nbytes(self.step_first[s])
                    self.step_embeds[s] = self.step_first[s] = None
        with self._lock:  # with release(): a close meanwhile releases exactly what is left
            self.nbytes -= freed
            if self.account is not None:
                self.account.release(freed)
        return steps

    def release(self) -> None:
        """Give the stream's bytes back to the server-wide account (closed or expired)."""
        with self._lock:
            if self.account is not None:
                self.account.release(self.nbytes)
                self.account = None
