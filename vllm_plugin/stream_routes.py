"""Stream routes inside ``vllm serve``: an endpoint plugin (``vllm.endpoint_plugins`` → ``dtd_streams``).

Opt-in as vLLM requires: ``VLLM_PLUGINS=dtd,dtd_streams`` (``python -m vllm_plugin.serve
--dtd-streams`` sets it). Routes (all JSON; OpenAPI at ``/docs``):

* ``POST   /v1/streams``                         open a stream (fps, DTD settings, event level, standing question)
* ``POST   /v1/streams/{id}/frames``             append frames (base64 images with timestamps, or a base64 video chunk)
* ``POST   /v1/streams/{id}/chat/completions``   ask at the current point (OpenAI chat-completions shape, ``stream: true`` for SSE)
* ``GET    /v1/streams/{id}/events?after=N``     scene-change events and proactive answers
* ``GET    /v1/streams/{id}``                    status (frames, kept tokens per step, ...)
* ``DELETE /v1/streams/{id}``                    close

Limits (env ``VLLM_DTD_STREAM_<FIELD>`` for every field of :class:`vllm_plugin.streaming.Limits`):
a full stream or server, an upload too large or decoding to too many pixels gets a clear 4xx,
never a crash. Several API-server processes: see :mod:`vllm_plugin.stream_forward`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import time
import uuid
import zlib
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation

from vllm_plugin.media import UPLOAD_FORMATS, MediaTooLarge, VideoDecodeError, decode_image, decode_video_upload
from vllm_plugin.options import dtd_config_from_kwargs, split_dtd_kwargs
from vllm_plugin.stream_forward import FORWARDED, Peers, StreamForwarder
from vllm_plugin.streaming import Geometry, Limits, Stream, StreamError, StreamManager, StreamSettings

logger = logging.getLogger("vllm.dtd_plugin")
router = APIRouter(prefix="/v1/streams", tags=["DTD streams"])


class OpenStreamRequest(BaseModel):
    model: Optional[str] = None
    fps: float = Field(2.0, description="frame rate the stream is sampled at (frames without timestamps are spaced 1/fps)")
    dtd_enabled: Optional[bool] = None
    dtd_threshold: Optional[float] = None
    dtd_metric: Optional[str] = None
    dtd_reference: Optional[str] = None
    event_level: float = Field(0.5, description="kept fraction of a temporal step that signals a scene change")
    standing_question: Optional[str] = Field(None, description="asked automatically at every scene change")
    answer_max_tokens: int = Field(64, ge=1, le=4096)


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


def _error(status: int, message: str) -> JSONResponse:
    kind = {404: "NotFoundError", 409: "ConflictError", 413: "PayloadTooLargeError", 429: "TooManyRequestsError"}
    return JSONResponse({"error": {"message": message, "type": kind.get(status, "BadRequestError"), "code": status}}, status_code=status)


def _b64(data: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise StreamError(f"upload larger than {limit} bytes", 413)
    try:
        return base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
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


class StreamService:
    def __init__(self, engine_client, args):
        from transformers import AutoProcessor

        self.engine = engine_client
        self.tasks: set = set()
        self.model = args.model
        self.max_model_len = getattr(getattr(engine_client, "model_config", None), "max_model_len", None)
        names = getattr(args, "served_model_name", None) or [args.model]
        self.served_names = [names] if isinstance(names, str) else list(names)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))
        self.tokenizer = processor.tokenizer
        raw = getattr(args, "mm_processor_kwargs", None) or {}
        self.server_dtd, server_rest = split_dtd_kwargs(json.loads(raw) if isinstance(raw, str) else dict(raw))
        # API-server processes (vLLM sets both in each process it starts; one process: 1 and 0)
        pc = engine_client.vllm_config.parallel_config
        count = max(1, int(getattr(pc, "_api_process_count", 1) or 1))
        index = max(0, int(getattr(pc, "_api_process_rank", 0) or 0))
        limits = Limits.from_env(os.environ).per_process(count)
        geometry = Geometry.from_video_processor(processor.video_processor, server_rest)
        self.manager = StreamManager(limits, geometry, owner=index)
        self.peers = Peers(index, count)
        # a forwarded append carries base64 (4/3 of the bytes) plus its JSON
        self.max_body_bytes = limits.max_upload_bytes * 4 // 3 + 2**20
        # data parallelism: every request of a stream goes to one engine (its prefix cache is there)
        self.dp_ranks = int(pc.data_parallel_size_local if pc.local_engines_only else pc.data_parallel_size)
        self.end_ids = self.tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
        self.newline_ids = self.tokenizer.encode("\n", add_special_tokens=False)
        self.im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.video_pad = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in self.served_names:
            raise StreamError(f"model {model!r} is not served here (serving {self.served_names})", 404)

    def settings(self, req: OpenStreamRequest) -> StreamSettings:
        mine = {k: v for k, v in req.model_dump().items() if k.startswith("dtd_") and v is not None}
        defaults = dict(self.server_dtd)
        if "dtd_reference" not in mine:  # streams compare with the previous step, whatever the server default
            defaults["dtd_reference"] = "previous"
        try:
            dtd = dtd_config_from_kwargs({**defaults, **mine})
        except ValueError as e:
            raise StreamError(str(e)) from None
        return StreamSettings(fps=req.fps, dtd=dtd, event_level=req.event_level,
                              standing_question=req.standing_question, answer_max_tokens=req.answer_max_tokens)

    def dp_rank(self, stream: Stream) -> Optional[int]:
        """The engine of a stream under data parallelism: crc32(id) mod the ranks this server reaches."""
        return zlib.crc32(stream.id.encode()) % self.dp_ranks if self.dp_ranks > 1 else None

    def status(self, stream: Stream) -> dict:
        return {**stream.status(), "api_server": self.manager.owner, "data_parallel_rank": self.dp_rank(stream)}

    async def reap(self, every_s: float) -> None:
        """Free idle streams on a timer (not only when another stream request arrives)."""
        while True:
            await asyncio.sleep(every_s)
            for sid in await asyncio.to_thread(self.manager.sweep):  # may wait for an append's lock
                logger.info("DTD stream %s closed after %.0f s idle", sid, self.manager.limits.idle_seconds)

    def dtd_kwargs(self, stream: Stream) -> dict:
        c = stream.settings.dtd
        return {"dtd_enabled": c.enabled, "dtd_threshold": c.threshold, "dtd_metric": c.metric, "dtd_reference": c.reference}

    async def generate(self, stream: Stream, question: str, max_tokens: int, temperature: float, ignore_eos: bool = False):
        """Async generator of vLLM RequestOutputs for one question at the stream's current point."""
        from vllm import SamplingParams

        async with stream.chat_lock:
            chunk = stream.cut_chunk()
            try:
                items = stream.video_items()
                new_ids = self.tokenizer.encode(stream.prompt_text(question, chunk is not None), add_special_tokens=False)
                prompt_ids = stream.history_ids + new_ids
                if self.max_model_len and len(prompt_ids) + max_tokens > self.max_model_len:
                    raise StreamError(f"max_tokens is too large: {max_tokens}; the model's context is {self.max_model_len} "
                                      f"tokens and this conversation already has at least {len(prompt_ids)}")
                prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids, "mm_processor_kwargs": self.dtd_kwargs(stream)}
                if items:
                    prompt["multi_modal_data"] = {"video": items}
                    prompt["multi_modal_uuids"] = {"video": stream.item_uuids()}
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos)
                rid = f"{stream.id[:12]}-q{stream.questions}-{uuid.uuid4().hex[:8]}"
                last = None
                async for out in self.engine.generate(prompt, params, rid, data_parallel_rank=self.dp_rank(stream)):
                    last = out
                    yield out
            except BaseException:
                if chunk is not None:  # the turn did not happen: its chunk is not part of the conversation
                    stream.drop_last_chunk()
                raise
            ids = list(last.outputs[0].token_ids) if last is not None else []
            tail = self.newline_ids if ids and ids[-1] == self.im_end else self.end_ids
            stream.history_ids = prompt_ids + ids + tail
            stream.questions += 1

    async def answer(self, stream: Stream, question: str, max_tokens: int, temperature: float = 0.0, with_ids: bool = False,
                     ignore_eos: bool = False) -> dict:
        t0 = time.perf_counter()
        ttft, out = None, None
        async for out in self.generate(stream, question, max_tokens, temperature, ignore_eos):
            if ttft is None and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
        return self.completion(stream, out, ttft, time.perf_counter() - t0, with_ids)

    def video_tokens_per_chunk(self, prompt_ids: list[int]) -> list[int]:
        """Kept video tokens of each video item, read off the served (expanded) prompt."""
        runs, n = [], 0
        for t in prompt_ids:
            if t == self.video_pad:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        return runs + ([n] if n else [])

    def completion(self, stream: Stream, out, ttft: Optional[float], e2e: float, with_ids: bool = False) -> dict:
        o = out.outputs[0]
        prompt_ids = list(out.prompt_token_ids or [])
        prompt_tokens = len(prompt_ids)
        state = {"frames": len(stream.frames), "chunks": len(stream.chunks), "time": stream.timestamps[-1] if stream.timestamps else None,
                 "question": stream.questions, "ttft_s": ttft, "e2e_s": e2e,
                 "video_tokens_per_chunk": self.video_tokens_per_chunk(prompt_ids)}
        if with_ids:
            state["prompt_token_ids"] = prompt_ids
            state["completion_token_ids"] = list(o.token_ids)
        return {
            "id": f"chatcmpl-{out.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served_names[0],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(o.token_ids),
                      "total_tokens": prompt_tokens + len(o.token_ids),
                      "prompt_tokens_details": {"cached_tokens": int(out.num_cached_tokens or 0)}},
            "stream_state": state,
        }

    async def proactive(self, stream: Stream, events: list[dict]) -> None:
        q = stream.settings.standing_question
        for e in events:
            try:
                resp = await self.answer(stream, q, stream.settings.answer_max_tokens)
                stream.add_event({"type": "answer", "trigger": e["index"], "time": e["time"], "question": q,
                                  "text": resp["choices"][0]["message"]["content"], "usage": resp["usage"]})
            except Exception as exc:  # never let a background answer take anything down
                logger.warning("DTD stream %s: proactive answer failed: %s", stream.id, exc)
                stream.add_event({"type": "error", "trigger": e["index"], "message": str(exc)})


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
        try:
            stream = svc.manager.open(settings)
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
        frames, stamps = await asyncio.to_thread(_decode_append, svc, stream, body)
        added = await asyncio.to_thread(stream.add_frames, frames, stamps)
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
                                                 body.ignore_eos))
        gen = svc.generate(stream, question, body.max_tokens, body.temperature, body.ignore_eos)
        t0 = time.perf_counter()
        first = await gen.__anext__()  # errors surface here as a 4xx, before the event stream starts

        async def sse():
            out, sent, ttft = first, 0, None
            try:
                while True:
                    text = out.outputs[0].text
                    if ttft is None and out.outputs[0].token_ids:
                        ttft = time.perf_counter() - t0
                    if len(text) > sent:
                        chunk = {"id": f"chatcmpl-{out.request_id}", "object": "chat.completion.chunk", "model": svc.served_names[0],
                                 "choices": [{"index": 0, "delta": {"content": text[sent:]}, "finish_reason": out.outputs[0].finish_reason}]}
                        sent = len(text)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    try:
                        out = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                final = svc.completion(stream, out, ttft, time.perf_counter() - t0)
                yield f"data: {json.dumps({'id': final['id'], 'object': 'chat.completion.chunk', 'choices': [], 'usage': final['usage'], 'stream_state': final['stream_state']})}\n\n"
            except Exception as e:  # a clean SSE error instead of a torn connection
                yield f"data: {json.dumps({'error': {'message': str(e), 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
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
        app.include_router(router)
        app.add_middleware(StreamForwarder)  # several API-server processes: requests reach the stream's owner
        self.app = app

    async def init_state(self, engine_client, state, args) -> None:
        svc = state.dtd_streams = StreamService(engine_client, args)
        if svc.peers.count > 1:
            await svc.peers.serve(self.app)
        task = asyncio.get_running_loop().create_task(svc.reap(min(30.0, max(0.05, svc.manager.limits.idle_seconds / 4))))
        svc.tasks.add(task)
        logger.info("DTD stream routes ready at /v1/streams (limits %s)", svc.manager.limits)
