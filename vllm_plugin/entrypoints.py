"""API-server glue: accept ``dtd_*`` per-request ``mm_processor_kwargs`` and collect DTD stats.

vLLM 0.32 refuses every per-request ``mm_processor_kwargs`` key unless the server runs with
``--trust-request-mm-kwargs`` (they can raise preprocessing cost). The ``dtd_*`` keys only ever
reduce work, so they are validated here (bad value -> HTTP 400 naming the field) and let through,
while every other key keeps vLLM's own rule. vLLM has no extension point for this check, so
:func:`install` wraps ``validate_request_mm_kwargs`` where the online renderer calls it, and the
renderer's preprocessing to look up the DTD stats of the request's videos.
"""

from __future__ import annotations

import functools
import logging

from vllm_plugin import stats
from vllm_plugin.options import dtd_config_from_kwargs, split_dtd_kwargs

logger = logging.getLogger("vllm.dtd_plugin")
_MARK = "_vllm_dtd_wrapped"


def _wrap_validate(original):
    from vllm.exceptions import VLLMValidationError

    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs):
        dtd, rest = split_dtd_kwargs(mm_processor_kwargs)
        if dtd:
            try:
                dtd_config_from_kwargs(dtd)
            except ValueError as e:
                field = str(e).split(":", 1)[0]
                raise VLLMValidationError(f"mm_processor_kwargs.{e}", parameter=f"mm_processor_kwargs.{field}") from None
        return original(
            mm_processor_kwargs=rest or None,
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    setattr(validate_request_mm_kwargs, _MARK, True)
    return validate_request_mm_kwargs


def _video_hashes(engine_inputs) -> list[str]:
    out = []
    for ei in engine_inputs or []:
        hashes = ei.get("mm_hashes") if isinstance(ei, dict) else None
        if hashes:
            out.extend(hashes.get("video", []) or [])
    return out


def _wrap_preprocess(original, engine_inputs_of):
    @functools.wraps(original)
    async def preprocess(self, *args, **kwargs):
        result = await original(self, *args, **kwargs)
        try:
            stats.collect(_video_hashes(engine_inputs_of(result)))
        except Exception:
            logger.debug("DTD stats collection failed", exc_info=True)
        return result

    setattr(preprocess, _MARK, True)
    return preprocess


def install() -> None:
    """Idempotent. Only touches the API server's renderer module (other processes skip it cheaply)."""
    try:
        from vllm.renderers import online_renderer
    except Exception:  # an engine/worker process without the API server stack
        return
    if not getattr(online_renderer.validate_request_mm_kwargs, _MARK, False):
        online_renderer.validate_request_mm_kwargs = _wrap_validate(online_renderer.validate_request_mm_kwargs)
    R = online_renderer.OnlineRenderer
    if not getattr(R.preprocess_chat, _MARK, False):
        R.preprocess_chat = _wrap_preprocess(R.preprocess_chat, lambda r: r[1] if isinstance(r, tuple) else [])
    if not getattr(R.preprocess_cmpl, _MARK, False):
        R.preprocess_cmpl = _wrap_preprocess(R.preprocess_cmpl, lambda r: r if isinstance(r, list) else [])
