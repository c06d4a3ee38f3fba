"""The Realtime WebSocket (``/v1/realtime``) reviewed as an attacker and as an operator: what one client
can make a socket hold, streams and caps around a socket's life (settings reopening a stream, a stream
closed or expired under an open socket, a resume racing a socket's end), event order around a
cancellation, the relay to another API-server process (:class:`vllm_plugin.streams.forward.StreamForwarder`),
and what the official SDKs need of the handshake. FastAPI's test client drives the real route and session;
the engine is a fake (see tests/unit/test_realtime_units.py)."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect, WebSocketState
from test_realtime_units import SlowEngine, _alive, _frames_item, _question, _session, _until

from vllm_plugin.streams import forward, realtime
from vllm_plugin.streams.events import EventLog
from vllm_plugin.streams.service import MAX_CHARS_PER_TOKEN, StreamService
from vllm_plugin.streams.session import Limits, StreamManager


def _app(model_path, **limits) -> FastAPI:
    app = FastAPI()
    app.include_router(realtime.router)
    limits = {"max_streams": 3, **limits}
    app.state.dtd_streams = StreamService(SlowEngine(model_path), StreamManager(Limits(**limits)))
    return app


@pytest.fixture
def app(tiny_model_path):
    return _app(tiny_model_path)


@pytest.fixture
def sessions(monkeypatch):
    """The :class:`realtime.RealtimeSession` of every socket the test opens."""
    made = []

    class Recorded(realtime.RealtimeSession):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(realtime, "RealtimeSession", Recorded)
    return made


def _wait(predicate, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        time.sleep(0.02)
    return False


# -- what one client can make a socket hold ---------------------------------------------------------------
def test_a_socket_holds_a_bounded_number_of_items_whatever_the_client_sends(app, sessions, monkeypatch):
    monkeypatch.setattr(realtime, "MAX_ITEMS", 8, raising=False)
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        # an item id is short: a 1 MiB id is refused (it would be kept for the socket's life)
        long_id = _question("hello?", "x" * 2**20)
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        ws.send_json(long_id)
        e = _until(ws, "error", "conversation.item.done")[-1]
        assert e["type"] == "error" and e["error"]["code"] == "invalid_item" and e["error"]["param"] == "item.id", e
        ws.send_json({**_question("not a string"), "item": {**_question("x")["item"], "id": ["a"]}})
        e = _until(ws, "error", "conversation.item.done")[-1]
        assert e["type"] == "error" and e["error"]["param"] == "item.id" and "string" in e["error"]["message"], e
        # frames and answered turns over hours: the items a socket remembers stay bounded, pending
        # questions are never forgotten, answered ones keep no text
        ws.send_json(_question("the first question", "q-first"))
        _until(ws, "conversation.item.done")
        for i in range(12):
            ws.send_json(_frames_item(1, start=10 + i))
            _until(ws, "conversation.item.done")
        ws.send_json(_question("the second question", "q-second"))
        _until(ws, "conversation.item.done")
        session = sessions[0]
        assert len(session.items) <= 8 and {"q-first", "q-second"} <= set(session.items)
        ws.send_json({"type": "response.create"})
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"
        for i in range(12):
            ws.send_json(_question(f"q{i}"))
            ws.send_json({"type": "response.create"})
            _until(ws, "response.done")
        assert len(session.items) <= 8
        assert all(not item.get("text") for item in session.items.values())  # answered: no text kept


def test_questions_waiting_for_a_response_are_bounded(app, monkeypatch):
    """Questions are kept until a response.create answers them together: their number, and their text
    together (it must fit the context, as one question must), are bounded."""
    monkeypatch.setattr(realtime, "MAX_PENDING_QUESTIONS", 4, raising=False)
    svc = app.state.dtd_streams
    limit = MAX_CHARS_PER_TOKEN * svc.max_model_len
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        for i in range(4):
            ws.send_json(_question(f"question {i}"))
            assert _until(ws, "conversation.item.done", "error")[-1]["type"] == "conversation.item.done"
        ws.send_json(_question("one too many"))
        e = _until(ws, "error", "conversation.item.done")[-1]
        assert e["type"] == "error" and e["error"]["status"] == 400, e
        ws.send_json({"type": "response.create"})  # the four are answered together
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"
        half = "x" * (limit // 2 + 1)
        svc.check_text(half, "probe")  # one alone fits
        ws.send_json(_question(half))
        assert _until(ws, "conversation.item.done", "error")[-1]["type"] == "conversation.item.done"
        ws.send_json(_question(half))
        e = _until(ws, "error", "conversation.item.done")[-1]
        assert e["type"] == "error" and e["error"]["status"] == 400, e["type"]


# -- streams and caps around a socket's life ----------------------------------------------------------------
def test_settings_can_change_on_a_full_server(app):
    """session.update reopens the socket's (empty) stream: at a full server it reuses the stream's own
    slot instead of answering 429 (the SDK's first move after connecting is a session.update)."""
    svc = app.state.dtd_streams
    with TestClient(app) as client:
        socks = [_session(client) for _ in range(3)]  # max_streams=3
        opened = [s.__enter__() for s in socks]
        try:
            for ws in opened:
                assert ws.receive_json()["type"] == "session.created"
            for ws in opened:
                ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 4.0}}})
                e = _until(ws, "session.updated", "error")[-1]
                assert e["type"] == "session.updated", e
                assert e["session"]["dtd"]["stream"]["fps"] == 4.0
            assert len(svc.manager) == 3
        finally:
            for s in socks:
                s.__exit__(None, None, None)


def test_a_reopened_stream_is_the_one_attached_to_the_socket(app):
    with TestClient(app) as client:
        with _session(client) as ws:
            old = ws.receive_json()["session"]["dtd"]["stream_id"]
            ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 4.0, "keep_stream": True}}})
            new = _until(ws, "session.updated")[-1]["session"]["dtd"]["stream_id"]
            assert new != old
            assert new in realtime.ATTACHED and old not in realtime.ATTACHED
            with _session(client, stream_id=new) as other:  # one socket per stream: the reopened one too
                assert other.receive_json()["error"]["code"] == "stream_attached"
        assert _wait(lambda: new not in realtime.ATTACHED)
        assert old not in realtime.ATTACHED


def test_a_stream_closed_under_an_open_socket_takes_nothing_more(app):
    """DELETE /v1/streams/{id} (or the idle sweep) while a socket holds the stream: the socket must not
    go on appending to a stream no cap counts any more (max_streams, the server's bytes)."""
    svc = app.state.dtd_streams
    with TestClient(app) as client, _session(client) as ws:
        sid = ws.receive_json()["session"]["dtd"]["stream_id"]
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        svc.manager.close(sid)  # as DELETE /v1/streams/{id} does
        assert svc.manager.bytes.held == 0
        ws.send_json(_frames_item(2, start=5))
        e = ws.receive_json()  # not an acknowledgement: the stream is gone, and so is the session
        assert e["type"] == "error" and e["error"]["status"] == 404, e
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
        assert svc.manager.bytes.held == 0 and not _alive(svc, sid)


def test_an_open_socket_keeps_its_stream_from_expiring(tiny_model_path):
    """A stream expires after ``idle_seconds`` with no request; an open socket is its client, there."""
    app = _app(tiny_model_path, idle_seconds=0.5)
    svc = app.state.dtd_streams
    with TestClient(app) as client, _session(client) as ws:
        sid = ws.receive_json()["session"]["dtd"]["stream_id"]
        ws.send_json(_frames_item(2, timestamps=True))
        _until(ws, "conversation.item.done")
        time.sleep(1.2)  # the client thinks
        svc.manager.sweep()
        assert _alive(svc, sid)
        ws.send_json(_question("still there?"))
        ws.send_json({"type": "response.create"})
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"
    assert _wait(lambda: not _alive(svc, sid))


def test_a_resume_while_the_socket_is_ending_does_not_get_a_stream_being_closed(app, monkeypatch):
    svc = app.state.dtd_streams
    closing = threading.Event()
    close = svc.close

    async def slow_close(stream_id):
        closing.set()
        await asyncio.sleep(0.5)
        await close(stream_id)

    monkeypatch.setattr(svc, "close", slow_close)
    with TestClient(app) as client:
        with _session(client) as ws:
            sid = ws.receive_json()["session"]["dtd"]["stream_id"]
            ws.send_json(_frames_item(2, timestamps=True))
            _until(ws, "conversation.item.done")
        assert closing.wait(10)  # the socket's end is closing its stream (keep_stream is false)
        with _session(client, stream_id=sid) as other:
            e = other.receive_json()
            assert e["type"] == "error" and e["error"]["status"] in (404, 409), e
        assert _wait(lambda: not _alive(svc, sid) and sid not in realtime.ATTACHED)


def test_a_client_resending_its_session_after_frames_is_not_refused(app):
    """The same settings again (an SDK re-sending its session on reconnect, the defaults spelled out)
    change nothing: no 409, and the rest of the update (keep_stream) applies."""
    svc = app.state.dtd_streams
    with TestClient(app) as client:
        with _session(client) as ws:
            ws.receive_json()
            ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 4.0, "keep_stream": True}}})
            sid = _until(ws, "session.updated")[-1]["session"]["dtd"]["stream_id"]
            ws.send_json(_frames_item(2, timestamps=True))
            _until(ws, "conversation.item.done")
            ws.send_json({"type": "session.update", "session": {"instructions": None, "dtd": {"fps": 4.0}}})
            assert _until(ws, "session.updated", "error")[-1]["type"] == "session.updated"
        assert _wait(lambda: sid not in realtime.ATTACHED)
        with _session(client, stream_id=sid) as ws:
            ws.receive_json()
            ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 4.0, "keep_stream": False}}})
            e = _until(ws, "session.updated", "error")[-1]
            assert e["type"] == "session.updated" and e["session"]["dtd"]["keep_stream"] is False, e
            ws.send_json({"type": "session.update", "session": {"dtd": {"fps": 3.0}}})  # other settings: 409
            assert _until(ws, "error")[-1]["error"]["status"] == 409
        assert _wait(lambda: not _alive(svc, sid))


def test_items_follow_one_another_as_openai_links_them(app):
    """``previous_item_id`` "root" is the start of the conversation (OpenAI's SDK), and an item's
    acknowledgement names the item before it, whether the client named it or not."""
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json({**_frames_item(2, timestamps=True), "previous_item_id": "root"})
        first = _until(ws, "conversation.item.done", "error")[-1]
        assert first["type"] == "conversation.item.done" and first["previous_item_id"] is None, first
        ws.send_json(_question("what?"))
        second = _until(ws, "conversation.item.done")[-1]
        assert second["previous_item_id"] == first["item"]["id"]
        ws.send_json({**_question("again?"), "previous_item_id": "root"})  # not the start any more
        assert _until(ws, "error", "conversation.item.done")[-1]["error"]["param"] == "previous_item_id"


# -- malformed events -----------------------------------------------------------------------------------------
def test_malformed_events_are_the_clients_mistake_not_a_server_error(app):
    with TestClient(app) as client, _session(client) as ws:
        sid = ws.receive_json()["session"]["dtd"]["stream_id"]
        ws.send_text("[" * 100_000)  # nested past the parser's recursion limit
        e = ws.receive_json()["error"]
        assert (e["status"], e["code"]) == (400, "invalid_json"), e
        ws.send_json({"type": "session.update", "session": {"output_modalities": 5}})
        e = ws.receive_json()["error"]
        assert e["status"] == 400 and e["param"] == "session.output_modalities", e
        ws.send_json({"type": "session.update", "session": {"dtd": {"keep_stream": "false"}}})
        e = ws.receive_json()
        assert e["type"] == "error" and e["error"]["param"] == "session.dtd.keep_stream", e
        ws.send_json({"type": "session.update", "session": {}})
        assert _until(ws, "session.updated")[-1]["session"]["dtd"]["keep_stream"] is False
    assert _wait(lambda: not _alive(app.state.dtd_streams, sid))


def test_an_unexpected_failure_is_logged_and_its_details_stay_on_the_server(app, monkeypatch, caplog):
    async def broken(self, event):
        raise KeyError("/srv/secret/path")

    monkeypatch.setitem(realtime.RealtimeSession.HANDLERS, "conversation.item.delete", broken)
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json({"type": "conversation.item.delete", "item_id": "x", "event_id": "c9"})
        e = ws.receive_json()["error"]
        assert e["status"] == 500 and e["event_id"] == "c9"
        assert "secret" not in json.dumps(e) and "KeyError" not in json.dumps(e)
        ws.send_json(_frames_item(2, timestamps=True))  # still usable
        assert _until(ws, "conversation.item.done")[-1]["dtd"]["frames"] == 2
    assert any(r.exc_info and "secret" in str(r.exc_info[1]) for r in caplog.records)


def test_a_forged_relay_header_does_not_break_the_socket():
    """Headers are latin-1: "\xb2" (superscript two) is a digit to ``str.isdigit`` and no number to ``int``."""
    for value in ("\xb2", "x", "-1"):
        sock = _Socket()
        sock.headers = {"x-dtd-forwarded-from": value}
        assert realtime.RealtimeSession(sock, None, "tiny").relayed_from is None
    sock.headers = {"x-dtd-forwarded-from": "2"}
    assert realtime.RealtimeSession(sock, None, "tiny").relayed_from == 2


# -- what the SDKs need of the handshake ----------------------------------------------------------------------
def test_the_realtime_subprotocol_is_accepted(app):
    """OpenAI's browser SDK offers the subprotocols ``realtime`` and ``openai-insecure-api-key.<key>``; a
    browser fails a handshake whose answer names none of those it offered."""
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime?model=tiny", subprotocols=["realtime", "openai-x.k"]) as ws:
            assert ws.accepted_subprotocol == "realtime"
            assert ws.receive_json()["type"] == "session.created"
        with client.websocket_connect("/v1/realtime?model=tiny") as ws:  # none offered: none chosen
            assert ws.accepted_subprotocol is None
            assert ws.receive_json()["type"] == "session.created"


# -- event order --------------------------------------------------------------------------------------------
class _Socket:
    """A socket for :class:`realtime.RealtimeSession` alone: records what is sent, slowly."""

    headers: dict = {}
    application_state = WebSocketState.CONNECTED

    def __init__(self):
        self.sent: list[dict] = []

    async def send_text(self, text):
        await asyncio.sleep(0.01)
        self.sent.append(json.loads(text))


def test_the_streams_events_go_out_once_each_in_order():
    """The event watcher, an item's acknowledgement and a response's end all flush the stream's events:
    concurrent flushes must not send one twice."""
    ws = _Socket()
    session = realtime.RealtimeSession(ws, None, "tiny")
    log = EventLog()
    for step in (1, 2, 3):
        log.add({"type": "scene_change", "step": step})
    session.stream = SimpleNamespace(id="strm-0-x", events=log)

    async def main():
        await asyncio.gather(session.flush_events(), session.flush_events(), session.flush_events())

    asyncio.run(main())
    assert [e["index"] for e in ws.sent] == [0, 1, 2]
    assert {e["type"] for e in ws.sent} == {"dtd.scene_change"}


def test_a_cancel_as_the_answer_ends_still_gets_its_response_done(app, sessions, monkeypatch):
    """response.cancel reaching the server after the last token, while the answer's closing events go
    out: every response.created gets its response.done (the SDK waits for it)."""
    send = realtime.RealtimeSession.send
    fired = []

    async def send_then_cancel(self, event):
        if event["type"] == "response.output_text.done" and not fired:
            fired.append(True)
            self.response.cancel()  # what response.cancel does, at this moment
            # a marker a while later: a response.done must come before it
            later = asyncio.get_running_loop().call_later
            later(2.0, lambda: asyncio.ensure_future(send(self, {"type": "test.marker"})))
            await asyncio.sleep(0.05)
        return await send(self, event)

    monkeypatch.setattr(realtime.RealtimeSession, "send", send_then_cancel)
    with TestClient(app) as client, _session(client) as ws:
        ws.receive_json()
        ws.send_json(_frames_item(2, timestamps=True))
        ws.send_json(_question("what?"))
        ws.send_json({"type": "response.create"})
        events = _until(ws, "response.done", "test.marker")
        assert fired and events[-1]["type"] == "response.done", [e["type"] for e in events]
        done = events[-1]["response"]
        assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "a cat"
        # the next response follows
        ws.send_json(_question("and now?"))
        ws.send_json({"type": "response.create"})
        assert _until(ws, "response.done")[-1]["response"]["status"] == "completed"


def test_response_cancel_does_not_swallow_the_handlers_own_cancellation():
    session = realtime.RealtimeSession(_Socket(), None, "tiny")

    async def respond():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # sends response.done, closes the generator

    async def main():
        session.response = asyncio.get_running_loop().create_task(respond())
        await asyncio.sleep(0)
        handler = asyncio.get_running_loop().create_task(session.response_cancel({}))
        await asyncio.sleep(0.05)
        handler.cancel()  # the server ends the handler (shutting down)
        await asyncio.wait([handler])
        return handler.cancelled()

    assert asyncio.run(main())


# -- the relay to another API-server process -----------------------------------------------------------------
class _Peer:
    """The owner process's end of a relayed socket (websockets' client connection, faked)."""

    def __init__(self, messages=(), close_code=1000, dies=False):
        self.messages, self.close_code, self.dies = list(messages), close_code, dies
        self.sent: list = []
        self.closed = False

    async def send(self, msg):
        self.sent.append(msg)

    async def __aiter__(self):
        from websockets.exceptions import ConnectionClosedError

        for m in self.messages:
            yield m
        if self.dies:
            raise ConnectionClosedError(None, None)

    async def close(self):
        self.closed = True


def _relay(monkeypatch, peer, sent, send=None, subprotocols=()):
    import websockets.asyncio.client as ws_client

    async def unix_connect(path, url, **kw):
        peer.url, peer.kw = url, kw
        return peer

    monkeypatch.setattr(ws_client, "unix_connect", unix_connect)
    scope = {
        "type": "websocket",
        "path": "/v1/realtime",
        "query_string": b"model=tiny&stream_id=strm-1-abc",
        "headers": [(b"host", b"x"), (b"authorization", b"Bearer k"), (b"sec-websocket-protocol", b"realtime")],
        "subprotocols": list(subprotocols),
    }

    async def receive():
        if not sent:
            return {"type": "websocket.connect"}
        await asyncio.sleep(3600)  # the client says nothing

    async def record(msg):
        sent.append(msg)

    peers = SimpleNamespace(index=0, count=2, path=lambda i: f"/nowhere/api{i}.sock")
    relay = forward.StreamForwarder(None)
    return asyncio.wait_for(relay._forward_socket(peers, 1, scope, receive, send or record), 5)


def test_a_relayed_socket_whose_owner_process_dies_ends_with_a_code_a_client_can_receive(monkeypatch):
    """1006 ("no close frame": the peer's process died) and 1005 are reserved: never sent on the wire."""
    sent: list = []
    peer = _Peer(['{"type": "session.created"}'], close_code=1006, dies=True)
    asyncio.run(_relay(monkeypatch, peer, sent))
    assert sent[0]["type"] == "websocket.accept" and sent[1] == {"type": "websocket.send", "text": peer.messages[0]}
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] not in (1005, 1006, 1015), sent[-1]
    assert peer.closed
    assert ("x-dtd-forwarded-from", "0") in peer.kw["additional_headers"]
    assert not any(k.lower() in ("host", "sec-websocket-protocol") for k, _ in peer.kw["additional_headers"])


def test_a_relayed_socket_accepts_the_realtime_subprotocol(monkeypatch):
    sent: list = []
    asyncio.run(_relay(monkeypatch, _Peer(), sent, subprotocols=["realtime", "openai-insecure-api-key.k"]))
    assert sent[0] == {"type": "websocket.accept", "subprotocol": "realtime"}


def test_a_relay_whose_client_is_gone_at_the_handshake_closes_its_peer_connection(monkeypatch):
    peer = _Peer()

    async def gone(msg):
        raise OSError("client gone")

    with pytest.raises(OSError):
        asyncio.run(_relay(monkeypatch, peer, [], send=gone))
    assert peer.closed  # else the owner's socket (and its stream's attachment) stays open
