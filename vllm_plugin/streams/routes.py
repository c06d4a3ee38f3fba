"""Stream routes inside ``vllm serve``: an endpoint plugin (``vllm.endpoint_plugins`` → ``dtd_streams``).

Opt-in as vLLM requires: ``VLLM_PLUGINS=dtd,dtd_streams`` (``python -m vllm_plugin.serve
--dtd-streams`` sets it). Routes (all JSON; OpenAPI at ``/docs``):

* ``POST   /v1/streams``                         open a stream (fps, DTD settings, event level, standing question)
* ``POST   /v1/streams/{id}/frames``             append frames (base64 images with timestamps, or a base64 video chunk)
* ``POST   /v1/streams/{id}/chat/completions``   ask at the current point (OpenAI chat-completions shape, ``stream: true`` for SSE)
* ``GET    /v1/streams/{id}/events?after=N``     scene-change events and proactive answers
* ``GET    /v1/streams/{id}``                    status (frames, kept tokens per step, ...)
* ``DELETE /v1/streams/{id}``                    close

Limits (env ``DTD_STREAM_<FIELD>`` for every field of :class:`vllm_plugin.streams.session.Limits`):
a full stream or server, an upload too large or decoding to too many pixels gets a clear 4xx,
never a crash. Several API-server processes: see :mod:`vllm_plugin.streams.forward`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation

from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.streams.forward import FORWARDED, StreamForwarder
from vllm_plugin.media import UPLOAD_FORMATS, MediaTooLarge, VideoDecodeError, decode_image, decode_video_upload
from vllm_plugin.streams.memory import CONTEXT_FRACTION
from vllm_plugin.streams.service import StreamService
from vllm_plugin.streams.session import Stream, StreamError, StreamSettings

logger = logging.getLogger("vllm.dtd_plugin")
router = APIRouter(prefix="/v1/streams", tags=["DTD streams"])
_DEFAULTS = StreamSettings()  # the one place stream defaults are defined


class OpenStreamRequest(BaseModel):
    model: Optional[str] = None
    fps: float = Field(_DEFAULTS.fps, description="frame rate the stream is sampled at (frames without timestamps are spaced 1/fps)")
    dtd_enabled: Optional[bool] = None
    dtd_threshold: Optional[float] = None
    dtd_metric: Optional[str] = None
    dtd_reference: Optional[str] = None
    dtd_criterion: Optional[str] = Field(None, description="'pixel' or 'feature' (the vision tower's outputs, encoded as frames arrive)")
    prefill: str = Field(_DEFAULTS.prefill, description="'eager': frames enter the KV cache as they arrive, a question "
                         "prefills only its own text; 'lazy': the frames since the last question are prefilled with the next")
    event_level: float = Field(_DEFAULTS.event_level, description="kept fraction of a temporal step that signals a scene change")
    standing_question: Optional[str] = Field(None, description="asked automatically at every scene change")
    answer_max_tokens: int = Field(_DEFAULTS.answer_max_tokens, ge=1, le=4096)
    context_tokens: Optional[int] = Field(None, description="the conversation's budget in tokens; reaching it re-anchors "
                                          f"the stream (default: {CONTEXT_FRACTION:g} of the server's max model length)")
    memory_keep: Optional[str] = Field(None, description="what a re-anchor keeps: 'recent' (the latest chunks) or "
                                       f"'recent+keyframes' (plus scene-change steps); default {_DEFAULTS.memory.keep!r}")
    max_keyframes: Optional[int] = Field(None, description=f"keyframes a re-anchor keeps at most (default {_DEFAULTS.memory.max_keyframes})")
    keep_turns: Optional[int] = Field(None, description="past questions and answers a re-anchor keeps, as text "
                                      f"(default {_DEFAULTS.memory.keep_turns})")


class FrameIn(BaseModel):
    image: str = Field(..., description="base64 JPEG/PNG/WebP")
    timestamp: Optional[float] = Field(None, description="seconds since the stream started")


class AppendFramesRequest(BaseModel):
    frames: Optional[list[FrameIn]] = None
    video: Optional[str] = Field(None, description="base64 video chunk, sampled at the stream's fps; containers: "
                                 + "; ".join(UPLOAD_FORMATS.values()))
    start_time: Optional[float] = Field(None, description="stream time of the video chunk's first frame")


class StreamChatRequest(BaseModel):
    messages: list[dict[str, Any]]
    model: Optional[str] = None
    max_tokens: int = Field(64, ge=1, description="answer budget; more than the model's context left is a 400")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    ignore_eos: bool = Field(False, description="keep generating past end-of-text, as vLLM's own ignore_eos (benchmarks, tests)")
    return_token_ids: bool = Field(False, description="add prompt/completion token ids to stream_state")
    remember: bool = Field(True, description="false: this question and its answer do not stay in the stream's "
                           "conversation; later questions see the same frames but not this turn (independent "
                           "questions, as benchmarks ask them)")


def _error(status: int, message: str) -> JSONResponse:
    kind = {404: "NotFoundError", 409: "ConflictError", 413: "PayloadTooLargeError", 429: "TooManyRequestsError",
            503: "ServiceUnavailableError"}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind.get(status, "BadRequestError"), "code": status}},
                        status_code=status, headers=headers)


def _b64(data: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise StreamError(f"upload larger than {limit} bytes", 413)
    try:
        if data.startswith("data:"):
            if "," not in data:
                raise StreamError("a data: URI needs a comma before its base64 payload")
            data = data.split(",", 1)[1]
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise StreamError("not valid base64") from None


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
            raise StreamError("stream questions are text; the video comes from the stream's frames")
    raise StreamError("messages must contain a user message")


def _service(request: Request) -> StreamService:
    svc = getattr(request.app.state, "dtd_streams", None)
    if svc is None:
        raise StreamError("stream routes are not initialized", 503)
    return svc


def _decode_append(svc: StreamService, stream: Stream, body: AppendFramesRequest):
    lim = svc.manager.limits
    if (body.frames is None) == (body.video is None):
        raise StreamError("give either frames or video")
    if body.frames is not None:
        if not body.frames:
            raise StreamError("frames is empty")
        if len(body.frames) > lim.max_frames_per_append:
            raise StreamError(f"at most {lim.max_frames_per_append} frames per append", 413)
        frames, stamps, budget = [], [], lim.max_upload_bytes
        for i, f in enumerate(body.frames):
            raw = _b64(f.image, budget)
            budget -= len(raw)
            try:  # one full-size frame in memory at a time
                frames.append(stream.fit(decode_image(raw, max_pixels=lim.max_frame_pixels)))
            except MediaTooLarge as e:
                raise StreamError(f"frames[{i}]: {e}", 413) from None
            except ValueError as e:
                raise StreamError(f"frames[{i}]: {e}") from None
            stamps.append(f.timestamp)
        if any(t is None for t in stamps) and not all(t is None for t in stamps):
            raise StreamError("give a timestamp for every frame or for none")
        return frames, (None if stamps[0] is None else stamps)
    raw = _b64(body.video, lim.max_upload_bytes)
    try:
        frames, times = decode_video_upload(raw, stream.settings.fps, stream.fit, lim.max_frames_per_append,
                                            lim.max_frame_pixels, lim.max_decoded_pixels)
    except MediaTooLarge as e:
        raise StreamError(f"video: {e}", 413) from None
    except (VideoDecodeError, ValueError) as e:
        raise StreamError(f"video: {e}") from None
    if body.start_time is None:
        return frames, None
    return frames, [body.start_time + float(t) for t in times]


async def _guard(coro):
    try:
        return await coro
    except StreamError as e:
        return _error(e.status, str(e))
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
        except StreamError as e:  # this process holds its share of streams: another may have room
            if e.status != 429 or request.headers.get(FORWARDED.decode()) is not None:
                raise
            moved = await svc.peers.open_elsewhere(request.headers, await request.body())
            if moved is None:
                raise StreamError(f"too many open streams (at most {svc.manager.limits.max_streams * svc.peers.count})", 429) from None
            return JSONResponse(moved.json(), status_code=moved.status_code)
        return JSONResponse(svc.status(stream))
    return await _guard(run())


@router.post("/{stream_id}/frames", summary="Append frames or a video chunk")
async def append_frames(stream_id: str, body: AppendFramesRequest, request: Request):
    async def run():
        svc = _service(request)
        stream = svc.manager.get(stream_id)
        stream.admit_append()
        frames, stamps = await asyncio.to_thread(_decode_append, svc, stream, body)
        try:
            added = await asyncio.to_thread(stream.add_frames, frames, stamps)
        except StreamError as e:
            if e.status == 429:  # held frames: free what a re-anchor can, the retry then fits
                svc.relieve(stream)
            raise
        svc.after_append(stream)
        events = added["events"]
        if events and stream.settings.standing_question:
            task = asyncio.get_running_loop().create_task(svc.proactive(stream, events))
            svc.tasks.add(task)  # keep a reference until done
            task.add_done_callback(svc.tasks.discard)
        return JSONResponse({"frames": len(stream.frames), "steps": stream.steps, "events": events,
                             "kept_per_step": added["kept_per_step"]})
    return await _guard(run())


@router.post("/{stream_id}/chat/completions", summary="Ask at the current point of the stream")
@with_cancellation  # a client that hangs up aborts its question, as on vLLM's own routes
@load_aware_call  # counted in vLLM's server load (--enable-server-load-tracking), as its own routes
async def ask(stream_id: str, body: StreamChatRequest, raw_request: Request):
    request = raw_request

    async def run():
        svc = _service(request)
        svc.check_model(body.model)
        stream = svc.manager.get(stream_id)
        question = _question(body.messages)
        if not body.stream:
            return JSONResponse(await svc.answer(stream, question, body.max_tokens, body.temperature, body.return_token_ids,
                                                 body.ignore_eos, body.remember))
        events = await svc.answer_sse(stream, question, body.max_tokens, body.temperature, body.ignore_eos, body.remember)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _guard(run())


@router.get("/{stream_id}/events", summary="Scene-change events and proactive answers")
async def events(stream_id: str, request: Request, after: int = -1):
    async def run():
        stream = _service(request).manager.get(stream_id)
        new = [e for e in stream.events if e["index"] > after]
        return JSONResponse({"events": new, "next": stream.events[-1]["index"] if stream.events else -1})
    return await _guard(run())


@router.get("/{stream_id}", summary="Stream status")
async def status(stream_id: str, request: Request):
    async def run():
        svc = _service(request)
        return JSONResponse(svc.status(svc.manager.get(stream_id)))
    return await _guard(run())


@router.delete("/{stream_id}", summary="Close a stream")
async def close(stream_id: str, request: Request):
    async def run():
        await asyncio.to_thread(_service(request).manager.close, stream_id)  # may wait for an append's lock
        return JSONResponse({"id": stream_id, "closed": True})
    return await _guard(run())


class DTDStreamPlugin:
    """``vllm.endpoint_plugins`` entry point (see ``vllm/plugins/endpoint_plugins/interface.py``)."""

    name = "dtd_streams"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        vllm_patches.apply("stream routes")  # the API server's process: bad videos -> 400, dtd_* keys accepted
        app.include_router(router)
        app.add_middleware(StreamForwarder)  # several API-server processes: requests reach the stream's owner
        self.app = app

    async def init_state(self, engine_client, state, args) -> None:
        svc = state.dtd_streams = StreamService(engine_client, args)
        if svc.server_dtd.get("dtd_criterion") == "feature" and svc.server_dtd.get("dtd_enabled", True):
            await asyncio.to_thread(svc.encoder)  # the server's default criterion: load the tower at start
        if svc.peers.count > 1:
            await svc.peers.serve(self.app)
        task = asyncio.get_running_loop().create_task(svc.reap(min(30.0, max(0.05, svc.manager.limits.idle_seconds / 4))))
        svc.tasks.add(task)
        logger.info("DTD stream routes ready at /v1/streams (limits %s)", svc.manager.limits)
