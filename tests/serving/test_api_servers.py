"""Streams under several API-server processes, over HTTP against a real server started the way a
user would: ``python -m vllm_plugin.serve --dtd-streams --data-parallel-size 2 --api-server-count 2``
(two engines, two API servers accepting on one port). Every request uses a fresh connection, so the
kernel spreads them over both processes; a stream must answer from either, and all its questions
must reach one engine (its prefix cache lives there)."""

import base64
import json
import time

import numpy as np
import pytest
import requests

from conftest import BLOCK_SIZE, generated_when_settled, serve_args
from vllm_plugin.media import encode_png

DP = 2


@pytest.fixture(scope="module")
def dp_server(tiny_model_path, media_dir, tmp_path_factory):
    from analysis.harness.server import VLLMServer

    log = tmp_path_factory.mktemp("logs") / "dp.log"
    args = serve_args(media_dir) + [
        "--dtd-streams",
        "--block-size",
        str(BLOCK_SIZE),
        "--data-parallel-size",
        str(DP),
        "--api-server-count",
        "2",
    ]
    with VLLMServer(tiny_model_path, args, module="vllm_plugin.serve", log_path=log) as srv:
        yield srv


def _post(url, **kw):
    with requests.Session() as fresh:  # a new connection each time
        return fresh.post(url, timeout=300, **kw)


def _get(url):
    with requests.Session() as fresh:
        return fresh.get(url, timeout=60)


def _frames(seed: int, n: int = 2):
    rng = np.random.default_rng(seed)
    return [
        {"image": base64.b64encode(encode_png(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))).decode()}
        for _ in range(n)
    ]


def _engine_prompt_tokens(srv) -> list[float]:
    text = _get(srv.base_url + "/metrics").text
    out = [0.0] * DP
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_total{"):
            engine = int(line.split('engine="', 1)[1].split('"', 1)[0])
            out[engine] += float(line.rsplit(" ", 1)[1])
    return out


def test_the_launcher_starts_the_api_servers_it_is_asked_for(dp_server):
    log = dp_server.log_path.read_text()
    assert "Started 2 API server processes" in log
    assert "API server 0 of 2" in log and "API server 1 of 2" in log


def _prefilled(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _get(url).json()["prefill_pending"]:
        assert time.monotonic() < deadline, "eager prefill did not catch up"
        time.sleep(0.2)


def test_a_stream_works_from_every_api_server_and_keeps_one_engine(dp_server):
    base = dp_server.base_url
    forwarded, owners, ranks = 0, set(), set()
    for k in range(3):
        r = _post(base + "/v1/streams", json={"fps": 2.0})
        assert r.status_code == 200, r.text
        st = r.json()
        sid, rank = st["id"], st["data_parallel_rank"]
        owners.add(st["api_server"])
        ranks.add(rank)
        url = f"{base}/v1/streams/{sid}"
        cached = []
        for q in range(3):
            for i in range(3):
                r = _post(url + "/frames", json={"frames": _frames(100 * k + 10 * q + i)})
                assert r.status_code == 200, r.text
                forwarded += "x-dtd-stream-owner" in r.headers
            _prefilled(
                url
            )  # eager prefill of the appended frames (on the same engine) is done: count the question only
            before = _engine_prompt_tokens(dp_server)
            if q == 1:  # SSE
                r = _post(
                    url + "/chat/completions",
                    stream=True,
                    json={"messages": [{"role": "user", "content": "what changed?"}], "max_tokens": 3, "stream": True},
                )
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
                usage = events[-1]["usage"]
            else:
                r = _post(
                    url + "/chat/completions",
                    json={"messages": [{"role": "user", "content": "what changed?"}], "max_tokens": 3},
                )
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
            forwarded += "x-dtd-stream-owner" in r.headers
            after = _engine_prompt_tokens(dp_server)
            moved = [a - b for a, b in zip(after, before)]
            # the question was prefilled on the stream's engine and nowhere else
            assert moved[rank] == usage["prompt_tokens"] and sum(moved) == moved[rank], (moved, rank, usage)
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        assert all(c > 0 for c in cached[1:]), cached  # the past came from that engine's prefix cache
        st = _get(url).json()
        assert st["frames"] == 18 and st["questions"] == 3
        assert _get(url + "/events").status_code == 200
        with requests.Session() as fresh:
            assert fresh.delete(url, timeout=60).status_code == 200
        assert _get(url).status_code == 404
    assert forwarded > 0, "no request reached the process not holding its stream: the test proved nothing"


def test_unknown_streams_are_404_on_every_process(dp_server):
    base = dp_server.base_url
    for sid in ("strm-1-" + "A" * 32, "strm-0-" + "B" * 32, "strm-7-" + "C" * 32, "strm-x"):
        for _ in range(4):
            r = _get(f"{base}/v1/streams/{sid}")
            assert r.status_code == 404, (sid, r.status_code, r.text[:200])


def test_a_forwarded_question_is_aborted_when_its_client_hangs_up(dp_server):
    base = dp_server.base_url

    for attempt in range(12):  # until one question went through the other process
        sid = _post(base + "/v1/streams", json={"fps": 2.0}).json()["id"]
        assert _post(f"{base}/v1/streams/{sid}/frames", json={"frames": _frames(attempt)}).status_code == 200
        g0 = dp_server.metric("vllm:generation_tokens_total")
        with requests.Session() as fresh:
            r = fresh.post(
                f"{base}/v1/streams/{sid}/chat/completions",
                stream=True,
                timeout=120,
                json={
                    "messages": [{"role": "user", "content": "go on"}],
                    "max_tokens": 12000,
                    "stream": True,
                    "ignore_eos": True,
                    "temperature": 1.0,
                },
            )
            via_peer = "x-dtd-stream-owner" in r.headers
            lines = r.iter_lines()
            assert next(lines).startswith(b"data: {")
            r.close()
        assert 0 < generated_when_settled(dp_server, within=80) - g0 < 12000
        assert _get(f"{base}/v1/streams/{sid}").json()["questions"] == 0
        with requests.Session() as fresh:
            assert fresh.delete(f"{base}/v1/streams/{sid}", timeout=60).status_code == 200
        if via_peer:
            return
    pytest.fail("no question of 12 went through the other API server (chance 1/4096): forwarding untested")


def test_streams_open_while_any_process_has_room(dp_server):
    """Stream caps are split between the processes (8 + 8 of the default 16); an open that lands on
    a full process is moved to one with room, so all 16 open, and the 17th is a 429."""
    base, ids = dp_server.base_url, []
    try:
        for _ in range(16):
            r = _post(base + "/v1/streams", json={"fps": 2.0})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        assert sorted({sid.split("-")[1] for sid in ids}) == ["0", "1"]
        r = _post(base + "/v1/streams", json={"fps": 2.0})
        assert r.status_code == 429 and "at most 16" in r.json()["error"]["message"], r.text
    finally:
        for sid in ids:
            with requests.Session() as fresh:
                fresh.delete(f"{base}/v1/streams/{sid}", timeout=60)


def test_a_realtime_stream_resumes_from_either_process(dp_server):
    """Realtime sockets land on either API-server process; a kept stream resumed by id is relayed to
    the process that holds it (``?stream_id=``), and works there as on a direct socket."""
    import asyncio

    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=dp_server.base_url + "/v1", api_key="unused", max_retries=0)
    frame = {"type": "input_image", "image_url": "data:image/png;base64," + _frames(7, 1)[0]["image"]}

    async def until(conn, kind):
        async for e in conn:
            assert e.type != "error", e
            if e.type == kind:
                return e

    async def run():
        sids = []
        for _ in range(8):
            async with client.realtime.connect(model=dp_server.model) as conn:
                await until(conn, "session.created")
                await conn.session.update(session={"dtd": {"keep_stream": True, "fps": 2.0}})
                sids.append((await until(conn, "session.updated")).session.dtd["stream_id"])
                await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [frame, frame]})
                await until(conn, "conversation.item.done")
        relayed = 0
        for round_ in range(2):
            for sid in sids:
                async with client.realtime.connect(model=dp_server.model, extra_query={"stream_id": sid}) as conn:
                    dtd = (await until(conn, "session.created")).session.dtd
                    assert dtd["stream_id"] == sid and dtd["stream"]["frames"] == 2 + round_
                    relayed += dtd["relayed_from"] is not None
                    await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [frame]})
                    await until(conn, "conversation.item.done")
                    if round_:
                        text = {"type": "input_text", "text": "what?"}
                        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [text]})
                        await conn.response.create(response={"max_output_tokens": 2})
                        assert (await until(conn, "response.done")).response.status in ("completed", "incomplete")
                        await conn.session.update(session={"dtd": {"keep_stream": False}})
                        await until(conn, "session.updated")
        return sids, relayed

    sids, relayed = asyncio.run(run())
    assert relayed > 0  # 16 resumes on random processes: some reached the other one and were relayed
    for sid in sids:
        deadline = time.time() + 10
        while _get(f"{dp_server.base_url}/v1/streams/{sid}").status_code != 404:
            assert time.time() < deadline, f"{sid} outlived its last socket"
            time.sleep(0.2)


def test_new_realtime_sockets_go_where_there_is_room(dp_server):
    """Each API-server process holds half of the server's streams (8 of 16 here). With API server 0
    full (8 HTTP streams), new sockets still land on either process; one reaching the full process is
    relayed to its peer, which opens the stream: all 8 open there; the next one gets an error event
    (429) and close code 1013."""
    import asyncio

    import websockets

    base = dp_server.base_url
    url = base.replace("http", "ws") + f"/v1/realtime?model={dp_server.model}"
    held = []  # HTTP streams on API server 0, until it is full
    try:
        for _ in range(100):
            r = _post(base + "/v1/streams", json={})
            assert r.status_code == 200, r.text
            sid = r.json()["id"]
            if sid.startswith("strm-0-"):
                held.append(sid)
            else:
                assert requests.delete(f"{base}/v1/streams/{sid}", timeout=30).ok
            if len(held) == 8:
                break
        assert len(held) == 8

        async def run():
            socks, owners, relayed = [], [], 0
            try:
                for _ in range(8):  # one after the other: each sees the streams the ones before opened
                    ws = await websockets.connect(url, max_size=None)
                    socks.append(ws)
                    created = json.loads(await ws.recv())
                    assert created["type"] == "session.created", created
                    owners.append(int(created["session"]["dtd"]["stream_id"].split("-")[1]))
                    relayed += created["session"]["dtd"]["relayed_from"] is not None
                ws = await websockets.connect(url, max_size=None)
                socks.append(ws)
                e = json.loads(await ws.recv())
                assert e["type"] == "error" and e["error"]["status"] == 429, e
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 1013
            finally:
                for ws in socks:
                    await ws.close()
            return owners, relayed

        owners, relayed = asyncio.run(run())
        # the kernel hands connections to either process: those reaching the full one were relayed
        assert owners == [1] * 8 and relayed > 0, (owners, relayed)
    finally:
        for sid in held:
            requests.delete(f"{base}/v1/streams/{sid}", timeout=30)
