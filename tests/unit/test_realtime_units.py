"""The Realtime WebSocket (``/v1/realtime``) on the stream service, with no server: FastAPI's test
client drives the real route and session; the engine is :class:`tests.fake_engine.FakeEngine`. The
same protocol against real vLLM, with the official SDK: tests/serving/test_realtime_serving.py."""

import asyncio
import base64
import io
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fake_engine import FakeEngine
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from PIL import Image

from vllm_plugin.errors import NotFound
from vllm_plugin.media import encode_png
from vllm_plugin.streams import realtime
from vllm_plugin.streams.service import StreamService
from vllm_plugin.streams.session import Limits, StreamManager


class SlowEngine(FakeEngine):
    """Answers one token every 20 ms, up to ``max_tokens`` (``ignore_eos``), and records aborts."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.cancelled: list[str] = []

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        if not params.get("ignore_eos"):
            async for out in super().generate(prompt, params, request_id, data_parallel_rank):
                yield out
            return
        self.requests.append((prompt, params))
        ids = []
        try:
            for i in range(params["max_tokens"]):
                await asyncio.sleep(0.02)
                ids.append(self.answer_ids[0])
                done = i == params["max_tokens"] - 1
                yield SimpleNamespace(
                    request_id=request_id,
                    prompt_token_ids=list(prompt["prompt_token_ids"]),
                    num_cached_tokens=0,
                    finished=done,
                    outputs=[
                        SimpleNamespace(
                            text=self.tokenizer.decode(ids),
                            token_ids=list(ids),
                            finish_reason="length" if done else None,
                            stop_reason=None,
                        )
                    ],
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request_id)
            raise


@pytest.fixture
def app(tiny_model_path):
    app = FastAPI()
    app.include_router(realtime.router)
    app.state.dtd_streams = StreamService(SlowEngine(tiny_model_path), StreamManager(Limits(max_streams=3)))
    return app


def _frame(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    png = encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _frames_item(n: int, start: int = 0, **ext) -> dict:
    parts = []
    for i in range(n):
        p = {"type": "input_image", "image_url": _frame(start + i)}
        if ext.get("timestamps"):
            p["dtd"] = {"timestamp": (start + i) / 2.0}
        parts.append(p)
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": parts}}


def _question(text: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    if item_id:
        item["id"] = item_id
    return {"type": "conversation.item.create", "item": item}


def _until(ws, *types: str) -> list[dict]:
    """Events until (and including) the first of ``types``."""
    seen = []
    while True:
        e = ws.receive_json()
        seen.append(e)
        if e["type"] in types:
            return seen


def _alive(svc, sid: str) -> bool:
    try:
        svc.get(sid)
        return True
    except NotFound:
        return False


def _closed(svc, sid: str, seconds: float = 10.0) -> bool:
    """Whether the stream closes within ``seconds`` (a socket's end runs after the client has left)."""
    for _ in range(int(seconds / 0.02)):
        if not _alive(svc, sid):
            return True
        time.sleep(0.02)
    return False


def _session(client, **query):
    qs = "&".join(f"{k}={v}" for k, v in {"model": "tiny", **query}.items())
    return client.websocket_connect(f"/v1/realtime?{qs}")


def test_a_session_holds_frames_answers_and_reports_usage(app):
    with TestClient(app) as client, _session(client) as ws:
        created = ws.receive_json()
        assert created["type"] == "session.created"
        sid = created["session"]["dtd"]["stream_id"]
        assert _alive(app.state.dtd_streams, sid)
        ws.send_json({"type": "session.update", "session": {"type": "realtime", "dtd": {"fps": 2.0}}})
        updated = _until(ws, "session.updated")[-1]
        assert updated["session"]["dtd"]["stream"]["fps"] == 2.0
        ws.send_json({**_frames_item(4, timestamps=True), "event_id": "c1"})
        added, done = ws.receive_json(), ws.receive_json()
        assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
        assert done["dtd"]["frames"] == 4 and len(done["dtd"]["kept_per_step"]) == 2  # held before the ack
        ws.send_json(_question("what happens?"))
        assert _until(ws, "conversation.item.done")[-1]["item"]["content"][0]["text"] == "what happens?"
        ws.send_json({"type": "response.create"})
        events = _until(ws, "response.done")
        kinds = [e["type"] for e in events if not e["type"].startswith("dtd.")]
        assert kinds == [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
        done = events[-1]["response"]
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == text == "a cat"
        assert done["usage"]["input_tokens"] > 0 and "cached_tokens" in done["usage"]["input_token_details"]
        assert done["dtd"]["stream_state"]["frames"] == 4
    assert _closed(app.state.dtd_streams, sid)  # the socket closed: its stream too


def test_bad_events_get_error_events_and_the_socket_stays_usable(app):
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        cases = [
            ("{not json", "invalid_json", 400),
            (json.dumps({"type": "input_audio_buffer.append", "audio": ""}), "unknown_event", 400),
            (json.dumps({"no": "type"}), "invalid_event", 400),
            (json.dumps(_question("before any frame?")), "no_frames", 400),
            (json.dumps({"type": "response.create"}), "no_question", 400),
            (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", 400),
            (json.dumps({"type": "conversation.item.delete", "item_id": "nope"}), "not_found", 404),
        ]
        bad_image = _frames_item(1)
        bad_image["item"]["content"][0]["image_url"] = "data:image/png;base64," + base64.b64encode(b"x" * 99).decode()
        cases.append((json.dumps(bad_image), "invalid_request", 400))
        http = _frames_item(1)
        http["item"]["content"][0]["image_url"] = "http://example.com/a.png"
        cases.append((json.dumps(http), "invalid_image", 400))
        bomb = _frames_item(1)  # a small PNG of 6000 x 3000 pixels: over max_frame_pixels, refused from its header
        buf = io.BytesIO()
        Image.new("RGB", (6000, 3000), (9, 9, 9)).save(buf, format="PNG")
        bomb["item"]["content"][0]["image_url"] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        cases.append((json.dumps(bomb), None, 413))
        cases.append((json.dumps({"type": "session.update", "session": {"dtd": {"fps": -1}}}), "invalid_request", 400))
        cases.append(
            (json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"]}}), "invalid_event", 400)
        )
        for raw, code, status in cases:
            ws.send_text(raw)
            e = ws.receive_json()
            assert e["type"] == "error", (raw[:80], e)
            assert e["error"]["status"] == status, (raw[:80], e)
            if code:
                assert e["error"]["code"] == code, (raw[:80], e)
        # still usable: frames, a question, an answer
        ws.send_json(_frames_item(2, timestamps=True))
        assert _until(ws, "conversation.item.done")[-1]["dtd"]["frames"] == 2
        ws.send_json(_question("now?"))
        ws.send_json({"type": "response.create"})
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"
        # settings are fixed once frames are held (409), the socket stays open
        ws.send_json({"type": "session.update", "session": {"dtd": {"dtd_threshold": 0.3}}})
        e = _until(ws, "error")[-1]
        assert e["error"]["status"] == 409


def test_cancel_aborts_the_request_and_a_new_response_follows(app):
    engine = app.state.dtd_streams.engine
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        ws.send_json(_question("long story"))
        ws.send_json({"type": "response.create", "response": {"max_output_tokens": 2000, "dtd": {"ignore_eos": True}}})
        _until(ws, "response.output_text.delta")
        ws.send_json({"type": "response.create"})  # one response at a time
        assert _until(ws, "error")[-1]["error"]["code"] == "conversation_already_has_active_response"
        ws.send_json({"type": "response.cancel"})
        done = _until(ws, "response.done")[-1]["response"]
        assert done["status"] == "cancelled"
        assert len(engine.cancelled) == 1
        ws.send_json(_question("short one"))
        ws.send_json({"type": "response.create"})
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"


def test_a_disconnect_mid_response_aborts_it_and_closes_the_stream(app):
    svc = app.state.dtd_streams
    with TestClient(app) as client:
        with _session(client) as ws:
            sid = ws.receive_json()["session"]["dtd"]["stream_id"]
            ws.send_json(_frames_item(2, timestamps=True))
            _until(ws, "conversation.item.done")
            ws.send_json(_question("long story"))
            ws.send_json(
                {"type": "response.create", "response": {"max_output_tokens": 2000, "dtd": {"ignore_eos": True}}}
            )
            _until(ws, "response.output_text.delta")
        assert _closed(svc, sid) and svc.engine.cancelled


def test_keep_stream_resumes_by_id_and_a_stream_has_one_socket(app):
    svc = app.state.dtd_streams
    with TestClient(app) as client:
        with _session(client) as ws:
            sid = ws.receive_json()["session"]["dtd"]["stream_id"]
            ws.send_json({"type": "session.update", "session": {"dtd": {"keep_stream": True}}})
            _until(ws, "session.updated")
            ws.send_json(_frames_item(2, timestamps=True))
            _until(ws, "conversation.item.done")
        for _ in range(500):  # the socket's end has run (it detaches the stream last but one)
            if sid not in realtime.ATTACHED:
                break
            time.sleep(0.02)
        time.sleep(0.1)
        assert sid not in realtime.ATTACHED and _alive(svc, sid)  # kept
        with _session(client, stream_id=sid) as ws:
            created = ws.receive_json()
            assert created["session"]["dtd"]["stream_id"] == sid and created["session"]["dtd"]["stream"]["frames"] == 2
            with _session(client, stream_id=sid) as other:  # a second socket on the same stream: refused
                e = other.receive_json()
                assert e["type"] == "error" and e["error"]["code"] == "stream_attached"
            ws.send_json(_question("still there?"))
            ws.send_json({"type": "response.create"})
            assert _until(ws, "response.done")[-1]["response"]["dtd"]["stream_state"]["frames"] == 2
            ws.send_json({"type": "session.update", "session": {"dtd": {"keep_stream": False}}})
            _until(ws, "session.updated")
        assert _closed(svc, sid)
        with _session(client, stream_id=sid) as ws:
            e = ws.receive_json()
            assert e["type"] == "error" and e["error"]["status"] == 404


def test_a_pending_question_can_be_deleted_an_answered_one_cannot(app):
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        ws.send_json(_question("first", "q1"))
        _until(ws, "conversation.item.done")
        ws.send_json({"type": "conversation.item.delete", "item_id": "q1"})
        assert _until(ws, "conversation.item.deleted")[-1]["item_id"] == "q1"
        ws.send_json({"type": "response.create"})
        assert _until(ws, "error")[-1]["error"]["code"] == "no_question"
        ws.send_json(_question("second", "q2"))
        ws.send_json({"type": "response.create"})
        _until(ws, "response.done")
        ws.send_json({"type": "conversation.item.delete", "item_id": "q2"})
        assert _until(ws, "error")[-1]["error"]["status"] == 409


def test_instructions_become_the_system_message(app):
    svc = app.state.dtd_streams
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"instructions": "Answer in one word."}})
        sid = _until(ws, "session.updated")[-1]["session"]["dtd"]["stream_id"]
        ws.send_json(_frames_item(2, timestamps=True))
        ws.send_json(_question("what?"))
        ws.send_json({"type": "response.create"})
        _until(ws, "response.done")
        prompt = svc.engine.tokenizer.decode(svc.engine.requests[-1][0]["prompt_token_ids"])
        assert prompt.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
        assert "You are a helpful assistant" not in prompt
        assert svc.get(sid).settings.instructions == "Answer in one word."


def test_unknown_model_and_full_server_are_refused_with_an_error_event(app):
    with TestClient(app) as client:
        with _session(client, model="nope") as ws:
            assert ws.receive_json()["error"]["status"] == 404
        socks = [_session(client) for _ in range(3)]
        opened = [s.__enter__() for s in socks]
        try:
            for s in opened:
                assert s.receive_json()["type"] == "session.created"
            with _session(client) as ws:
                e = ws.receive_json()
                assert e["error"]["status"] == 429 and e["error"]["retry_after_s"] > 0
        finally:
            for s in socks:
                s.__exit__(None, None, None)


def test_the_plugin_refuses_to_start_beside_vllms_own_realtime_route(monkeypatch):
    async def speech(websocket: WebSocket):  # as vLLM registers it for speech models
        await websocket.close()

    app = FastAPI()
    app.add_api_websocket_route("/v1/realtime", speech)
    with pytest.raises(realtime.RealtimeRouteTaken, match="DTD_STREAM_REALTIME=0"):
        realtime.attach(app)
    monkeypatch.setenv("DTD_STREAM_REALTIME", "0")
    realtime.attach(app)  # streams on HTTP only; vLLM's route keeps the path
    assert [r.endpoint for r in app.routes if getattr(r, "path", None) == "/v1/realtime"] == [speech]
    monkeypatch.delenv("DTD_STREAM_REALTIME")
    free = FastAPI()
    realtime.attach(free)
    assert [r.endpoint for r in free.routes if getattr(r, "path", None) == "/v1/realtime"] == [realtime.realtime]


def test_frames_without_timestamps_take_their_arrival_time_at_least_one_step_apart(app):
    svc = app.state.dtd_streams
    with TestClient(app) as client, _session(client) as ws:
        sid = ws.receive_json()["session"]["dtd"]["stream_id"]
        ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 2.0}}})
        sid = _until(ws, "session.updated")[-1]["session"]["dtd"]["stream_id"]
        for i in range(3):  # a burst: spaced 1/fps, as the HTTP route spaces frames without timestamps
            ws.send_json(_frames_item(1, start=i))
            _until(ws, "conversation.item.done")
        time.sleep(2.0)  # then a frame 2 s after the first one arrived: its arrival time
        ws.send_json(_frames_item(1, start=3))
        _until(ws, "conversation.item.done")
        stamps = svc.get(sid).store.timestamps
        assert stamps[:3] == [0.0, 0.5, 1.0]
        assert 2.0 <= stamps[3] < 3.5
