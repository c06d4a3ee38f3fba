"""A stream's events (scene changes, proactive answers, re-anchors, dropped frames, errors) and
the scene-change signal they start from. No vLLM import."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator


class EventLog:
    """The latest ``max_events`` events of a stream, each numbered (``index``: numbers stay when old
    events go). Appends and the event loop both add: thread-safe.

    The scene-change signal: a step's kept fraction rising to ``event_level`` or above, from below
    (:meth:`scene_change`; never the first step, never with DTD off, where nothing is dropped)."""

    def __init__(self, max_events: int = 1024, event_level: float = 0.5, enabled: bool = True):
        self.max_events = max_events
        self.event_level = event_level
        self.enabled = enabled
        self._events: list[dict] = []
        self._count = 0
        self._above = False
        self._lock = threading.Lock()

    def scene_change(self, step: int, kept_fraction: float) -> bool:
        """Temporal step ``step`` kept this fraction of its tokens: is it a scene change? (Steps come
        in order, each once.)"""
        with self._lock:
            change = self.enabled and step >= 1 and kept_fraction >= self.event_level and not self._above
            self._above = kept_fraction >= self.event_level if step >= 1 else False
            return change

    def add(self, event: dict) -> dict:
        """Record ``event``; returns it with its ``index``."""
        with self._lock:
            event = {"index": self._count, **event}
            self._count += 1
            self._events.append(event)
            if len(self._events) > self.max_events:
                del self._events[: len(self._events) - self.max_events]
            return event

    def after(self, index: int) -> list[dict]:
        """The events kept whose index is above ``index``."""
        with self._lock:
            return [e for e in self._events if e["index"] > index]

    @property
    def count(self) -> int:
        """Events recorded since the stream opened (kept or not)."""
        return self._count

    @property
    def last_index(self) -> int:
        """The index of the latest event (-1: none yet)."""
        with self._lock:
            return self._events[-1]["index"] if self._events else -1

    def __iter__(self) -> Iterator[dict]:
        with self._lock:
            return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def __getitem__(self, i):
        with self._lock:
            return self._events[i]


class RateLimiter:
    """At most ``per_second`` calls of :meth:`admit` in any second (thread-safe)."""

    def __init__(self, per_second: float):
        self.per_second = per_second
        self._times: deque = deque()
        self._lock = threading.Lock()

    def admit(self, now: float) -> bool:
        """Take a place at time ``now`` (seconds, monotonic); False when the last second is full."""
        with self._lock:
            while self._times and now - self._times[0] > 1.0:
                self._times.popleft()
            if len(self._times) >= self.per_second:
                return False
            self._times.append(now)
            return True
