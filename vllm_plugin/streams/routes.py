"""Stream routes inside ``vllm serve``: an endpoint plugin (``vllm.endpoint_plugins`` → ``dtd_streams``).

Opt-in as vLLM requires: ``VLLM_PLUGINS=dtd,dtd_streams`` (``python -m vllm_plugin.serve
--dtd-streams`` sets it). Routes (all JSON; OpenAPI at ``/docs``):

* ``POST   /v1/streams``                         open a stream (fps, DTD settings, event level, standing question)
* ``POST   /v1/streams/{id}/frames``             append frames (base64 images with timestamps, or a base64 video chunk)
* ``POST   /v1/streams/{id}/chat/completions``   ask at the current point (OpenAI chat-completions shape,
  ``stream: true`` for SSE)
* ``GET    /v1/streams/{id}/events?after=N``     scene-change events and proactive answers
* ``GET    /v1/streams/{id}``                    status (frames, kept tokens per step, ...)
* ``DELETE /v1/streams/{id}``                    close
* ``WS     /v1/realtime``                        the same streams over OpenAI's Realtime API (:mod:`.realtime`)

Limits (env ``DTD_STREAM_<FIELD>`` for every field of :class:`vllm_plugin.streams.session.Limits`):
a full stream or server, an upload too large or decoding to too many pixels gets a clear 4xx,
never a crash. Several API-server processes: see :mod:`vllm_plugin.streams.forward`.

This module is the only one that speaks HTTP: the service and the streams raise the plugin's own
errors (:mod:`vllm_plugin.errors`) and :data:`HTTP_STATUS` gives each its status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import typing
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, create_model
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation

from vllm_plugin.core import DTDConfig
from vllm_plugin.core.config import OPTION_PREFIX
from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.errors import (
    DTDError,
    InvalidRequest,
    NotFound,
    RateLimited,
    StreamFull,
    TooLarge,
    TooManyStreams,
    Unavailable,
)
from vllm_plugin.media import UPLOAD_FORMATS, MediaTooLarge, VideoDecodeError, decode_image, decode_video_upload
from vllm_plugin.streams.forward import FORWARDED, StreamForwarder
from vllm_plugin.streams.memory import CONTEXT_FRACTION, policy_names
from vllm_plugin.streams.service import StreamService
from vllm_plugin.streams.session import Stream, StreamSettings

logger = logging.getLogger("vllm.dtd_plugin")
router = APIRouter(prefix="/v1/streams", tags=["DTD streams"])
_DEFAULTS = StreamSettings()  # the one place stream defaults are defined
_MEMORY = _DEFAULTS.memory.as_dict()

# the HTTP status of each of the plugin's errors (a subclass takes its nearest listed base's)
HTTP_STATUS: dict[type, int] = {
    InvalidRequest: 400,
    NotFound: 404,
    StreamFull: 409,
    TooLarge: 413,
    RateLimited: 429,
    Unavailable: 503,
    DTDError: 400,
}
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "PayloadTooLargeError",
    429: "TooManyRequestsError",
    503: "ServiceUnavailableError",
}


def http_status(error: BaseException) -> int:
    """The status a route answers ``error`` with: :data:`HTTP_STATUS` for the plugin's errors, 400 for
    any other ``ValueError`` (processing and validation in vLLM: too long a prompt, bad media), 500
    otherwise."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400 if isinstance(error, ValueError) else 500


# the DTD options of an open request: DTDConfig's request options (dtd_enabled, dtd_threshold, dtd_metric,
# dtd_reference, dtd_criterion, dtd_drop_ratio), typed as DTDConfig's fields (pydantic coerces "0.1" as it
# always did), absent = the server's default; DTDConfig validates the values
_DTD_FIELDS: dict[str, Any] = {  # pydantic field definitions: (type, FieldInfo)
    OPTION_PREFIX + name: (
        hint | None,
        Field(None, description=f"as in mm_processor_kwargs (vllm_plugin.core.DTDConfig.{name})"),
    )
    for name, hint in typing.get_type_hints(DTDConfig).items()
}
DTDOptions = create_model("DTDOptions", **_DTD_FIELDS)


class OpenStreamRequest(DTDOptions):  # type: ignore[misc,valid-type]  # a model pydantic builds at import
    model: str | None = None
    fps: float = Field(
        _DEFAULTS.fps, description="frame rate the stream is sampled at (frames without timestamps are spaced 1/fps)"
    )
    prefill: str = Field(
        _DEFAULTS.prefill,
        description="'eager': frames enter the KV cache as they arrive, a question "
        "prefills only its own text; 'lazy': the frames since the last question are prefilled with the next",
    )
    event_level: float = Field(
        _DEFAULTS.event_level, description="kept fraction of a temporal step that signals a scene change"
    )
    standing_question: str | None = Field(None, description="asked automatically at every scene change")
    instructions: str | None = Field(
        None, description="a system message before every turn of the conversation (None: the chat template's default)"
    )
    answer_max_tokens: int = Field(_DEFAULTS.answer_max_tokens, ge=1, le=4096)
    memory: dict[str, Any] | None = Field(
        None,
        description="the memory policy: 'keep' (the policy: "
        f"{', '.join(repr(n) for n in policy_names())}; default {_MEMORY['keep']!r}), "
        "its own options (recent+keyframes: 'max_keyframes'), and 'context_tokens', "
        "'keep_turns', 'anchor_fraction'; each validated by its owner",
    )
    context_tokens: int | None = Field(
        None,
        description="memory.context_tokens: the conversation's budget in tokens; "
        f"reaching it re-anchors the stream (default: {CONTEXT_FRACTION:g} of the "
        "server's max model length)",
    )
    memory_keep: str | None = Field(
        None,
        description="memory.keep: what a re-anchor keeps: 'recent' (the latest "
        f"chunks) or 'recent+keyframes' (plus scene-change steps); default {_MEMORY['keep']!r}",
    )
    max_keyframes: int | None = Field(
        None,
        description=f"memory.max_keyframes: keyframes a re-anchor keeps at most (default {_MEMORY['max_keyframes']})",
    )
    keep_turns: int | None = Field(
        None,
        description="memory.keep_turns: past questions and answers a re-anchor keeps, "
        f"as text (default {_MEMORY['keep_turns']})",
    )


class FrameIn(BaseModel):
    image: str = Field(..., description="base64 JPEG/PNG/WebP")
    timestamp: float | None = Field(None, description="seconds since the stream started")


class AppendFramesRequest(BaseModel):
    frames: list[FrameIn] | None = None
    video: str | None = Field(
        None,
        description="base64 video chunk, sampled at the stream's fps; containers: "
        + "; ".join(UPLOAD_FORMATS.values()),
    )
    start_time: float | None = Field(None, description="stream time of the video chunk's first frame")


class StreamChatRequest(BaseModel):
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int = Field(64, ge=1, description="answer budget; more than the model's context left is a 400")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    ignore_eos: bool = Field(
        False, description="keep generating past end-of-text, as vLLM's own ignore_eos (benchmarks, tests)"
    )
    return_token_ids: bool = Field(False, description="add prompt/completion token ids to stream_state")
    remember: bool = Field(
        True,
        description="false: this question and its answer do not stay in the stream's "
        "conversation; later questions see the same frames but not this turn (independent "
        "questions, as benchmarks ask them)",
    )


def _error(status: int, message: str, retry_after_s: float = 1.0) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if status in (429, 503) else None
    return JSONResponse(
        {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"), "code": status}},
        status_code=status,
        headers=headers,
    )


def _b64(data: str, limit: int, field: str | None = None) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise TooLarge(f"upload larger than {limit} bytes")
    if data.startswith("data:"):
        if "," not in data:
            raise InvalidRequest("a data: URI needs a comma before its base64 payload", field)
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("not valid base64", field) from None


def _question(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                texts = [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
                if len(texts) == len(c):
                    return "".join(texts)
            raise InvalidRequest("stream questions are text; the video comes from the stream's frames", "messages")
    raise InvalidRequest("messages must contain a user message", "messages")


def _service(request: Request) -> StreamService:
    svc = getattr(request.app.state, "dtd_streams", None)
    if svc is None:
        raise Unavailable("stream routes are not initialized")
    return svc


def decode_append(svc: StreamService, stream: Stream, body: AppendFramesRequest):
    lim = svc.manager.limits
    if (body.frames is None) == (body.video is None):
        raise InvalidRequest("give either frames or video")
    if body.frames is not None:
        if not body.frames:
            raise InvalidRequest("frames is empty", "frames")
        if len(body.frames) > lim.max_frames_per_append:
            raise TooLarge(f"at most {lim.max_frames_per_append} frames per append")
        frames, stamps, budget = [], [], lim.max_upload_bytes
        for i, f in enumerate(body.frames):
            raw = _b64(f.image, budget, f"frames[{i}]")
            budget -= len(raw)
            try:  # one full-size frame in memory at a time
                frames.append(stream.fit(decode_image(raw, max_pixels=lim.max_frame_pixels)))
            except DTDError:  # the stream's own answer (a frame size it cannot use)
                raise
            except MediaTooLarge as e:
                raise TooLarge(f"frames[{i}]: {e}") from None
            except ValueError as e:
                raise InvalidRequest(f"frames[{i}]: {e}", f"frames[{i}]") from None
            stamps.append(f.timestamp)
        if any(t is None for t in stamps) and not all(t is None for t in stamps):
            raise InvalidRequest("give a timestamp for every frame or for none", "frames")
        return frames, (None if stamps[0] is None else stamps)
    raw = _b64(body.video or "", lim.max_upload_bytes, "video")  # (given: frames were not)
    try:
        frames, times = decode_video_upload(
            raw,
            stream.settings.fps,
            stream.fit,
            lim.max_frames_per_append,
            lim.max_frame_pixels,
            lim.max_decoded_pixels,
        )
    except DTDError:
        raise
    except MediaTooLarge as e:
        raise TooLarge(f"video: {e}") from None
    except (VideoDecodeError, ValueError) as e:
        raise InvalidRequest(f"video: {e}", "video") from None
    if body.start_time is None:
        return frames, None
    return frames, [body.start_time + float(t) for t in times]


async def _guard(coro):
    try:
        return await coro
    except DTDError as e:
        return _error(http_status(e), str(e), getattr(e, "retry_after_s", 1.0))
    except ValueError as e:  # processing / validation in vLLM (too long a prompt, bad media, ...)
        return _error(400, str(e))


@router.post("", summary="Open a stream")
async def open_stream(body: OpenStreamRequest, request: Request):
    async def run():
        svc = _service(request)
        svc.check_model(body.model)
        settings = svc.settings(body)
        if settings.dtd.enabled and settings.dtd.criterion == "feature":
            await asyncio.to_thread(svc.encoder)  # the vision tower loads once, off the event loop
        try:
            stream = svc.open(settings)
        except TooManyStreams:  # this process holds its share of streams: another may have room
            if svc.peers is None or request.headers.get(FORWARDED.decode()) is not None:
                raise
            moved = await svc.peers.open_elsewhere(request.headers, await request.body())
            if moved is None:
                raise TooManyStreams(
                    f"too many open streams (at most {svc.manager.limits.max_streams * svc.peers.count})"
                ) from None
            return JSONResponse(moved.json(), status_code=moved.status_code)
        return JSONResponse(svc.status(stream))

    return await _guard(run())


@router.post("/{stream_id}/frames", summary="Append frames or a video chunk")
async def append_frames(stream_id: str, body: AppendFramesRequest, request: Request):
    async def run():
        svc = _service(request)
        stream = svc.get(stream_id)
        stream.admit_append()
        frames, stamps = await asyncio.to_thread(decode_append, svc, stream, body)
        return JSONResponse(await svc.append(stream, frames, stamps))

    return await _guard(run())


@router.post("/{stream_id}/chat/completions", summary="Ask at the current point of the stream")
@with_cancellation  # a client that hangs up aborts its question, as on vLLM's own routes
@load_aware_call  # counted in vLLM's server load (--enable-server-load-tracking), as its own routes
async def ask(stream_id: str, body: StreamChatRequest, raw_request: Request):
    request = raw_request

    async def run():
        svc = _service(request)
        svc.check_model(body.model)
        stream = svc.get(stream_id)
        question = _question(body.messages)
        if not body.stream:
            return JSONResponse(
                await svc.answer(
                    stream,
                    question,
                    body.max_tokens,
                    body.temperature,
                    body.return_token_ids,
                    body.ignore_eos,
                    body.remember,
                )
            )
        events = await svc.answer_sse(
            stream, question, body.max_tokens, body.temperature, body.ignore_eos, body.remember
        )
        return StreamingResponse(events, media_type="text/event-stream")

    return await _guard(run())


@router.get("/{stream_id}/events", summary="Scene-change events and proactive answers")
async def events(stream_id: str, request: Request, after: int = -1):
    async def run():
        stream = _service(request).get(stream_id)
        return JSONResponse({"events": stream.events.after(after), "next": stream.events.last_index})

    return await _guard(run())


@router.get("/{stream_id}", summary="Stream status")
async def status(stream_id: str, request: Request):
    async def run():
        svc = _service(request)
        return JSONResponse(svc.status(svc.get(stream_id)))

    return await _guard(run())


@router.delete("/{stream_id}", summary="Close a stream")
async def close(stream_id: str, request: Request):
    async def run():
        await _service(request).close(stream_id)
        return JSONResponse({"id": stream_id, "closed": True})

    return await _guard(run())


class DTDStreamPlugin:
    """``vllm.endpoint_plugins`` entry point (see ``vllm/plugins/endpoint_plugins/interface.py``)."""

    name = "dtd_streams"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        vllm_patches.apply("stream routes")  # the API server's process: bad videos -> 400, dtd_* keys accepted
        app.include_router(router)
        from vllm_plugin.streams import realtime  # it builds on this module's models and error table

        realtime.attach(app)
        app.add_middleware(StreamForwarder)  # several API-server processes: requests reach the stream's owner
        self.app = app

    async def init_state(self, engine_client, state, args) -> None:
        svc = state.dtd_streams = StreamService.from_vllm(engine_client, args)
        server_dtd = svc.engine.server_dtd
        if server_dtd.get("dtd_criterion") == "feature" and server_dtd.get("dtd_enabled", True):
            await asyncio.to_thread(svc.encoder)  # the server's default criterion: load the tower at start
        if svc.peers is not None and svc.peers.count > 1:
            await svc.peers.serve(self.app)
        task = asyncio.get_running_loop().create_task(
            svc.reap(min(30.0, max(0.05, svc.manager.limits.idle_seconds / 4)))
        )
        svc.tasks.add(task)
        logger.info("DTD stream routes ready at /v1/streams (limits %s)", svc.manager.limits)
