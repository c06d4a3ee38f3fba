"""Streams over OpenAI's Realtime API: a WebSocket at ``/v1/realtime`` on the same stream sessions as
the HTTP routes (:class:`vllm_plugin.streams.service.StreamService`; no second implementation).

The official ``openai`` SDK reaches it with only ``base_url`` set::

    client = AsyncOpenAI(base_url="http://host:8000/v1", api_key="-")
    async with client.realtime.connect(model=served_name) as conn:
        await conn.session.update(session={"type": "realtime", "dtd": {"fps": 2, "dtd_threshold": 0.1}})
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/jpeg;base64,..."}]})
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what happens?"}]})
        await conn.response.create()
        async for event in conn: ...   # response.output_text.delta ... response.done

The subset of OpenAI's GA events a text-out video session needs (the rest is an ``error`` event):

* client: ``session.update`` (``instructions``, ``max_output_tokens``; the stream's settings in the
  ``session.dtd`` extension: every field of ``POST /v1/streams``, validated the same way, plus
  ``keep_stream``), ``conversation.item.create`` (a user message of ``input_image`` parts — data
  URIs, one frame each, optional ``dtd.timestamp`` — and/or ``input_text``: a question),
  ``response.create`` (answers the questions added since the last response; ``response.conversation:
  "none"`` keeps the turn out of the conversation; ``response.max_output_tokens``; a ``response.dtd``
  extension: ``ignore_eos``, ``temperature``, ``return_token_ids``), ``response.cancel``,
  ``conversation.item.delete`` (a question not answered yet);
* server: ``session.created``/``session.updated`` (the stream's id and settings in ``session.dtd``),
  ``conversation.item.added``/``conversation.item.done`` (a frame item only once its frames are held),
  ``conversation.item.deleted``, ``response.created``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta``/``done``,
  ``response.content_part.done``, ``response.output_item.done``, ``response.done`` (usage with
  ``input_token_details.cached_tokens``; the HTTP answer's ``stream_state`` in ``response.dtd``),
  ``error`` (``error.code`` and ``error.status`` mirror the HTTP status the same failure gets on the
  HTTP routes; the socket stays open), and ``dtd.*`` events for what OpenAI has no name for: the
  stream's events of ``GET /v1/streams/{id}/events`` (``dtd.scene_change``, ``dtd.proactive_answer``,
  ``dtd.reanchor``, ``dtd.dropped``, ``dtd.error``).

The socket owns its stream: closing it ends any response in flight (the engine aborts the request)
and closes the stream, unless ``session.dtd.keep_stream`` is true; then ``?stream_id=<id>`` on a new
connection resumes it within the stream's idle time-out (``DTD_STREAM_IDLE_SECONDS``; an open socket's
stream does not expire, and one closed under it, by ``DELETE /v1/streams/{id}``, ends the session: an
``error`` event, 404, and the socket closes). Several
API-server processes: a resume reaching another process than the stream's is relayed there by
:class:`vllm_plugin.streams.forward.StreamForwarder`.

This module speaks the WebSocket protocol; the stream service raises the plugin's own errors and
:func:`vllm_plugin.streams.routes.http_status` gives each its status, as on the HTTP routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from vllm_plugin import settings as plugin_settings
from vllm_plugin.errors import DTDError, InvalidRequest, NotFound, StreamFull, StreamNotFound, TooManyStreams
from vllm_plugin.streams import openai_format
from vllm_plugin.streams.forward import FORWARDED, OPENED_FOR_SOCKET, REALTIME_PATH
from vllm_plugin.streams.routes import (
    AppendFramesRequest,
    FrameIn,
    OpenStreamRequest,
    decode_append,
    http_status,
)
from vllm_plugin.streams.service import StreamService, describe
from vllm_plugin.streams.session import Stream, StreamSettings

logger = logging.getLogger("vllm.dtd_plugin")
router = APIRouter()
PATH = REALTIME_PATH

# error.code of an error event, by the HTTP status the same failure gets on the HTTP routes
ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    500: "server_error",
    503: "service_unavailable",
}
EVENT_POLL_S = 0.2  # how often the stream's own events (proactive answers) are looked for
SESSION_FIELDS = {"type", "model", "instructions", "output_modalities", "max_output_tokens", "dtd"}
# session.dtd: the HTTP open's fields, and this socket's own
SOCKET_FIELDS = {"keep_stream"}
# what one socket keeps of its items, whatever its client sends over hours
MAX_ITEM_ID = 64  # characters of a client's item id
MAX_ITEMS = 1024  # item ids remembered (duplicates, conversation.item.delete); older ones are forgotten
MAX_PENDING_QUESTIONS = 64  # questions waiting for a response.create (their text together must fit a question)
GONE = "the stream was closed (DELETE /v1/streams/{id}) or expired: this session has ended"


class RealtimeError(InvalidRequest):
    """A client event this session cannot take (400), with its own ``code`` (``invalid_json``,
    ``unknown_event``, ``no_frames``, ...)."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message, param)
        self.code = code


class RealtimeConflict(StreamFull):
    """A client event that conflicts with the session's state (409), with its own ``code``."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# the streams attached to an open socket of this process (one socket per stream)
ATTACHED: set[str] = set()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _usage(out) -> dict:
    """OpenAI Realtime usage from a finished vLLM ``RequestOutput`` (the chat-completion usage's counts)."""
    u = openai_format.usage(out)
    cached = u["prompt_tokens_details"]["cached_tokens"]
    return {
        "total_tokens": u["total_tokens"],
        "input_tokens": u["prompt_tokens"],
        "output_tokens": u["completion_tokens"],
        "input_token_details": {"cached_tokens": cached, "text_tokens": u["prompt_tokens"], "image_tokens": 0},
        "output_token_details": {"text_tokens": u["completion_tokens"], "audio_tokens": 0},
    }


class RealtimeSession:
    """One WebSocket: its stream, the conversation items it added, the response in flight."""

    def __init__(self, ws: WebSocket, svc: StreamService, model: str):
        self.ws, self.svc, self.model = ws, svc, model
        self.id = _id("sess")
        self.stream: Stream | None = None
        self.open_fields: dict[str, Any] = {}  # session.dtd: the HTTP open's fields given so far
        self.keep_stream = False
        self.max_output_tokens: int | None = None
        self.items: dict[str, dict] = {}  # item id -> {"kind": "frames" | "question" | "answer", ...}
        self.last_item: str | None = None
        self.questions: list[str] = []  # question items added since the last response, in order
        self.response: asyncio.Task | None = None
        self.first_frame_at: float | None = None
        self.events_seen = -1
        self.attached = ATTACHED  # the streams with an open socket (run() says which set)
        self.client_event_id: str | None = None  # of the client event being handled
        self._send_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()  # the stream's events go out once each, in order
        self._gone = False  # the stream closed under the socket: said once, the socket closes
        relayed = ws.headers.get(FORWARDED.decode())
        # (latin-1 headers: "\xb2" is a digit to str.isdigit, and no number)
        self.relayed_from = int(relayed) if relayed and relayed.isascii() and relayed.isdigit() else None
        # a stream a peer opened for this socket (its own process was full): the socket's own, not a resume
        self.opened_for_socket = self.relayed_from is not None and ws.headers.get(OPENED_FOR_SOCKET.decode()) == "1"

    # -- sending ---------------------------------------------------------------------------------------
    async def send(self, event: dict) -> bool:
        """Send one server event; False when the socket is gone (never raises for that)."""
        event = {"event_id": _id("event"), **event}
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                return False
            try:
                await self.ws.send_text(json.dumps(event))
                return True
            except (WebSocketDisconnect, RuntimeError, OSError):
                return False

    async def error(self, e: BaseException, client_event_id: str | None = None) -> None:
        status = http_status(e)
        code = getattr(e, "code", None) if isinstance(e, (RealtimeError, RealtimeConflict)) else None
        code = code or ERROR_CODES.get(status, "server_error")
        err: dict[str, Any] = {
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": code,
            "status": status,
            "message": str(e) if status < 500 or isinstance(e, DTDError) else describe(e),
            "param": getattr(e, "field", None),
            "event_id": client_event_id,
        }
        if status in (429, 503):
            err["retry_after_s"] = float(getattr(e, "retry_after_s", 1.0))
        await self.send({"type": "error", "error": err})

    def session_object(self) -> dict:
        stream = self.stream
        dtd = self.svc.status(stream) if stream is not None else {}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": stream.settings.instructions if stream is not None else None,
            "max_output_tokens": self.max_output_tokens or (stream.settings.answer_max_tokens if stream else None),
            "dtd": {
                "stream_id": stream.id if stream else None,
                "keep_stream": self.keep_stream,
                "relayed_from": self.relayed_from,  # the API-server process that relayed this socket, if any
                "stream": dtd,
            },
        }

    # -- the stream ------------------------------------------------------------------------------------
    async def prepare(self, fields: dict[str, Any]) -> StreamSettings:
        """The settings of ``fields`` (``session.dtd``), validated as the HTTP open; nothing changes."""
        try:
            req = OpenStreamRequest(**fields)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "dtd"
            raise InvalidRequest(f"session.dtd.{field}: {first.get('msg')}", f"session.dtd.{field}") from None
        self.svc.check_model(req.model)
        settings = self.svc.settings(req)
        if settings.dtd.enabled and settings.dtd.criterion == "feature":
            await asyncio.to_thread(self.svc.encoder)  # the vision tower loads once, off the event loop
        return settings

    async def open_stream(self) -> Stream:
        """A new stream with the settings given so far (``session.dtd``), validated as the HTTP open."""
        return self.svc.open(await self.prepare(self.open_fields))

    def _set_stream(self, stream: Stream | None) -> None:
        """This socket's stream is ``stream`` (attached: no other socket resumes it)."""
        if self.stream is not None:
            self.attached.discard(self.stream.id)
        self.stream = stream
        if stream is not None:
            self.attached.add(stream.id)

    async def resume(self, stream_id: str, attached: set[str]) -> None:
        stream = self.svc.get(stream_id)  # 404: unknown, closed or expired
        if stream.id in attached:
            raise RealtimeConflict(f"stream {stream_id} is attached to another open socket", "stream_attached")
        self._set_stream(stream)
        self.keep_stream = not self.opened_for_socket  # resumed: the client keeps it until it says otherwise
        stream.touch()

    async def reopen(self, settings: StreamSettings) -> None:
        """This socket's stream (it holds no frame) replaced by a new one with ``settings``; a full server
        gives the new one the old one's place (the old one is closed first)."""
        old = self.stream
        try:
            new = self.svc.open(settings)
        except TooManyStreams:
            if old is None:
                raise
            self._set_stream(None)  # the next event opens one with the settings before, if this fails
            await self._close(old.id)
            new = self.svc.open(settings)
        else:
            if old is not None:
                self._set_stream(None)
                await self._close(old.id)
        self._set_stream(new)

    async def _close(self, stream_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.svc.close(stream_id)

    async def close_stream(self) -> None:
        if self.stream is not None:
            await self._close(self.stream.id)

    async def gone(self, client_event_id: str | None = None) -> bool:
        """Whether the stream closed under this open socket (``DELETE /v1/streams/{id}``, an expiry): then,
        once, an error event and the socket closes. A closed stream takes nothing more: no cap counts it."""
        if self.stream is None or not self.stream.closed:
            return False
        if not self._gone:
            self._gone = True
            await self.error(StreamNotFound(GONE), client_event_id)
            with contextlib.suppress(Exception):
                await self.ws.close(code=1000, reason="stream closed")
        return True

    # -- client events ---------------------------------------------------------------------------------
    async def handle(self, raw: str | bytes) -> None:
        self.client_event_id = None
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # (nested past the parser's depth)
            raise RealtimeError(f"not a JSON event: {e}", "invalid_json") from None
        if isinstance(event, dict) and isinstance(event.get("event_id"), str):
            self.client_event_id = event["event_id"]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("an event is a JSON object with a string 'type'", "invalid_event", "type")
        handler = self.HANDLERS.get(event["type"])
        if handler is None:
            raise RealtimeError(
                f"unknown or unsupported event type {event['type']!r}; this video session takes "
                + ", ".join(sorted(self.HANDLERS)),
                "unknown_event",
                "type",
            )
        await handler(self, event)

    async def session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RealtimeError("session.update needs a 'session' object", "invalid_event", "session")
        if session.get("type", "realtime") != "realtime":
            raise RealtimeError("only 'realtime' sessions (no transcription)", "invalid_event", "session.type")
        modalities = session.get("output_modalities")
        if modalities is not None and modalities != ["text"]:
            raise RealtimeError(
                "this video session answers in text: output_modalities ['text']",
                "invalid_event",
                "session.output_modalities",
            )
        if session.get("model") is not None:
            self.svc.check_model(session["model"])
        dtd = session.get("dtd") or {}
        if not isinstance(dtd, dict):
            raise RealtimeError("session.dtd is an object", "invalid_event", "session.dtd")
        max_out = session.get("max_output_tokens")
        if max_out is not None and max_out != "inf" and not (isinstance(max_out, int) and max_out >= 1):
            raise RealtimeError(
                "max_output_tokens is an integer >= 1 or 'inf'", "invalid_event", "session.max_output_tokens"
            )
        if "keep_stream" in dtd and not isinstance(dtd["keep_stream"], bool):
            raise RealtimeError("session.dtd.keep_stream is true or false", "invalid_event", "session.dtd.keep_stream")
        fields = {k: v for k, v in dtd.items() if k not in SOCKET_FIELDS}
        if "instructions" in session:
            fields["instructions"] = session["instructions"]
        merged = {**self.open_fields, **fields}
        stream = self.stream
        if stream is None or (fields and merged != self.open_fields):
            settings = await self.prepare(merged)  # validated as the HTTP open; nothing changes on error
            if stream is not None and settings == stream.settings:
                pass  # the settings it has (a client sending its session again, a default spelled out)
            elif stream is not None and len(stream.store.frames):
                raise StreamFull(
                    "the stream's settings (session.dtd, instructions) are fixed once it holds frames; "
                    "open a new session for other settings"
                )
            else:
                await self.reopen(settings)
            self.open_fields = merged
        if "keep_stream" in dtd:
            self.keep_stream = bool(dtd["keep_stream"])
        if max_out is not None:
            self.max_output_tokens = None if max_out == "inf" else max_out
        await self.send({"type": "session.updated", "session": self.session_object()})

    def _frames_of(self, parts: list[dict]) -> AppendFramesRequest | None:
        images = [(i, p) for i, p in enumerate(parts) if p.get("type") == "input_image"]
        if not images:
            return None
        frames = []
        for i, p in images:
            url = p.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise RealtimeError(
                    "input_image.image_url must be a data: URI (base64 JPEG/PNG/WebP); the server fetches nothing",
                    "invalid_image",
                    f"item.content[{i}].image_url",
                )
            ext = p.get("dtd")
            frames.append(FrameIn(image=url, timestamp=ext.get("timestamp") if isinstance(ext, dict) else None))
        return AppendFramesRequest(frames=frames, video=None, start_time=None)

    def _stamps(self, stream: Stream, count: int) -> list[float]:
        """Stream times of ``count`` frames without timestamps: their arrival (seconds since the
        session's first frame), never closer than 1/fps to the frame before (a burst is spaced as
        the HTTP route spaces frames without timestamps)."""
        now = time.monotonic()
        if self.first_frame_at is None:
            self.first_frame_at = now
        step = 1.0 / stream.settings.fps
        last = stream.store.timestamps[-1] if stream.store.timestamps else -step
        t = max(now - self.first_frame_at, last + step)
        return [t + i * step for i in range(count)]

    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise RealtimeError("conversation.item.create needs an 'item' object", "invalid_event", "item")
        if item.get("type", "message") != "message" or item.get("role") != "user":
            raise RealtimeError(
                "this video session takes user messages (input_image frames, input_text questions)",
                "invalid_item",
                "item.role",
            )
        prev = event.get("previous_item_id")
        if prev is not None and prev != self.last_item and not (prev == "root" and self.last_item is None):
            raise RealtimeError(
                "items are appended in order: previous_item_id must be the last item (frames cannot go back in time)",
                "invalid_item",
                "previous_item_id",
            )
        parts = item.get("content")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            raise RealtimeError("item.content is a non-empty list of content parts", "invalid_item", "item.content")
        for i, p in enumerate(parts):
            if p.get("type") not in ("input_image", "input_text"):
                raise RealtimeError(
                    f"content part type {p.get('type')!r} is not supported: input_image (frames) and input_text",
                    "invalid_item",
                    f"item.content[{i}].type",
                )
            if p.get("type") == "input_text" and not isinstance(p.get("text"), str):
                raise RealtimeError("input_text needs a string 'text'", "invalid_item", f"item.content[{i}].text")
        item_id = item.get("id") or _id("item")
        if not isinstance(item_id, str) or len(item_id) > MAX_ITEM_ID:
            raise RealtimeError(
                f"an item id is a string of at most {MAX_ITEM_ID} characters", "invalid_item", "item.id"
            )
        if item_id in self.items:
            raise RealtimeError(f"item id {item_id!r} is already used", "invalid_item", "item.id")
        stream = await self.ensure_stream()
        text = "".join(p["text"] for p in parts if p.get("type") == "input_text")
        body = self._frames_of(parts)
        if text:
            self.svc.check_text(text, "the question", "item.content")
            if body is None and not len(stream.store.frames):
                raise RealtimeError(
                    "a question before any frame: add input_image frames first", "no_frames", "item.content"
                )
            # questions wait for a response.create, which asks them as one: their number and their text are bounded
            if len(self.questions) >= MAX_PENDING_QUESTIONS:
                raise RealtimeError(
                    f"{len(self.questions)} questions wait for a response: send response.create first",
                    "too_many_questions",
                    "item.content",
                )
            pending = "\n".join([*(self.items[q]["text"] for q in self.questions), text])
            self.svc.check_text(pending, "the questions waiting for a response", "item.content")
        added: dict | None = None
        if body is not None:
            # validated, decoded and held (as POST /frames) before the item is acknowledged
            stream.admit_append()
            frames, stamps = await asyncio.to_thread(decode_append, self.svc, stream, body)
            if stamps is None:
                stamps = self._stamps(stream, len(frames))
            added = await self.svc.append(stream, frames, stamps)
            if stream.closed:  # closed meanwhile: not held by any stream (gone() tells the client)
                return
        if text:
            self.questions.append(item_id)
        self._remember(item_id, {"kind": "question", "text": text} if text else {"kind": "frames"})
        prev, self.last_item = self.last_item, item_id
        out = {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "role": "user",
            "status": "completed",
            "content": [
                {"type": "input_text", "text": p["text"]} if p["type"] == "input_text" else {"type": "input_image"}
                for p in parts
            ],
        }
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": out})
        done: dict[str, Any] = {"type": "conversation.item.done", "previous_item_id": prev, "item": out}
        if added is not None:
            done["dtd"] = {k: added[k] for k in ("frames", "steps", "kept_per_step")}
        await self.send(done)
        await self.flush_events()

    def _remember(self, item_id: str, item: dict) -> None:
        """Keep ``item`` under ``item_id``: the latest :data:`MAX_ITEMS` items, and every question waiting
        for a response (frames and answered turns of hours must not grow a socket's memory)."""
        self.items[item_id] = item
        while len(self.items) > MAX_ITEMS:
            old = next((i for i in self.items if i not in self.questions), None)
            if old is None:
                break
            del self.items[old]

    async def item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        item = self.items.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise NotFound(f"no item {item_id!r} in this session")
        if item["kind"] != "question" or item_id not in self.questions:
            raise StreamFull(
                "only a question not answered yet can be deleted: frames are the stream's video, "
                "and an answered turn is part of the conversation (ask with response.conversation 'none' "
                "to keep a turn out of it)"
            )
        self.questions.remove(item_id)
        del self.items[item_id]
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def response_create(self, event: dict) -> None:
        if self.response is not None and not self.response.done():
            raise RealtimeConflict(
                "a response is in flight: wait for its response.done, or cancel it",
                "conversation_already_has_active_response",
            )
        resp = event.get("response") or {}
        if not isinstance(resp, dict):
            raise RealtimeError("response is an object", "invalid_event", "response")
        if resp.get("input") is not None:
            raise RealtimeError(
                "response.input is not supported: add the question as an input_text item",
                "invalid_event",
                "response.input",
            )
        conversation = resp.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise RealtimeError("response.conversation is 'auto' or 'none'", "invalid_event", "response.conversation")
        ext = resp.get("dtd") or {}
        if not isinstance(ext, dict):
            raise RealtimeError("response.dtd is an object", "invalid_event", "response.dtd")
        stream = await self.ensure_stream()
        if not self.questions:
            raise RealtimeError("no question to answer: add an input_text item first", "no_question", "response")
        if not len(stream.store.frames):
            raise RealtimeError("a question before any frame: add input_image frames first", "no_frames", "response")
        max_tokens = resp.get("max_output_tokens", self.max_output_tokens or stream.settings.answer_max_tokens)
        if max_tokens == "inf":
            max_tokens = stream.settings.answer_max_tokens
        temperature = ext.get("temperature", 0.0)
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise RealtimeError("max_output_tokens is an integer >= 1", "invalid_event", "response.max_output_tokens")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature <= 2):
            raise RealtimeError("response.dtd.temperature is in [0, 2]", "invalid_event", "response.dtd.temperature")
        question_ids, self.questions = self.questions, []
        question = "\n".join(self.items[i]["text"] for i in question_ids)
        for i in question_ids:  # asked: no longer deletable, their text no longer kept here
            self.items[i] = {"kind": "answered"}
        self.response = asyncio.get_running_loop().create_task(
            self.respond(
                stream,
                question,
                question_ids,
                max_tokens,
                float(temperature),
                bool(ext.get("ignore_eos", False)),
                conversation == "auto",
                bool(ext.get("return_token_ids", False)),
                resp.get("metadata"),
            )
        )

    async def response_cancel(self, event: dict) -> None:
        task = self.response
        if task is None or task.done():
            raise RealtimeError("no response in flight", "response_cancel_not_active", "response_id")
        task.cancel()  # the task sends response.done (cancelled); the engine aborts the request
        await asyncio.wait([task])  # (not `await task`: that would swallow this handler's own cancellation)

    HANDLERS = {
        "session.update": session_update,
        "conversation.item.create": item_create,
        "conversation.item.delete": item_delete,
        "response.create": response_create,
        "response.cancel": response_cancel,
    }

    async def ensure_stream(self) -> Stream:
        if self.stream is None:
            self._set_stream(await self.open_stream())
        return self.stream  # type: ignore[return-value]

    # -- a response ------------------------------------------------------------------------------------
    async def respond(
        self,
        stream: Stream,
        question: str,
        question_ids: list[str],
        max_tokens: int,
        temperature: float,
        ignore_eos: bool,
        remember: bool,
        with_ids: bool,
        metadata,
    ) -> None:
        rid, item_id = _id("resp"), _id("item")
        response: dict[str, Any] = {
            "id": rid,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": self.id if remember else None,
            "output_modalities": ["text"],
            "max_output_tokens": max_tokens,
            "metadata": metadata,
            "usage": None,
        }
        item = {"id": item_id, "type": "message", "object": "realtime.item", "role": "assistant", "content": []}
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        timing, out, sent, started = openai_format.Timing(), None, 0, False
        gen = self.svc.generate(stream, question, max_tokens, temperature, ignore_eos, remember, timing)
        try:
            await self.send({"type": "response.created", "response": dict(response)})
            async for out in gen:
                timing.saw(out)
                if not started:
                    started = True
                    await self.output_started(item, where)
                text = out.outputs[0].text
                if len(text) > sent:
                    await self.send({"type": "response.output_text.delta", **where, "delta": text[sent:]})
                    sent = len(text)
        except asyncio.CancelledError:
            response.update(status="cancelled", status_details={"type": "cancelled", "reason": "client_cancelled"})
            await self.send({"type": "response.done", "response": response})
            return
        except Exception as e:  # the plugin's errors and vLLM's: an error event, then the failed response
            await self.error(e)
            response.update(
                status="failed",
                status_details={
                    "type": "failed",
                    "error": {"type": "invalid_request_error", "code": str(http_status(e))},
                },
            )
            await self.send({"type": "response.done", "response": response})
            return
        finally:
            await gen.aclose()  # now, not when collected: a cancelled answer frees the stream at once
        # the answer is complete (and in the conversation): a cancel arriving now does not stop its closing
        # events, nor its response.done
        closing = asyncio.ensure_future(self.finish(stream, out, timing, with_ids, started, item, where, response))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
        if remember:
            self._remember(item_id, {"kind": "answer"})
        await self.flush_events()

    async def output_started(self, item: dict, where: dict) -> None:
        """The answer's output item and its text part begin (before its first delta)."""
        rid = where["response_id"]
        added = {"type": "response.output_item.added", "response_id": rid, "output_index": 0}
        await self.send({**added, "item": {**item, "status": "in_progress"}})
        await self.send({"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": ""}})

    async def finish(self, stream, out, timing, with_ids: bool, started: bool, item: dict, where: dict, response):
        """A complete answer's closing events, then its ``response.done``."""
        rid = response["id"]
        text = out.outputs[0].text if out is not None else ""
        finish = out.outputs[0].finish_reason if out is not None else None
        done_item = {
            **item,
            "status": "completed" if finish != "length" else "incomplete",
            "content": [{"type": "output_text", "text": text}],
        }
        if not started:
            await self.output_started(item, where)
        await self.send({"type": "response.output_text.done", **where, "text": text})
        await self.send({"type": "response.content_part.done", **where, "part": {"type": "output_text", "text": text}})
        await self.send({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": done_item})
        state = self.svc.state(stream, out, timing, with_ids) if out is not None else {}
        response.update(
            status="completed" if finish != "length" else "incomplete",
            status_details=None if finish != "length" else {"type": "incomplete", "reason": "max_output_tokens"},
            output=[done_item],
            usage=_usage(out) if out is not None else None,
            dtd={"finish_reason": finish, "stream_state": state},
        )
        await self.send({"type": "response.done", "response": response})

    # -- the stream's own events -----------------------------------------------------------------------
    async def flush_events(self) -> None:
        """Send the stream's events not sent yet (scene changes, proactive answers, ...) as ``dtd.*``."""
        stream = self.stream
        if stream is None:
            return
        async with self._flush_lock:  # the watcher, an item's acknowledgement, a response's end: one at a time
            for e in stream.events.after(self.events_seen):
                self.events_seen = e["index"]
                kind = "proactive_answer" if e.get("type") == "answer" else e.get("type", "event")
                await self.send(
                    {**{k: v for k, v in e.items() if k != "type"}, "type": f"dtd.{kind}", "stream_id": stream.id}
                )

    async def watch_events(self) -> None:
        """The stream's events as they happen; the open socket is the stream's client (it does not expire
        while the socket is open), and a stream closed under it ends the session."""
        while True:
            await asyncio.sleep(EVENT_POLL_S)
            if await self.gone():
                return
            if self.stream is not None:
                self.stream.touch()
            await self.flush_events()

    # -- the socket's life -----------------------------------------------------------------------------
    async def run(self, resume_id: str | None, attached: set[str]) -> None:
        self.attached = attached
        try:
            if resume_id is not None:
                await self.resume(resume_id, attached)
            else:
                await self.ensure_stream()
        except (DTDError, ValueError) as e:
            await self.error(e)
            code = 1013 if isinstance(e, TooManyStreams) else 1008  # try again later / policy violation
            await self.ws.close(code=code, reason=str(e)[:120])
            return
        if resume_id is not None:
            self.events_seen = self.stream.events.last_index  # type: ignore[union-attr]  # what happens from now
        await self.send({"type": "session.created", "session": self.session_object()})
        watcher = asyncio.get_running_loop().create_task(self.watch_events())
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                raw = text if text is not None else (msg.get("bytes") or b"")
                try:
                    if not await self.gone():
                        await self.handle(raw)
                except (DTDError, ValueError) as e:  # the client's mistake or a limit: the socket stays open
                    await self.error(e, self.client_event_id)
                except Exception as e:  # noqa: BLE001 - never let one event take the socket down
                    logger.warning("DTD realtime %s: %s", self.id, describe(e), exc_info=True)
                    # its details stay in the server's log
                    await self.error(Exception("the server failed on this event (see its log)"), self.client_event_id)
                if await self.gone(self.client_event_id):
                    break
        finally:
            watcher.cancel()
            # shielded: a server (or test client) that cancels the handler still gets the request
            # aborted and the stream closed
            end = asyncio.ensure_future(self.end())
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(end)

    async def end(self) -> None:
        """The socket is gone: the response in flight ends (the engine aborts its request), and the
        stream closes unless the client keeps it (attached until then: no resume gets a closing stream)."""
        task = self.response
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if not self.keep_stream:
            await self.close_stream()
        self._set_stream(None)


@router.websocket(PATH)
async def realtime(websocket: WebSocket):
    """OpenAI Realtime API (GA) for video streams: see :mod:`vllm_plugin.streams.realtime`."""
    svc: StreamService | None = getattr(websocket.app.state, "dtd_streams", None)
    # OpenAI's browser SDK offers "realtime" (and its key) as subprotocols: a browser fails a handshake
    # whose answer names none of those it offered
    await websocket.accept(subprotocol="realtime" if "realtime" in websocket.scope.get("subprotocols", ()) else None)
    model = websocket.query_params.get("model")
    session = RealtimeSession(websocket, svc, model or (svc.served_names[0] if svc else ""))  # type: ignore[arg-type]
    if svc is None:
        await session.send(
            {
                "type": "error",
                "error": {
                    "type": "server_error",
                    "code": "service_unavailable",
                    "status": 503,
                    "message": "stream routes are not initialized",
                },
            }
        )
        await websocket.close(code=1011)
        return
    try:
        svc.check_model(model)
    except NotFound as e:
        await session.error(e)
        await websocket.close(code=1008, reason="unknown model")
        return
    await session.run(websocket.query_params.get("stream_id"), ATTACHED)


class RealtimeRouteTaken(RuntimeError):
    """Both vLLM and the plugin would serve :data:`PATH`: the server refuses to start."""


def attach(app) -> None:
    """Serve :data:`PATH` on ``app`` (``DTD_STREAM_REALTIME``, on by default), unless another route
    has it already (vLLM's own, for speech models): then refuse to start, naming both ways out."""
    if not plugin_settings.get("DTD_STREAM_REALTIME"):
        return
    for route in app.routes:
        if getattr(route, "path", None) == PATH:
            endpoint = getattr(route, "endpoint", None)
            raise RealtimeRouteTaken(
                f"{PATH} is already served by {getattr(endpoint, '__module__', '?')}."
                f"{getattr(endpoint, '__name__', '?')} (vLLM serves it for speech models): the DTD stream "
                "plugin will not shadow it. Start with DTD_STREAM_REALTIME=0 to serve streams on the HTTP "
                "routes only, or serve the speech model on another server"
            )
    app.include_router(router)
