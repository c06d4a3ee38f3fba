"""Re-anchoring off the question's path (issue 29, item 2), reviewed against a fake engine: what a
question answered while a re-anchor is prefilled ahead may send, what the switch leaves (items and
placeholders, frames and bytes), and what the prefill task does around it."""

import asyncio

import numpy as np
import pytest
from fake_engine import FakeEngine, request_kind, until

from vllm_plugin.entrypoints.options import GIVEN_MASK
from vllm_plugin.streams.session import Limits, StreamManager

TPS = 2


class Engine(FakeEngine):
    """An engine with no model behind it (the tiny checkpoint's tokenizer and template; every answer is
    "a cat"). It checks what the served processor would: one placeholder per video item, and the
    positions the items span beyond their tokens within :attr:`position_room` (a ValueError, as vLLM's
    processor refuses such a prompt). Re-anchor prefills (``…-reanchor…``) wait for :attr:`gate`, questions
    (``…-q…``) for :attr:`question_gate`; :attr:`fail` names request ids that end in an error."""

    def __init__(self, model_path, max_model_len=4096):
        super().__init__(model_path, max_model_len)
        self.positions_per_step: int | None = None  # None: a step spans as few positions as it has tokens
        self.gate: asyncio.Event | None = None
        self.question_gate: asyncio.Event | None = None
        self.fail = lambda request_id: False
        self.sent: list[tuple[str, dict]] = []
        self.refused: list[str] = []

    def item_positions(self, steps, h, w, fps):
        if self.positions_per_step is not None:
            return steps * self.positions_per_step
        return int((steps - 1) * self.step_positions(fps)) + max(h, w)

    def extra(self, prompt) -> int:
        out = 0
        for _, meta in prompt.get("multi_modal_data", {}).get("video", []):
            mask = np.asarray(meta[GIVEN_MASK])
            out += self.item_positions(mask.shape[0], mask.shape[1], mask.shape[2], 2.0) - max(1, int(mask.sum()))
        return out

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        self.sent.append((request_id, prompt))
        items = prompt.get("multi_modal_data", {}).get("video", [])
        if prompt["prompt_token_ids"].count(self.video_pad) != len(items):
            self.refused.append(request_id)
            raise ValueError("placeholders and items differ")
        if self.extra(prompt) > self.position_room:
            self.refused.append(request_id)
            raise ValueError("this request's M-RoPE positions could pass the rotary table")
        kind = request_kind(request_id)
        gate = self.gate if kind == "reanchor" else self.question_gate if kind == "q" else None
        if gate is not None:
            await gate.wait()
        if self.fail(request_id):
            raise RuntimeError("the engine failed this request")
        async for out in super().generate(prompt, params, request_id, data_parallel_rank):
            yield out


def _service(tiny_model_path, **limits):
    from vllm_plugin.streams.service import StreamService

    return StreamService(Engine(tiny_model_path), StreamManager(Limits(max_streams=4, **limits)))


def _open(svc, **memory):
    from vllm_plugin.streams.routes import OpenStreamRequest

    memory = {"keep": "recent", "context_tokens": 800, "keep_turns": 1, **memory}
    return svc.open(svc.settings(OpenStreamRequest(fps=2.0, memory=memory)))


async def _pending(svc, stream, frames):
    """Append 8 frames at a time, letting the eager prefill run, until a re-anchor is prefilled ahead
    (held at the engine's gate). Returns the frames appended."""
    n = 0
    while stream.reanchoring is None:
        assert n < len(frames), "no re-anchor was planned"
        await svc.append(stream, list(frames[n : n + 8]))
        n += 8
        await until(lambda: stream.reanchoring is not None or stream.prefill_task is None)
    return n


def _consistent(svc, stream) -> None:
    """The conversation after a switch: one placeholder per item, every frame before the next chunk
    held by an item or freed, and the bytes the stream and the server count are the frames it holds."""
    conv, store = stream.conversation, stream.store
    placeholders = conv.prompt.video_prefix(conv.prompt.open_videos).count(svc.engine.video_pad)
    assert placeholders == len(conv.chunks), (placeholders, conv.chunks)
    held = {i for a, b in conv.chunks for i in range(a, b)}
    assert all((f is None) == (i not in held) for i, f in enumerate(store.frames[: conv.next_frame]))
    assert all(f is not None for f in store.frames[conv.next_frame :])
    assert store.nbytes == sum(f.nbytes for f in store.frames if f is not None)
    assert svc.manager.bytes.held == store.nbytes


# --- findings -------------------------------------------------------------------------------------


def test_a_question_answered_on_the_old_conversation_stays_within_the_rotary_table(tiny_model_path, synthetic_clip):
    """old_can_take checks the positions the conversation's items span, not those of the frames the
    question brings: a question whose new chunk takes the old conversation past the rotary table must
    wait for the switch (as before the change it re-anchored), not be refused by the processor (400)."""
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = _open(svc)
        n = await _pending(svc, stream, frames)
        # from now on every step spans 100 positions: the old conversation fills 3/4 of the room
        engine.positions_per_step = 100
        old = svc.extra_positions(stream)
        engine.position_room = -(-old * 4 // 3) + 4
        assert svc.old_can_take(stream, 64)  # the conversation as it is may take a question with no frames
        await svc.append(stream, list(frames[n : n + 32]))  # 16 steps: more than the room left
        asked = asyncio.ensure_future(svc.answer(stream, "What now?", max_tokens=4))
        await asyncio.sleep(0.3)
        engine.gate.set()
        r = await asyncio.wait_for(asked, 10)
        assert r["choices"][0]["message"]["content"] == "a cat"
        assert engine.refused == []

    asyncio.run(run())


def test_questions_during_an_ahead_prefill_do_not_leave_the_next_re_anchor_on_the_lock(tiny_model_path, synthetic_clip):
    """Questions answered while a re-anchor is prefilled ahead add chunks and turns to what the switch
    carries; when that leaves the conversation due again, the prefill task must plan the next re-anchor
    ahead too. It does not (``ahead_at`` is the frame after the switch): _prefill_prompt re-anchors
    under the stream's lock, where a question waits for its prefill (and no ``reanchor_wait_s`` says so)."""
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = _open(svc)
        conv = stream.conversation
        n = await _pending(svc, stream, frames)
        plan = stream.reanchoring
        budget = svc.budget(stream)
        # questions on the old conversation until what the switch carries leaves it due again
        for i in range(40):
            carried = sum(svc.item_cost(stream, c) for c in conv.chunks[plan.chunks :])
            if plan.anchor.tokens + carried + 16 * (i + 1) > budget - 160:
                break
            await svc.append(stream, list(frames[n : n + 8]))
            n += 8
            r = await svc.answer(stream, f"q{i}?", max_tokens=4)
            assert r["stream_state"]["answered_during_reanchor"] is True
        else:
            raise AssertionError("the questions never carried enough")
        await svc.append(stream, list(frames[n : n + 8]))  # a chunk that waits for the prefill task
        engine.gate.set()
        await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
        anchors = [e for e in stream.events if e["type"] == "reanchor"]
        assert len(anchors) >= 2
        assert [e["prefilled_s"] is not None for e in anchors] == [True] * len(anchors), anchors
        _consistent(svc, stream)

    asyncio.run(run())


def test_a_stream_closed_during_the_ahead_prefill_sends_the_engine_no_more_pieces(
    tiny_model_path, synthetic_clip, monkeypatch
):
    """A stream closed while its re-anchor is prefilled ahead: the pieces not sent yet are work for
    nobody (the switch is skipped); a question waiting for the switch is released."""
    from vllm_plugin.streams import service

    monkeypatch.setattr(service, "AHEAD_PIECE_TOKENS", 16)  # one item a piece
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = _open(svc)
        await _pending(svc, stream, frames)
        plan = stream.reanchoring
        assert len(svc.ahead_pieces(stream, plan.anchor.ranges)) >= 3
        monkeypatch.setattr(svc, "old_can_take", lambda stream, room: False)
        waiting = asyncio.ensure_future(svc.answer(stream, "Still there?", max_tokens=4))
        await asyncio.sleep(0.1)
        await svc.close(stream.id)
        engine.gate.set()
        await until(lambda: stream.prefill_task is None and plan.done.is_set())
        pieces = [rid for rid, _ in engine.sent if request_kind(rid) == "reanchor"]
        assert len(pieces) == 1, pieces  # the one in flight when the stream closed
        await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 10)

    asyncio.run(run())


def test_an_engine_timeout_of_zero_is_refused_or_means_no_timeout(tiny_model_path, synthetic_clip):
    """DTD_STREAM_ENGINE_TIMEOUT_S=0 is accepted (the float settings' minimum is 0), and then every stream
    request 'times out' at once (asyncio.wait_for(..., 0)): the setting must refuse it, or 0 must mean
    no timeout."""
    from vllm_plugin.settings import SettingsError
    from vllm_plugin.streams.routes import OpenStreamRequest
    from vllm_plugin.streams.service import StreamService

    try:
        limits = Limits.from_env({"DTD_STREAM_ENGINE_TIMEOUT_S": "0"})
    except SettingsError:
        return
    svc = StreamService(Engine(tiny_model_path), StreamManager(limits))

    async def run():
        stream = svc.open(svc.settings(OpenStreamRequest(fps=2.0, prefill="lazy")))
        await svc.append(stream, list(synthetic_clip.frames[:8]))
        r = await svc.answer(stream, "Hello?", max_tokens=4)
        assert r["choices"][0]["message"]["content"] == "a cat"

    asyncio.run(run())


def test_frames_decided_between_the_prefill_s_check_and_its_cut_do_not_put_the_re_anchor_on_the_lock(
    tiny_model_path, synthetic_clip
):
    """The prefill task checks whether a re-anchor is due with the next chunk (next_chunk_cost: the steps
    decided then), then cuts the chunk (_cut_into: the steps decided by then). An append's thread lands
    between the two: the chunk is bigger than the check measured, and _prefill_prompt re-anchors under
    the lock instead of ahead. Here an append lands in that window at every check."""
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    n = [0]
    plan_reanchor = svc.plan_reanchor

    def with_an_append_meanwhile(stream, incoming, trigger, cut=False):
        plan = plan_reanchor(stream, incoming, trigger, cut)
        if trigger == "prefill" and not cut and plan is None and n[0] + 8 <= len(frames):
            stream.add_frames(list(frames[n[0] : n[0] + 8]))  # as an append's thread may, meanwhile
            n[0] += 8
        return plan

    svc.plan_reanchor = with_an_append_meanwhile

    async def run():
        stream = _open(svc)
        while n[0] + 8 <= len(frames):
            await svc.append(stream, list(frames[n[0] : n[0] + 8]))
            n[0] += 8
            await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
        anchors = [e for e in stream.events if e["type"] == "reanchor"]
        assert anchors and [e["prefilled_s"] is not None for e in anchors] == [True] * len(anchors)

    asyncio.run(run())


def test_an_eager_stream_asked_while_no_frame_arrives_does_not_stay_past_its_budget(tiny_model_path, synthetic_clip):
    """A question that takes an eager stream past its budget is answered on the conversation as it is,
    "the re-anchor follows ahead by its next prefill". When no frame arrives (a client that paused its
    frames and keeps asking) there is no next prefill: every question is deferred again and the
    conversation grows far past its budget, until the model's context no longer takes it and a
    question re-anchors on its own path. The re-anchor must follow ahead without new frames too."""
    frames = np.concatenate([synthetic_clip.frames] * 2)
    svc = _service(tiny_model_path)

    async def run():
        stream = _open(svc)
        conv = stream.conversation
        for a in range(0, 48, 8):
            await svc.append(stream, list(frames[a : a + 8]))
            await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
        budget, most = svc.budget(stream), 0
        for i in range(40):  # no frame arrives meanwhile
            r = await svc.answer(stream, f"Is anything moving in the scene right now, question {i}?", max_tokens=4)
            assert r["stream_state"]["reanchored"] is False  # never re-anchored on the question's path
            await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
            most = max(most, conv.context_tokens)
        assert conv.reanchors >= 1 and most <= budget + 64, (most, budget, conv.reanchors)

    asyncio.run(run())


# --- checked and sound: regression tests ------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        ("remember",),
        ("forget",),
        ("frames",),
        ("fail", "forget", "remember"),
        ("remember", "remember", "forget"),
        ("forget", "remember", "fail", "backlog"),
        ("backlog", "fail", "remember", "frames"),
        ("backlog-fail", "forget", "backlog"),
        ("forget", "frames", "backlog-fail"),
    ],
)
def test_whatever_is_answered_during_an_ahead_prefill_the_switch_is_consistent(tiny_model_path, synthetic_clip, order):
    """0, 1 or many turns answered meanwhile, forgotten ones, a failed one (its chunk dropped), a backlog
    the question prefills first, frames left uncut: after the switch the conversation is the anchor's
    items then the chunks cut meanwhile, one placeholder per item, the frames of no item freed, the
    bytes counted, and the next question's prompt holds the turns answered meanwhile, in order."""
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = _open(svc, keep_turns=2)
        conv = stream.conversation
        n = await _pending(svc, stream, frames)
        plan, before = stream.reanchoring, list(conv.chunks)
        switched = []  # the conversation's chunks right after the switch
        apply = svc.apply_reanchor
        svc.apply_reanchor = lambda stream, plan: (apply(stream, plan), switched.append(list(conv.chunks)))
        remembered = []
        for i, what in enumerate(order):
            size = 72 if what.startswith("backlog") else 8  # more than a chunk (64 frames): prefilled first
            await svc.append(stream, list(frames[n : n + size]))
            n += size
            if what == "frames":
                continue
            q = f"{what} {i}?"
            if what.endswith("fail"):  # the question's request, or the prefill of its backlog, fails
                failing = "prefill" if what == "backlog-fail" else "q"
                engine.fail = lambda rid, failing=failing: request_kind(rid) == failing
                with pytest.raises(RuntimeError):
                    await svc.answer(stream, q, max_tokens=4)
                engine.fail = lambda rid: False
                continue
            r = await svc.answer(stream, q, max_tokens=4, remember=what != "forget")
            assert r["stream_state"]["answered_during_reanchor"] is True
            if what != "forget":
                remembered.append(q)
        assert conv.chunks[: plan.chunks] == before
        carried = conv.chunks[plan.chunks :]
        engine.gate.set()
        await until(lambda: stream.reanchoring is None)
        assert switched[0] == [*plan.anchor.ranges, *carried]
        event = [e for e in stream.events if e["type"] == "reanchor"][0]
        assert event["answered_meanwhile"] == len(remembered)
        await until(lambda: stream.prefill_task is None)
        _consistent(svc, stream)
        await svc.append(stream, list(frames[n : n + 8]))
        await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
        r = await svc.answer(stream, "And now?", max_tokens=4)
        assert engine.refused == []
        text = engine.tokenizer.decode(engine.sent[-1][1]["prompt_token_ids"])
        if conv.reanchors == 1:  # no second re-anchor dropped them: the turns answered meanwhile, in order
            at = [text.index(q) for q in remembered]
            assert at == sorted(at) and all(text.count(q) == 1 for q in remembered)
        answered = [w for w in order if w not in ("fail", "backlog-fail", "frames")]
        assert r["stream_state"]["question"] == len(answered) + 1

    asyncio.run(run())


@pytest.mark.parametrize("stream_id", ["random", "holding -q"])
def test_a_question_cancelled_while_it_waits_or_answers_during_a_re_anchor_leaks_no_lock(
    tiny_model_path, synthetic_clip, stream_id, monkeypatch
):
    """A client that hangs up while its question waits for the switch, or while it is answered on the
    old conversation: the stream's lock is free, the cut chunk dropped, the switch happens, and the next
    question is answered. Also with a stream id whose random part starts with ``q`` (its requests hold
    ``-q``, as 1 stream in ~60 does): the engine's gates tell a question by its kind, not by a search."""
    if stream_id != "random":
        import vllm_plugin.streams.session as session

        monkeypatch.setattr(session.secrets, "token_urlsafe", lambda n=None: "q" + "A" * 31)
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate, engine.question_gate = asyncio.Event(), asyncio.Event()
        stream = _open(svc)
        conv = stream.conversation
        n = await _pending(svc, stream, frames)
        plan = stream.reanchoring
        await svc.append(stream, list(frames[n : n + 8]))
        n += 8
        answering = asyncio.ensure_future(svc.answer(stream, "Slow?", max_tokens=4))
        await until(lambda: any(request_kind(rid) == "q" for rid, _ in engine.sent))
        assert len(conv.chunks) == plan.chunks + 1
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
        assert not stream.chat_lock.locked() and len(conv.chunks) == plan.chunks
        svc.old_can_take = lambda stream, room: False
        waiting = asyncio.ensure_future(svc.answer(stream, "Waiting?", max_tokens=4))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert not stream.chat_lock.locked()
        del svc.old_can_take
        engine.gate.set()
        engine.question_gate.set()
        await until(lambda: stream.reanchoring is None and stream.prefill_task is None)
        assert conv.reanchors == 1
        _consistent(svc, stream)
        r = await asyncio.wait_for(svc.answer(stream, "Now?", max_tokens=4), 10)
        assert r["stream_state"]["chunk_ranges"][-1][1] == n

    asyncio.run(run())


def test_an_ahead_prefill_the_engine_fails_still_switches_and_a_relieve_meanwhile_does_nothing(
    tiny_model_path, synthetic_clip
):
    """The re-anchor's prefill fails: the switch happens all the same (the next request prefills it);
    relieve() while the plan is pending starts no second re-anchor."""
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = _open(svc)
        await _pending(svc, stream, frames)
        svc.relieve(stream)
        engine.fail = lambda rid: request_kind(rid) == "reanchor"
        engine.gate.set()
        await until(lambda: stream.reanchoring is None and stream.prefill_task is None and not svc.tasks)
        anchors = [e for e in stream.events if e["type"] == "reanchor"]
        assert len(anchors) == 1 and anchors[0]["prefilled_s"] is None
        _consistent(svc, stream)
        engine.fail = lambda rid: False
        r = await svc.answer(stream, "After?", max_tokens=4)
        assert r["stream_state"]["reanchors"] == 1 and engine.refused == []

    asyncio.run(run())


def test_an_eager_stream_that_stays_due_after_each_switch_still_ends_its_prefill(tiny_model_path, synthetic_clip):
    """A stream whose conversation is due again right after every switch (it holds too many frames not
    in a chunk yet for any anchor to help): the prefill task plans one re-anchor per point of the stream,
    prefills what waits and ends; nothing loops."""
    frames = np.concatenate([synthetic_clip.frames] * 4)
    svc = _service(tiny_model_path, max_frames=32)
    engine = svc.engine

    async def run():
        stream = _open(svc)
        conv = stream.conversation
        for a in range(0, 96, 16):
            await svc.append(stream, list(frames[a : a + 16]))
            await asyncio.wait_for(until(lambda: stream.prefill_task is None and stream.reanchoring is None), 20)
        assert 1 <= conv.reanchors <= 2 * conv.prefills
        _consistent(svc, stream)
        r = await svc.answer(stream, "Done?", max_tokens=4)
        assert r["stream_state"]["chunk_ranges"][-1][1] == 96 and engine.refused == []

    asyncio.run(run())


def _no_hole(stream) -> None:
    """Every frame before the conversation's next one is in an item or was freed by a re-anchor, and
    the chunks after the re-anchor's keyframes follow each other (nothing skipped)."""
    conv = stream.conversation
    recent = [c for c in conv.chunks if c not in conv.key_ranges]
    assert all(b == c for (_, b), (c, _) in zip(recent, recent[1:])), conv.chunks
    assert recent[-1][1] == conv.next_frame


@pytest.mark.parametrize("path", ["eager prefill", "question"])
def test_an_eager_stream_behind_its_frames_cuts_them_in_several_chunks_and_drops_none(
    tiny_model_path, synthetic_clip, path
):
    """More kept tokens wait than the next chunk may hold (frames pushed faster than prefilled, or held
    back by a question): an eager stream cuts them in chunks of at most that many kept tokens (re-anchoring
    between), on its prefill's path or the question's, and drops none (a lazy stream keeps the latest, below).
    Before: the oldest were dropped (a ``dropped`` event) — holes in the conversation of a stream that
    prefills everything, 1 CI run in ~3 of the accelerated serving test."""
    frames = np.concatenate([synthetic_clip.frames] * 3)
    N = 80
    svc = _service(tiny_model_path)
    if path == "question":  # no prefill runs: the question's own path meets the backlog
        svc.after_append = lambda stream: None

    async def run():
        stream = _open(svc, context_tokens=256)
        conv = stream.conversation
        await svc.append(stream, list(frames[:N]))  # decided on return; the prefill has not run yet
        limit = svc.new_frames_limit(stream, 0)
        assert conv.next_frame == 0 and conv.chunk_tokens(0, N) > 2 * limit  # more than two chunks'
        await until(lambda: stream.prefill_task is None)
        if path == "eager prefill":
            assert len(conv.chunks) > 2 and conv.next_frame == N
        r = await svc.answer(stream, "What?", max_tokens=4)
        await until(lambda: stream.prefill_task is None)
        assert not [e for e in stream.events.after(-1) if e["type"] == "dropped"]
        assert conv.next_frame == N and stream.store.evicted_frames + stream.store.held_frames == N
        _no_hole(stream)
        _consistent(svc, stream)
        chunks = [tuple(c) for c in r["stream_state"]["chunk_ranges"]]
        assert chunks[-1][1] == N and conv.reanchors >= 1
        big = [(a, b) for a, b in chunks if (b - a) > 2 and conv.chunk_tokens(a, b) > limit]
        assert not big, (big, limit)

    asyncio.run(run())


def test_a_lazy_stream_asked_late_keeps_its_latest_frames(tiny_model_path, synthetic_clip):
    """A lazy stream nobody asked for longer than its budget holds: the oldest frames not asked about
    are dropped before the cut (a ``dropped`` event), the latest kept."""
    frames = np.concatenate([synthetic_clip.frames] * 3)
    svc = _service(tiny_model_path)

    async def run():
        from vllm_plugin.streams.routes import OpenStreamRequest

        stream = svc.open(
            svc.settings(OpenStreamRequest(fps=2.0, prefill="lazy", memory={"keep": "recent", "context_tokens": 256}))
        )
        await svc.append(stream, list(frames[:80]))
        await svc.answer(stream, "What?", max_tokens=4)
        dropped = [e for e in stream.events.after(-1) if e["type"] == "dropped"]
        assert dropped and stream.store.evicted_frames == dropped[0]["frames"] > 0
        assert stream.conversation.chunks == [(dropped[0]["frames"], 80)]

    asyncio.run(run())


def test_an_eager_question_behind_its_frames_takes_the_steps_decided_when_it_started(tiny_model_path, synthetic_clip):
    """Frames keep arriving while a question prefills an eager stream's backlog in chunks: the question
    takes the steps decided when it got the stream (its time to first token does not grow with a
    client that pushes faster than the prefill); the later frames wait for the next prefill, none lost."""
    frames = np.concatenate([synthetic_clip.frames] * 5)
    svc = _service(tiny_model_path)
    svc.after_append = lambda stream: None  # no prefill runs: the question's path meets the backlog
    engine = svc.engine
    more = {"n": 80}

    async def run():
        stream = _open(svc, context_tokens=256)
        await svc.append(stream, list(frames[:80]))
        generate = engine.generate

        async def pushing(prompt, params, request_id, data_parallel_rank=None):
            if request_kind(request_id) == "prefill" and more["n"] < len(frames):  # a client faster than the prefill
                await svc.append(stream, list(frames[more["n"] : more["n"] + 8]))
                more["n"] += 8
            async for out in generate(prompt, params, request_id, data_parallel_rank):
                yield out

        engine.generate = pushing
        r = await svc.answer(stream, "What?", max_tokens=4)
        assert more["n"] > 80  # frames arrived while the question prefilled its backlog
        assert r["stream_state"]["chunk_ranges"][-1][1] == 80
        assert not [e for e in stream.events.after(-1) if e["type"] == "dropped"]
        _no_hole(stream)
        _consistent(svc, stream)

    asyncio.run(run())
