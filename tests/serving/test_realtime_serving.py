"""The Realtime WebSocket (``/v1/realtime``) on a REAL vLLM server, driven by the official ``openai``
SDK (``AsyncOpenAI(...).realtime.connect``) with nothing but ``base_url`` set; answers compared
with the HTTP stream routes' on the same frames."""

import asyncio
import base64
import io
import json
import time

import pytest
import requests
from openai import AsyncOpenAI
from PIL import Image

from conftest import generated_when_settled
from vllm_plugin.client import open_stream
from vllm_plugin.media import encode_png

FPS = 2.0


def _data_uri(frame) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(frame)).decode()


def _sdk(srv) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def _connect(srv, **query):
    return _sdk(srv).realtime.connect(model=srv.model, extra_query=query)


async def _until(conn, *types: str) -> list:
    """Events until (and including) the first of ``types`` (SDK models)."""
    seen = []
    async for e in conn:
        seen.append(e)
        if e.type in types:
            return seen
    raise AssertionError(f"the socket closed before {types}: {[e.type for e in seen]}")


def _frame_item(frame, t: float) -> dict:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_image", "image_url": _data_uri(frame), "dtd": {"timestamp": t}}],
    }


def _image_item(url: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}


def _text_item(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def _ask(conn, question: str, max_tokens: int, **dtd) -> tuple[str, dict]:
    await conn.conversation.item.create(item=_text_item(question))
    await _until(conn, "conversation.item.done")
    await conn.response.create(response={"max_output_tokens": max_tokens, "dtd": {"return_token_ids": True, **dtd}})
    events = await _until(conn, "response.done")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.status in ("completed", "incomplete"), done
    return text, done


@pytest.mark.parametrize("criterion", ["pixel", "feature"])
def test_a_clip_played_frame_by_frame_answers_as_the_http_routes(dtd_server, synthetic_clip, criterion):
    frames = synthetic_clip.frames[:24]
    questions = {8: "What happens first?", 16: "And then?", 24: "What changed?"}
    # lazy: a question's chunk is every frame since the last one, on either route; eager chunks follow the
    # arrival of frames and the prefill's pace (the same frames sent otherwise make other video items)
    dtd = {"dtd_threshold": 0.05} if criterion == "pixel" else {"dtd_criterion": "feature"}
    settings = {**dtd, "prefill": "lazy"}

    async def realtime():
        answers = []
        async with _connect(dtd_server) as conn:
            created = await _until(conn, "session.created")
            assert created[-1].session.dtd["stream_id"]
            await conn.session.update(session={"type": "realtime", "dtd": {"fps": FPS, **settings}})
            updated = (await _until(conn, "session.updated"))[-1].session.dtd
            assert updated["stream"]["dtd"]["criterion"] == criterion
            for i, frame in enumerate(frames):
                await conn.conversation.item.create(item=_frame_item(frame, i / FPS))
                done = (await _until(conn, "conversation.item.done"))[-1]
                assert done.dtd["frames"] == i + 1  # acknowledged once held
                if i + 1 in questions:
                    answers.append(await _ask(conn, questions[i + 1], 4))
        return answers

    answers = asyncio.run(realtime())
    s = open_stream(dtd_server.base_url, fps=FPS, **settings)
    try:
        http = []
        for i in range(0, len(frames), 8):
            s.push(frames[i : i + 8], timestamps=[t / FPS for t in range(i, i + 8)])
            http.append(s.ask(questions[i + 8], max_tokens=4, return_token_ids=True))
    finally:
        s.close()
    for k, ((text, done), h) in enumerate(zip(answers, http)):
        state = done.dtd["stream_state"]
        assert state["prompt_token_ids"] == h["stream_state"]["prompt_token_ids"], k
        assert state["completion_token_ids"] == h["stream_state"]["completion_token_ids"], k
        assert text == h["choices"][0]["message"]["content"], k
        assert state["video_tokens_per_chunk"] == h["stream_state"]["video_tokens_per_chunk"], k
        assert done.usage.input_tokens == h["usage"]["prompt_tokens"]
        assert done.dtd["finish_reason"] == h["choices"][0]["finish_reason"]
        if k:  # the past comes from vLLM's prefix cache
            assert done.usage.input_token_details.cached_tokens > 0
            assert done.usage.input_token_details.cached_tokens >= sum(state["video_tokens_per_chunk"][:-1])


def test_bad_input_gets_error_events_and_the_socket_stays_usable(dtd_server, synthetic_clip):
    import websockets

    big = io.BytesIO()
    Image.new("RGB", (6000, 3000), (9, 9, 9)).save(big, format="PNG")  # 18 M pixels in ~50 KB: a bomb
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200).decode()
    bomb = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()

    async def run():
        url = dtd_server.base_url.replace("http", "ws") + f"/v1/realtime?model={dtd_server.model}"
        async with websockets.connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            sends = [
                "{this is not json",
                json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}),
                json.dumps({"type": "conversation.item.create", "item": _text_item("before any frame?")}),
                json.dumps({"type": "conversation.item.create", "item": _image_item(corrupt)}),
                json.dumps({"type": "conversation.item.create", "item": _image_item(bomb)}),
            ]
            statuses = []
            for raw in sends:
                await ws.send(raw)
                e = json.loads(await ws.recv())
                assert e["type"] == "error", (raw[:60], e)
                statuses.append((e["error"]["code"], e["error"]["status"]))
            assert statuses[:3] == [("invalid_json", 400), ("unknown_event", 400), ("no_frames", 400)]
            assert statuses[3][1] == 400 and statuses[4] == ("payload_too_large", 413)
            # the same socket, still usable
            for i in range(4):
                await ws.send(
                    json.dumps(
                        {"type": "conversation.item.create", "item": _frame_item(synthetic_clip.frames[i], i / FPS)}
                    )
                )
                assert json.loads(await ws.recv())["type"] == "conversation.item.added"
                assert json.loads(await ws.recv())["dtd"]["frames"] == i + 1
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("now?")}))
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
            while True:
                e = json.loads(await ws.recv())
                if e["type"] == "response.done":
                    assert e["response"]["status"] in ("completed", "incomplete")
                    assert e["response"]["usage"]["output_tokens"] >= 1
                    break
                assert e["type"] != "error", e

    asyncio.run(run())


def test_16_concurrent_sockets_lose_no_frame(dtd_server, synthetic_clip):
    frames = synthetic_clip.frames[:8]

    async def one(k: int) -> tuple[str, list[int]]:
        async with _connect(dtd_server) as conn:
            sid = (await _until(conn, "session.created"))[-1].session.dtd["stream_id"]
            held = []
            for i in range(0, len(frames), 2):  # two frames per item
                item = _frame_item(frames[i], i / FPS)
                item["content"].append(_frame_item(frames[i + 1], (i + 1) / FPS)["content"][0])
                await conn.conversation.item.create(item=item)
                done = [e for e in await _until(conn, "conversation.item.done", "error")][-1]
                assert done.type == "conversation.item.done", done
                held.append(done.dtd["frames"])
            status = requests.get(f"{dtd_server.base_url}/v1/streams/{sid}", timeout=30).json()
            assert status["frames"] == len(frames) and len(status["kept_per_step"]) == len(frames) // 2
            await conn.conversation.item.create(item=_text_item(f"socket {k}?"))
            await conn.response.create(response={"max_output_tokens": 2})
            done = (await _until(conn, "response.done"))[-1].response
            assert done.dtd["stream_state"]["frames"] == len(frames)
            return sid, held

    async def run():
        return await asyncio.gather(*(one(k) for k in range(16)))

    results = asyncio.run(run())
    assert len({sid for sid, _ in results}) == 16
    assert all(held == [2, 4, 6, 8] for _, held in results)
    for sid, _ in results:  # every socket closed: its stream too
        assert requests.get(f"{dtd_server.base_url}/v1/streams/{sid}", timeout=30).status_code == 404


def test_a_client_that_disconnects_mid_response_aborts_it_in_the_engine(dtd_server, synthetic_clip):
    max_tokens = 12000  # ~20 s here; only an abort ends it sooner (ignore_eos)

    async def run():
        async with _connect(dtd_server) as conn:
            sid = (await _until(conn, "session.created"))[-1].session.dtd["stream_id"]
            for i in range(4):
                await conn.conversation.item.create(item=_frame_item(synthetic_clip.frames[i], i / FPS))
                await _until(conn, "conversation.item.done")
            await conn.conversation.item.create(item=_text_item("tell a long story"))
            await conn.response.create(
                response={"max_output_tokens": max_tokens, "dtd": {"ignore_eos": True, "temperature": 1.0}}
            )
            await _until(conn, "response.output_text.delta")
        return sid  # the socket is closed here, mid-response

    generated = dtd_server.metric("vllm:generation_tokens_total")
    sid = asyncio.run(run())
    total = generated_when_settled(dtd_server, within=60) - generated
    assert 0 < total < max_tokens, f"{total} of {max_tokens} tokens generated: the answer was not aborted"
    assert requests.get(f"{dtd_server.base_url}/v1/streams/{sid}", timeout=30).status_code == 404


def test_keep_stream_survives_the_socket_and_resumes_with_proactive_events(dtd_server, synthetic_clip):
    """A kept stream outlives its socket; a new socket resumes it by id and sees what it raises from
    then on: scene changes and proactive answers (``dtd.*``), and a cancelled response."""

    async def run():
        async with _connect(dtd_server) as conn:
            sid = (await _until(conn, "session.created"))[-1].session.dtd["stream_id"]
            await conn.session.update(
                session={
                    "dtd": {
                        "keep_stream": True,
                        "fps": FPS,
                        "dtd_threshold": 0.05,
                        "standing_question": "what changed?",
                        "answer_max_tokens": 2,
                    }
                }
            )
            sid = (await _until(conn, "session.updated"))[-1].session.dtd["stream_id"]
            await conn.conversation.item.create(item=_frame_item(synthetic_clip.frames[0], 0.0))
            await _until(conn, "conversation.item.done")
        async with _connect(dtd_server, stream_id=sid) as conn:
            created = (await _until(conn, "session.created", "error"))[-1]
            assert created.type == "session.created" and created.session.dtd["stream"]["frames"] == 1
            kinds = set()
            for i in range(1, 34):  # the clip cuts to new scenes at steps 12 and 16
                await conn.conversation.item.create(item=_frame_item(synthetic_clip.frames[i], i / FPS))
                kinds |= {e.type for e in await _until(conn, "conversation.item.done")}
            while "dtd.proactive_answer" not in kinds:  # answered in the background, then sent
                kinds |= {(await asyncio.wait_for(conn.recv(), 120)).type}
            assert "dtd.scene_change" in kinds
            await conn.conversation.item.create(item=_text_item("a long one"))
            await conn.response.create(response={"max_output_tokens": 12000, "dtd": {"ignore_eos": True}})
            await _until(conn, "response.output_text.delta")
            await conn.response.cancel()
            done = (await _until(conn, "response.done"))[-1].response
            assert done.status == "cancelled"
            await conn.session.update(session={"dtd": {"keep_stream": False}})
            await _until(conn, "session.updated")
        return sid

    sid = asyncio.run(run())
    for _ in range(50):
        if requests.get(f"{dtd_server.base_url}/v1/streams/{sid}", timeout=30).status_code == 404:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the stream outlived a socket that no longer kept it")


def test_the_example_scripts_play_a_clip_with_the_same_decisions(dtd_server, real_clip_mp4):
    """``python -m analysis.cli.realtime_example`` (the socket, the SDK) and ``stream_example`` (HTTP)
    play the same clip with the same settings: answers with cached prompts, the same kept tokens."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    kept = []
    for example in ("realtime_example", "stream_example"):
        args = ["--url", dtd_server.base_url, "--video", str(real_clip_mp4), "--speed", "0", "--ask-every", "3"]
        out = subprocess.run(
            [sys.executable, "-m", f"analysis.cli.{example}", *args, "--threshold", "0.05"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        answers = re.findall(r"ttft +\d+ ms \| prompt +(\d+) tokens, +(\d+) from cache", out.stdout)
        assert len(answers) >= 2 and int(answers[-1][1]) > 0, out.stdout
        kept.append(json.loads(re.search(r"kept tokens per temporal step: (\[[\d, ]+\])", out.stdout).group(1)))
    assert kept[0] == kept[1] and kept[0][0] > 0
