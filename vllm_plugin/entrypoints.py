"""API-server glue: accept ``dtd_*`` per-request ``mm_processor_kwargs`` and collect DTD stats.

vLLM 0.32 refuses every per-request ``mm_processor_kwargs`` key unless the server runs with
``--trust-request-mm-kwargs`` (they can raise preprocessing cost). The ``dtd_*`` keys only ever
reduce work, so they are validated here (bad value -> HTTP 400 naming the field) and let through,
while every other key keeps vLLM's own rule. vLLM has no extension point for this check, so
:func:`install` wraps ``validate_request_mm_kwargs`` where the online renderer calls it, and the
renderer's preprocessing to look up the DTD stats of the request's videos.

It also guards vLLM's video loading (``VideoMediaIO``): a video the decoder cannot use (one frame,
an image or text sent as a video, a missing file) raises a plain exception inside vLLM's loader,
which the API server answers with HTTP 500. Those become a 400 that says what is wrong with the
``video_url``; the engine never sees the request either way.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from vllm.exceptions import VLLMError, VLLMValidationError

from vllm_plugin import stats
from vllm_plugin.options import dtd_config_from_kwargs, split_dtd_kwargs

logger = logging.getLogger("vllm.dtd_plugin")
_MARK = "_vllm_dtd_wrapped"


def _wrap_validate(original):
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


class VideoInputError(VLLMValidationError, ValueError):
    """A video the request points at is unusable: HTTP 400 in vLLM's error mapping, and still a
    ``ValueError`` for code that catches those."""


def _video_error(e: Exception) -> VideoInputError:
    if isinstance(e, ValueError):
        msg = f"video_url: {e}"
    elif isinstance(e, FileNotFoundError):
        msg = "video_url: no such file"
    elif isinstance(e, (IsADirectoryError, PermissionError)):
        msg = "video_url: not a readable file"
    elif isinstance(e, ZeroDivisionError):  # Qwen2-VL frame sampling with fewer frames than a temporal patch
        msg = "video_url: too few decodable frames (Qwen2.5-VL needs at least 2)"
    else:
        msg = f"video_url: could not decode the video ({type(e).__name__}: {str(e)[:200]})"
    return VideoInputError(msg, parameter="video_url")


_LOADING = threading.local()


def _wrap_media_io(original):
    @functools.wraps(original)
    def load(self, *args, **kwargs):
        outer = not getattr(_LOADING, "active", False)  # load_base64 / load_file call load_bytes
        _LOADING.active = True
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        except (VLLMError, MemoryError):
            raise  # vLLM's own typed errors keep their status; running out of memory is the server's
        except Exception as e:
            raise _video_error(e) from e
        finally:
            if outer:
                _LOADING.active = False
                stats.record_timing(preprocess_s=time.perf_counter() - t0)  # decoding: preprocessing time

    setattr(load, _MARK, True)
    return load


def install() -> None:
    """Idempotent. Only touches the API server's renderer module (other processes skip it cheaply)."""
    try:
        from vllm.renderers import online_renderer
    except Exception:  # an engine/worker process without the API server stack
        return
    if not getattr(online_renderer.validate_request_mm_kwargs, _MARK, False):
        online_renderer.validate_request_mm_kwargs = _wrap_validate(online_renderer.validate_request_mm_kwargs)
    from vllm.multimodal.media.video import VideoMediaIO

    for name in ("load_bytes", "load_base64", "load_file"):
        if not getattr(getattr(VideoMediaIO, name), _MARK, False):
            setattr(VideoMediaIO, name, _wrap_media_io(getattr(VideoMediaIO, name)))
    R = online_renderer.OnlineRenderer
    if not getattr(R.preprocess_chat, _MARK, False):
        R.preprocess_chat = _wrap_preprocess(R.preprocess_chat, lambda r: r[1] if isinstance(r, tuple) else [])
    if not getattr(R.preprocess_cmpl, _MARK, False):
        R.preprocess_cmpl = _wrap_preprocess(R.preprocess_cmpl, lambda r: r if isinstance(r, list) else [])
