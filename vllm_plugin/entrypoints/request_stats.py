"""Per-request DTD statistics in the API server: log line, response header, Prometheus counters.

The multimodal processor runs in a worker thread of the API server; it records each video's
:class:`~vllm_plugin.core.DTDStats` under the item's multimodal hash. After preprocessing, the request
task looks the hashes of its prompt up (:func:`collect`) and files them for the current request
(a context variable set by :class:`vllm_plugin.entrypoints.middleware.DTDStatsMiddleware`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from vllm_plugin.core import DTDStats

logger = logging.getLogger("vllm.dtd_plugin")  # under "vllm": shown by vLLM's log handler

_LOCK = threading.Lock()
_BY_HASH: OrderedDict[str, tuple[DTDStats, str]] = OrderedDict()
_MAX = 4096

# The list of stats of the request being handled (None outside a request).
REQUEST_STATS: contextvars.ContextVar[list | None] = contextvars.ContextVar("dtd_request_stats", default=None)

_metrics: dict[str, Any] = {}


def record(mm_hash: str, stats: DTDStats, digest: str) -> None:
    with _LOCK:
        _BY_HASH[mm_hash] = (stats, digest)
        _BY_HASH.move_to_end(mm_hash)
        while len(_BY_HASH) > _MAX:
            _BY_HASH.popitem(last=False)


def lookup(mm_hash: str) -> tuple[DTDStats, str] | None:
    with _LOCK:
        return _BY_HASH.get(mm_hash)


def _counters():
    with _LOCK:  # the multimodal processor's thread and the stream encoder's worker both count
        return _make_counters()


def _make_counters():
    if not _metrics:
        from prometheus_client import Counter

        _metrics["in"] = Counter("vllm_dtd_video_tokens_in", "Video tokens before Differential Token Drop")
        _metrics["kept"] = Counter("vllm_dtd_video_tokens_kept", "Video tokens kept by Differential Token Drop")
        _metrics["videos"] = Counter("vllm_dtd_videos", "Video items processed with Differential Token Drop")
        _metrics["decision"] = Counter("vllm_dtd_decision_seconds", "Time spent deciding which video tokens to drop")
        _metrics["preprocess"] = Counter(
            "vllm_dtd_video_preprocess_seconds",
            "Time decoding videos and in the multimodal processor (DTD decision included, the vision tower not)",
        )
        _metrics["encoder_steps"] = Counter(
            "vllm_dtd_encoder_steps",
            "Video temporal steps encoded by the API server's vision tower (feature-level DTD)",
        )
        _metrics["encoder_seconds"] = Counter(
            "vllm_dtd_encoder_seconds", "Time the API server's vision tower spent encoding video (feature-level DTD)"
        )
    return _metrics


def _add(**amounts: float) -> None:
    """Add to the named counters; metrics are best effort, never fail a request."""
    try:
        c = _counters()
        for name, amount in amounts.items():
            c[name].inc(amount)
    except Exception:
        logger.debug("DTD metrics unavailable", exc_info=True)


def record_encoder(steps: int, seconds: float) -> None:
    """Count temporal steps encoded by the API server's vision tower (each is encoded once)."""
    _add(encoder_steps=steps, encoder_seconds=seconds)


def record_timing(decision_s: float = 0.0, preprocess_s: float = 0.0) -> None:
    """Add DTD decision time and video preprocessing time (decoding, processor), in seconds."""
    _add(decision=decision_s, preprocess=preprocess_s)


def collect(mm_hashes: Iterable[str]) -> list[tuple[DTDStats, str]]:
    """File the stats of these video items for the current request, count and log them."""
    found = [entry for h in mm_hashes if (entry := lookup(h)) is not None]
    if not found:
        return found
    holder = REQUEST_STATS.get()
    if holder is not None:
        holder.extend(found)
    try:
        c = _counters()
        for stats, _ in found:
            c["in"].inc(stats.total)
            c["kept"].inc(stats.kept)
            c["videos"].inc()
    except Exception:  # metrics are best effort, never fail a request
        logger.debug("DTD metrics unavailable", exc_info=True)
    for stats, _ in found:
        logger.info(
            "DTD: video tokens kept %d of %d (%.1f%% dropped); kept per temporal step %s",
            stats.kept,
            stats.total,
            100 * stats.drop_ratio,
            list(stats.kept_per_step),
        )
    return found


def header_value(found: list[tuple[DTDStats, str]]) -> str:
    import json

    return json.dumps({"videos": [header_entry(s, d) for s, d in found]}, separators=(",", ":"))


def header_entry(s: DTDStats, digest: str) -> dict:
    """One video of the ``x-dtd-stats`` header: the stats and the mask's digest."""
    return {**s.as_dict(), "mask_sha256": digest}
