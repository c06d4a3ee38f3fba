"""Encode on arrival: the temporal steps of every feature-level stream of one API-server process go
through ONE background worker that batches them into single vision-tower calls.

The queue is bounded in temporal steps (``Limits.max_pending_encode_steps``): an append whose steps
do not fit is refused (:class:`vllm_plugin.errors.RateLimited`, a 429) with a retry hint before
anything of it is kept, so a stream that sends faster than the tower encodes costs a retry, never
unbounded memory. No vLLM import.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from vllm_plugin.errors import RateLimited, TooLarge

logger = logging.getLogger("vllm.dtd_plugin")


class EncodeQueue:
    """Args:
    patchify: frames uint8 (N, h, w, 3), N a multiple of the temporal patch size, already at the
        processor's size -> (pixel_values (patches, dim), grid_thw (3,)) as the served processor
        makes them.
    encode_many: ``[(pixel_values, grid_thw)] -> [features (tokens, hidden)]`` in one tower call
        (:meth:`vllm_plugin.models.vision.VisionTower.encode_many`).
    max_pending_steps: temporal steps queued or being encoded, over all streams.
    max_batch_steps: temporal steps per tower call.
    decision_dim: the leading feature columns DTD compares (None: all; Qwen3-VL: the main output,
        not its DeepStack levels).
    """

    def __init__(
        self,
        patchify: Callable,
        encode_many: Callable,
        max_pending_steps: int,
        max_batch_steps: int = 32,
        retry_after_s: float = 1.0,
        decision_dim: int | None = None,
    ):
        self.patchify = patchify
        self.decision_dim = decision_dim
        self.encode_many = encode_many
        self.max_pending_steps = max_pending_steps
        self.max_batch_steps = max_batch_steps
        self.retry_after_s = retry_after_s
        self.pending = 0  # steps reserved (queued, being encoded, or about to be submitted)
        self.batches = 0  # tower calls made
        self._jobs: list[tuple[np.ndarray, int, Future]] = []
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="dtd-encoder", daemon=True)
        self._worker.start()

    def reserve(self, steps: int) -> None:
        """Take room for ``steps`` temporal steps or raise :class:`RateLimited` (nothing reserved);
        :class:`TooLarge` when they could never fit."""
        if steps > self.max_pending_steps:
            raise TooLarge(
                f"one append completes {steps} temporal steps; the vision encoder's queue holds at most "
                f"{self.max_pending_steps}: send fewer frames per append"
            )
        with self._cv:
            if self.pending + steps > self.max_pending_steps:
                raise RateLimited(
                    f"the vision encoder is behind: {self.pending} temporal steps are waiting to be encoded "
                    f"and at most {self.max_pending_steps} may; retry in {self.retry_after_s:g} s",
                    self.retry_after_s,
                )
            self.pending += steps

    def release(self, steps: int) -> None:
        with self._cv:
            self.pending = max(0, self.pending - steps)

    def submit(self, frames: np.ndarray, steps: int) -> Future:
        """Encode ``steps`` temporal steps (reserved with :meth:`reserve`); the future gives the
        features, float32 (steps * tokens per step, hidden)."""
        per_step = len(frames) // max(1, steps)
        pieces = [
            (frames[a * per_step : (a + k) * per_step], k)
            for a in range(0, steps, self.max_batch_steps)
            for k in [min(self.max_batch_steps, steps - a)]
        ]
        futures: list[Future] = [Future() for _ in pieces]
        with self._cv:  # a job is at most one tower call: an append of many steps is encoded in pieces
            self._jobs.extend((f, k, fut) for (f, k), fut in zip(pieces, futures))
            self._cv.notify()
        if len(futures) == 1:
            return futures[0]
        return _joined(futures)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                batch: list[tuple[np.ndarray, int, Future]] = []
                n = 0
                while self._jobs and (not batch or n + self._jobs[0][1] <= self.max_batch_steps):
                    job = self._jobs.pop(0)
                    batch.append(job)
                    n += job[1]
            try:
                inputs = [self.patchify(frames) for frames, _, _ in batch]
                outs = self.encode_many(inputs)
                self.batches += 1
                for (_, _, fut), out in zip(batch, outs):
                    fut.set_result(out)
            except BaseException as e:  # every waiting append gets the error, the worker lives on
                logger.warning("DTD stream encoder failed: %s", e)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            finally:
                self.release(n)


def _joined(futures: list) -> Future:
    """One future for several: the pieces' features concatenated in order, or the first error."""
    import torch

    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def done(_):
        with lock:
            left[0] -= 1
            if left[0] or out.done():
                return
        try:
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                out.set_exception(errors[0])
            else:
                out.set_result(torch.cat([f.result() for f in futures]))
        except BaseException as e:  # a callback's error would only be logged: the waiting append gets it
            if not out.done():
                out.set_exception(e)

    for f in futures:
        f.add_done_callback(done)
    return out


def processor_patchify(video_processor) -> Callable:
    """``patchify`` through the served HF video processor: stream frames are already at the size the
    served processor gives them (:class:`vllm_plugin.streams.session.Geometry`), so only rescaling,
    normalization and the patch layout are applied, as the processor applies them."""

    def patchify(frames: np.ndarray):
        out = video_processor(videos=[frames], do_sample_frames=False, do_resize=False, return_tensors="pt")
        return out["pixel_values_videos"], out["video_grid_thw"][0]

    return patchify
