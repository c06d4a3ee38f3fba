"""Streams as parts, without a server or an engine: a memory policy added in one class, the parts
(store, decision, events) on their own, the service driven through a fake engine, and the one table
that turns the plugin's errors into HTTP statuses."""

import asyncio
import contextlib

import numpy as np
import pytest
import torch
from fake_engine import FakeEngine, request_kind, until

from vllm_plugin import errors
from vllm_plugin.core import DTDConfig, dtd_keep_mask, frame_tokens
from vllm_plugin.streams.memory import Anchor, MemoryPolicy, MemorySettings, register_policy, unregister_policy
from vllm_plugin.streams.session import Limits, StreamManager, StreamSettings

TPS = 2


class RecentOnlyLast(MemoryPolicy):
    """A toy policy: the latest ``n`` chunks, nothing else (its one option, validated by itself)."""

    name = "recent-only-last"

    def configure(self, options):
        self.n = options.integer("n", 1, 1, 16)
        self.seen: list[int] = []

    def observe(self, step, kept, scene_change=False):
        self.seen.append(step)

    def select(self, chunks, budget):
        ranges = list(chunks[-self.n :])
        return Anchor(ranges, [], sum(budget.cost(a, b) for a, b in ranges))


@pytest.fixture
def toy_policy():
    register_policy(RecentOnlyLast)
    try:
        yield RecentOnlyLast
    finally:
        unregister_policy(RecentOnlyLast.name)


def _settings(memory=None, **kw):
    return StreamSettings(fps=2.0, dtd=DTDConfig(threshold=0.05), memory=MemorySettings.parse(memory or {}), **kw)


def test_a_policy_registered_in_one_class_is_what_a_stream_re_anchors_with(toy_policy, synthetic_clip):
    frames = synthetic_clip.frames
    s = StreamManager().open(_settings({"keep": "recent-only-last"}, prefill="lazy"))
    conv = s.conversation
    for a in range(0, 24, 8):
        s.add_frames(list(frames[a : a + 8]))
        conv.cut_chunk()
    assert conv.policy.seen == list(range(12))  # every step, in order, as it was decided
    anchor = conv.reanchor(target=10**6)  # all of them would fit: the policy keeps the latest only
    assert anchor.ranges == [(16, 24)] and conv.chunks == [(16, 24)] and conv.reanchors == 1
    assert all(f is None for f in s.frames[:16]) and s.store.held_frames == 8
    assert s.status()["memory"] == {
        "keep": "recent-only-last",
        "n": 1,
        "context_tokens": None,
        "keep_turns": 2,
        "anchor_fraction": 0.5,
    }
    # its option is validated by the policy itself; another policy's option is not one of its own
    two = StreamManager().open(_settings({"keep": "recent-only-last", "n": 2}))
    for a in range(0, 24, 8):
        two.add_frames(list(frames[a : a + 8]))
        two.conversation.cut_chunk()
    assert two.conversation.reanchor(target=10**6).ranges == [(8, 16), (16, 24)]
    for memory, field in [
        ({"keep": "recent-only-last", "n": 0}, "memory.n"),
        ({"keep": "recent-only-last", "max_keyframes": 2}, "memory.max_keyframes"),
    ]:
        with pytest.raises(errors.InvalidOption) as e:
            MemorySettings.parse(memory)
        assert e.value.field == field
    unregister_policy(RecentOnlyLast.name)
    with pytest.raises(errors.InvalidOption, match="memory.keep must be one of"):
        MemorySettings.parse({"keep": "recent-only-last"})


def test_a_policy_that_drops_the_latest_chunk_is_refused(toy_policy, synthetic_clip):
    class Forgetful(RecentOnlyLast):
        name = "forgetful"

        def select(self, chunks, budget):
            return Anchor(list(chunks[:1]), [], 1)

    register_policy(Forgetful)
    try:
        s = StreamManager().open(_settings({"keep": "forgetful"}))
        for a in range(0, 16, 8):
            s.add_frames(list(synthetic_clip.frames[a : a + 8]))
            s.conversation.cut_chunk()
        with pytest.raises(RuntimeError, match="did not keep the latest chunk"):
            s.conversation.reanchor(target=100)
        assert s.conversation.chunks == [(0, 8), (8, 16)] and s.store.held_frames == 16  # nothing freed
    finally:
        unregister_policy("forgetful")
    with pytest.raises(ValueError, match="already registered"):
        register_policy(type("Other", (MemoryPolicy,), {"name": "recent"}))
    with pytest.raises(TypeError):
        register_policy(type("Nameless", (MemoryPolicy,), {}))


def test_the_decision_state_carries_the_reference_and_chunked_equals_whole(synthetic_clip):
    from vllm_plugin.streams.decision import DecisionState

    frames = synthetic_clip.frames
    d = DecisionState(DTDConfig(threshold=0.05))
    masks = []
    for a, b in [(0, 2), (2, 10), (10, 12), (12, len(frames))]:
        tokens = d.pixel_tokens(frames[a:b])
        masks.append(d.decide(tokens))
        assert torch.equal(d.state, tokens[-1])  # "previous": the next step is compared with the last one
    whole = dtd_keep_mask(frame_tokens(torch.from_numpy(frames)), 0.05, "l1")
    assert torch.equal(torch.cat(masks), whole)
    # rewinding to an earlier state decides the same steps again the same way
    d2 = DecisionState(DTDConfig(threshold=0.05))
    d2.decide(d2.pixel_tokens(frames[:10]))
    state = d2.state
    d2.decide(d2.pixel_tokens(frames[10:20]))
    d2.rewind(state)
    assert torch.equal(d2.decide(d2.pixel_tokens(frames[10:20])), whole[5:10])
    off = DecisionState(DTDConfig(enabled=False))
    assert off.decide(off.pixel_tokens(frames[:4])).all() and off.state is None


def test_an_append_whose_analysis_fails_leaves_the_decision_as_it_was(synthetic_clip, monkeypatch):
    frames = synthetic_clip.frames
    s = StreamManager().open(_settings())
    s.add_frames(list(frames[:8]))
    state = s.decision.state.clone()

    def broken(mask):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(s.store, "add_masks", broken)
    with pytest.raises(errors.Unavailable, match="nothing was added"):
        s.add_frames(list(frames[8:16]))
    assert torch.equal(s.decision.state, state) and len(s.frames) == 8 and len(s.kept_per_step) == 4
    monkeypatch.undo()
    s.add_frames(list(frames[8:]))  # the rest: as if the failed append had never come
    whole = dtd_keep_mask(frame_tokens(torch.from_numpy(frames)), 0.05, "l1")
    assert s.kept_per_step == [int(m.sum()) for m in whole]


def test_the_frame_store_accounts_for_every_byte(synthetic_clip):
    from vllm_plugin.streams.session import Geometry
    from vllm_plugin.streams.store import ByteAccount, FrameStore

    account = ByteAccount(limit=10 * synthetic_clip.frames[0].nbytes)
    store = FrameStore(Geometry(), max_bytes=6 * synthetic_clip.frames[0].nbytes, account=account)
    frames = [store.fit(f) for f in synthetic_clip.frames[:4]]
    n, times = store.check(frames, None, fps=2.0)
    assert n == sum(f.nbytes for f in frames) and times == [0.0, 0.5, 1.0, 1.5]
    store.add(frames, times, n)
    assert store.nbytes == account.held == n and store.steps == 2
    with pytest.raises(errors.StreamFull, match="at most"):
        store.check(frames, None, fps=2.0)  # 8 frames > 6 frames' bytes
    with pytest.raises(errors.InvalidRequest, match="timestamps must increase") as e:
        store.check(frames[:2], [1.0, 0.5], fps=2.0)
    assert e.value.field == "timestamps"
    store.add_masks(torch.ones(2, 8, 8, dtype=torch.bool))
    store.add_kept([64, 64])
    assert store.free([0, 1, 2]) == [0]  # step 1 keeps a frame
    assert store.nbytes == account.held == n // 4 and store.held_frames == 1 and store.step_masks[1] is not None
    store.take_back(1, 0)  # (a test of the undo path only: frame 3, no bytes)
    store.release()
    assert account.held == 0 and store.account is None
    with pytest.raises(errors.RateLimited, match="retry when streams have closed"):
        ByteAccount(limit=1).reserve(2)


def test_the_event_log_numbers_events_and_signals_scene_changes():
    from vllm_plugin.streams.events import EventLog, RateLimiter

    log = EventLog(max_events=3, event_level=0.5)
    assert [log.scene_change(step, f) for step, f in enumerate([1.0, 0.9, 0.1, 0.6, 0.7, 0.2, 0.5])] == [
        False,
        True,
        False,
        True,
        False,
        False,
        True,
    ]  # rising to the level (the first step is never one)
    for i in range(5):
        log.add({"type": "x", "i": i})
    assert [e["index"] for e in log] == [2, 3, 4] and log.count == 5 and log.last_index == 4
    assert [e["i"] for e in log.after(2)] == [3, 4] and log[0]["i"] == 2 and len(log) == 3
    assert not EventLog(enabled=False).scene_change(1, 1.0)
    limiter = RateLimiter(2)
    assert [limiter.admit(t) for t in (0.0, 0.1, 0.2, 1.05, 1.3)] == [True, True, False, True, True]


def test_every_error_of_the_plugin_has_one_http_status():
    from vllm_plugin.streams.routes import ERROR_TYPES, http_status

    expected = {
        errors.InvalidRequest("x"): 400,
        errors.InvalidOption("fps", "fps x"): 400,
        errors.StreamNotFound("x"): 404,
        errors.ModelNotFound("x"): 404,
        errors.StreamFull("x"): 409,
        errors.TooLarge("x"): 413,
        errors.RateLimited("x"): 429,
        errors.TooManyStreams("x"): 429,
        errors.Unavailable("x"): 503,
        errors.DTDError("x"): 400,
        ValueError("x"): 400,
        RuntimeError("x"): 500,
    }
    assert {type(e).__name__: http_status(e) for e in expected} == {type(e).__name__: s for e, s in expected.items()}
    assert set(ERROR_TYPES) == {400, 404, 409, 413, 429, 503}
    # the field an option error names is data, not part of a message to parse
    assert errors.InvalidOption("memory.keep", "anything").field == "memory.keep"


# --- the service, driven through a fake engine ----------------------------------------------------


def _service(tiny_model_path, **engine):
    from vllm_plugin.streams.service import StreamService

    return StreamService(FakeEngine(tiny_model_path, **engine), StreamManager(Limits(max_streams=2)))


def test_a_service_built_on_a_fake_engine_opens_appends_asks_and_closes(tiny_model_path, synthetic_clip):
    from vllm_plugin.streams.routes import OpenStreamRequest, http_status

    frames = synthetic_clip.frames
    svc = _service(tiny_model_path)
    engine = svc.engine

    async def run():
        stream = svc.open(svc.settings(OpenStreamRequest(fps=2.0, prefill="lazy")))
        added = await svc.append(stream, list(frames[:16]))
        assert added["frames"] == 16 and added["steps"] == 8 and added["kept_per_step"] == stream.kept_per_step
        r = await svc.answer(stream, "What happens?", max_tokens=8)
        prompt, params = engine.requests[-1]
        assert r["choices"][0]["message"]["content"] == "a cat" and params["max_tokens"] == 8
        st = r["stream_state"]
        assert st["chunk_ranges"] == [[0, 16]] and st["video_tokens_per_chunk"] == [sum(stream.kept_per_step)]
        assert prompt["multi_modal_uuids"] == {"video": [f"{stream.id}/frames0-16"]}
        assert prompt["mm_processor_kwargs"]["dtd_threshold"] == 0.05  # the server's default
        assert r["usage"]["prompt_tokens"] == len(prompt["prompt_token_ids"]) - 1 + sum(stream.kept_per_step)
        # the answer stays in the conversation: the next prompt starts with the first one and its answer
        await svc.append(stream, list(frames[16:24]))
        r2 = await svc.answer(stream, "And now?", max_tokens=8)
        second = engine.requests[-1][0]
        first_ids = prompt["prompt_token_ids"]
        assert second["prompt_token_ids"][: len(first_ids) + len(engine.answer_ids)] == first_ids + engine.answer_ids
        assert len(second["multi_modal_data"]["video"]) == 2
        status = svc.status(stream)
        assert (status["questions"], status["chunks"], status["frames"]) == (2, 2, 24)
        # what the engine counted, and the answer that stays (with the template's end of turn)
        assert status["context_tokens"] == r2["usage"]["prompt_tokens"] + len(engine.answer_ids) + 2
        assert status["context_budget"] == 3072  # 0.75 of the engine's 4096
        # a question that cannot fit the context is refused before anything changes
        with pytest.raises(errors.InvalidOption, match="max_tokens is too large") as e:
            await svc.answer(stream, "?", max_tokens=5000)
        assert e.value.field == "max_tokens" and svc.status(stream)["questions"] == 2
        await svc.close(stream.id)
        with pytest.raises(errors.StreamNotFound) as e:
            svc.get(stream.id)
        assert http_status(e.value) == 404

    asyncio.run(run())
    with pytest.raises(errors.ModelNotFound):
        svc.check_model("another")
    with pytest.raises(errors.InvalidOption) as e:  # the engine's answer: no tower here
        svc.open(svc.settings(OpenStreamRequest(dtd_criterion="feature")))
    assert e.value.field == "dtd_criterion" and len(svc.manager) == 0


def test_an_eager_stream_prefills_through_the_engine_and_the_question_extends_it(tiny_model_path, synthetic_clip):
    from vllm_plugin.streams.routes import OpenStreamRequest

    svc = _service(tiny_model_path)

    async def run():
        stream = svc.open(svc.settings(OpenStreamRequest(fps=2.0)))
        await svc.append(stream, list(synthetic_clip.frames[:16]))
        while svc.tasks:  # the eager prefill the append started
            await asyncio.gather(*list(svc.tasks))
        prefill, params = svc.engine.requests[-1]
        assert params["max_tokens"] == 1 and stream.conversation.prefills == 1 and not stream.eager_stopped
        await svc.answer(stream, "What happens?", max_tokens=8)
        question = svc.engine.requests[-1][0]["prompt_token_ids"]
        assert question[: len(prefill["prompt_token_ids"])] == prefill["prompt_token_ids"]
        assert svc.status(stream)["prefill_pending"] is False

    asyncio.run(run())
    lazy = _service(tiny_model_path, prefix_caching=False)
    assert "prefix caching is off" in lazy.open(lazy.settings(OpenStreamRequest(fps=2.0))).eager_stopped


def test_the_service_re_anchors_with_a_registered_toy_policy(toy_policy, tiny_model_path, synthetic_clip):
    """A policy added in one class is served: the open request names it in its memory object, and the
    conversation the engine sees after a re-anchor holds its selection."""
    from vllm_plugin.streams.routes import OpenStreamRequest

    frames = np.concatenate([synthetic_clip.frames] * 2)
    svc = _service(tiny_model_path)

    async def run():
        req = OpenStreamRequest(
            fps=2.0, prefill="lazy", memory={"keep": "recent-only-last", "context_tokens": 400, "keep_turns": 1}
        )
        stream = svc.open(svc.settings(req))
        conv, videos_after_reanchor = stream.conversation, []
        for a in range(0, len(frames), 8):
            await svc.append(stream, list(frames[a : a + 8]))
            before = conv.reanchors
            await svc.answer(stream, "What changed?", max_tokens=8)
            if conv.reanchors > before:  # this question's prompt was re-anchored: the policy's selection only
                videos_after_reanchor.append(len(svc.engine.requests[-1][0]["multi_modal_data"]["video"]))
        anchors = [e for e in stream.events if e["type"] == "reanchor"]
        assert len(anchors) >= 2 and all(len(e["chunk_ranges"]) == 1 and e["keyframes"] == [] for e in anchors)
        assert videos_after_reanchor and set(videos_after_reanchor) == {1}
        assert svc.status(stream)["memory"]["keep"] == "recent-only-last"
        assert stream.store.held_frames == sum(b - a for a, b in conv.chunks) < len(frames) // 2

    asyncio.run(run())
    with pytest.raises(errors.InvalidOption) as e:
        svc.settings(OpenStreamRequest(memory={"keep": "recent-only-last", "n": 99}))
    assert e.value.field == "memory.n"
    with pytest.raises(errors.InvalidOption) as e:  # one option given both ways
        svc.settings(OpenStreamRequest(memory={"keep": "recent"}, memory_keep="recent+keyframes"))
    assert e.value.field == "memory.keep"
    with pytest.raises(errors.InvalidOption, match="context_tokens 8000 is more than the model's context") as e:
        svc.settings(OpenStreamRequest(context_tokens=8000))
    assert e.value.field == "context_tokens"


def test_a_memory_policy_that_raises_leaves_the_stream_as_it_was(synthetic_clip, monkeypatch):
    """A registered policy whose observe() raises: the append fails (503), and frames, per-step masks,
    counts and the DTD state are as before it, so the next append's steps line up."""
    frames = synthetic_clip.frames
    s = StreamManager().open(_settings())
    s.add_frames(list(frames[:8]))
    before = (
        len(s.store.frames),
        len(s.store.step_masks),
        list(s.store.kept_per_step),
        s.decision.state.clone(),
        s.store.nbytes,
    )

    def broken(*args, **kwargs):
        raise RuntimeError("policy bug")

    monkeypatch.setattr(s.conversation, "observe", broken)
    with pytest.raises(errors.Unavailable):
        s.add_frames(list(frames[8:12]))
    after = (
        len(s.store.frames),
        len(s.store.step_masks),
        list(s.store.kept_per_step),
        s.decision.state,
        s.store.nbytes,
    )
    assert after[:3] == before[:3] and torch.equal(after[3], before[3]) and after[4] == before[4]
    monkeypatch.undo()
    s.add_frames(list(frames[8:12]))
    assert len(s.store.step_masks) == len(s.store.kept_per_step) == 6


# --- re-anchoring off the question's path ----------------------------------------------------------


class GatedEngine(FakeEngine):
    """A fake engine whose re-anchor prefills (request ids ``…-reanchor…``) wait for :attr:`gate`, and
    which checks that every prompt holds one placeholder per video item it carries."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate: asyncio.Event | None = None
        self.by_id: dict[str, dict] = {}

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        self.by_id[request_id] = prompt
        items = prompt.get("multi_modal_data", {}).get("video", [])
        assert prompt["prompt_token_ids"].count(self.video_pad) == len(items), "placeholders and items differ"
        if request_kind(request_id) == "reanchor" and self.gate is not None:
            await self.gate.wait()
        async for out in super().generate(prompt, params, request_id, data_parallel_rank):
            yield out


def _gated_service(tiny_model_path):
    from vllm_plugin.streams.service import StreamService

    return StreamService(GatedEngine(tiny_model_path), StreamManager(Limits(max_streams=8)))


async def _reanchor_pending(svc, stream, frames):
    """Append 4 steps at a time, letting the eager prefill run, until a re-anchor is being prefilled
    ahead (held at the engine's gate). Returns the frames appended."""
    n = 0
    while stream.reanchoring is None:
        assert n < len(frames), "no re-anchor was planned"
        await svc.append(stream, list(frames[n : n + 8]))
        n += 8
        await until(lambda: stream.reanchoring is not None or stream.prefill_task is None)
    return n


def _eager_request(**memory):
    from vllm_plugin.streams.routes import OpenStreamRequest

    return OpenStreamRequest(fps=2.0, memory={"keep": "recent", "context_tokens": 800, "keep_turns": 1, **memory})


def test_a_question_during_a_re_anchor_is_answered_on_the_conversation_as_it_was(
    tiny_model_path, synthetic_clip, monkeypatch
):
    """While the re-anchored conversation is prefilled ahead (held at the gate), a question is answered
    at once on the old conversation, with every frame that arrived before it; after the switch the
    next question's prompt is the new anchor, the turn answered meanwhile and the frames since."""
    from vllm_plugin.streams import service

    monkeypatch.setattr(service, "AHEAD_PIECE_TOKENS", 64)  # the re-anchor goes to the engine in several pieces
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _gated_service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = svc.open(svc.settings(_eager_request()))
        conv = stream.conversation
        n = await _reanchor_pending(svc, stream, frames)
        plan = stream.reanchoring
        old_chunks = list(conv.chunks)
        assert conv.reanchors == 0 and plan.anchor.ranges[-1] == old_chunks[-1]
        await svc.append(stream, list(frames[n : n + 4]))  # frames after the plan: no eager prefill takes them
        n += 4
        r = await asyncio.wait_for(svc.answer(stream, "What is new?", max_tokens=8), 10)
        prompt = engine.requests[-1][0]
        st = r["stream_state"]
        assert st["answered_during_reanchor"] is True and st["reanchor_wait_s"] == 0.0 and st["reanchors"] == 0
        # the old conversation, and one new item with exactly the frames that arrived before the question
        assert [list(c) for c in old_chunks] == st["chunk_ranges"][:-1] and st["chunk_ranges"][-1] == [
            old_chunks[-1][1],
            n,
        ]
        assert prompt["multi_modal_uuids"]["video"] == [f"{stream.id}/frames{a}-{b}" for a, b in st["chunk_ranges"]]
        assert stream.reanchoring is plan and not plan.done.is_set()
        engine.gate.set()
        await until(lambda: stream.reanchoring is None)
        # the switch: the anchor's items, then the chunk the question cut; the turn answered meanwhile stays
        assert conv.reanchors == 1 and conv.chunks == [*plan.anchor.ranges, (old_chunks[-1][1], n)]
        event = [e for e in stream.events if e["type"] == "reanchor"][-1]
        assert event["answered_meanwhile"] == 1 and event["prefilled_s"] is not None
        assert [q for q, _, _ in conv.prompt.turns_since(0)][-1] == "What is new?"
        held = {i for a, b in conv.chunks for i in range(a, b)}
        assert all((f is None) == (i not in held) for i, f in enumerate(stream.store.frames[:n]))
        await until(lambda: stream.prefill_task is None)
        r2 = await svc.answer(stream, "And now?", max_tokens=8)
        second = engine.requests[-1][0]
        assert r2["stream_state"]["answered_during_reanchor"] is False and r2["stream_state"]["reanchored"] is False
        assert second["multi_modal_uuids"]["video"][: len(conv.chunks)] == [
            f"{stream.id}/frames{a}-{b}" for a, b in conv.chunks
        ]
        text = engine.tokenizer.decode(second["prompt_token_ids"])
        assert text.count("What is new?") == 1 and text.index("What is new?") < text.index("And now?")
        # the re-anchor's own prefill is a prefix of the next question's prompt (the prefix cache serves it)
        pieces = [p for rid, p in engine.by_id.items() if request_kind(rid) == "reanchor"]
        assert len(pieces) >= 2 and len(pieces) == len(svc.ahead_pieces(stream, plan.anchor.ranges))
        for before, after in zip(pieces, pieces[1:]):  # growing prefixes: the prefix cache serves each piece's start
            assert after["prompt_token_ids"][: len(before["prompt_token_ids"])] == before["prompt_token_ids"]
        warm = pieces[-1]
        assert warm["multi_modal_uuids"]["video"] == [f"{stream.id}/frames{a}-{b}" for a, b in plan.anchor.ranges]
        assert second["prompt_token_ids"][: len(warm["prompt_token_ids"])] == warm["prompt_token_ids"]

    asyncio.run(run())


def test_a_question_the_old_conversation_cannot_take_waits_for_the_switch(tiny_model_path, synthetic_clip, monkeypatch):
    frames = np.concatenate([synthetic_clip.frames] * 12)
    svc = _gated_service(tiny_model_path)
    engine = svc.engine

    async def run():
        engine.gate = asyncio.Event()
        stream = svc.open(svc.settings(_eager_request()))
        await _reanchor_pending(svc, stream, frames)
        plan = stream.reanchoring
        monkeypatch.setattr(svc, "old_can_take", lambda stream, room: False)
        asked = asyncio.ensure_future(svc.answer(stream, "Still there?", max_tokens=8))
        await asyncio.sleep(0.3)
        assert not asked.done()  # it waits for the switch, not on the old conversation
        engine.gate.set()
        r = await asyncio.wait_for(asked, 10)
        st = r["stream_state"]
        assert st["answered_during_reanchor"] is False and st["reanchor_wait_s"] >= 0.25 and st["reanchors"] == 1
        assert engine.requests[-1][0]["multi_modal_uuids"]["video"][: len(plan.anchor.ranges)] == [
            f"{stream.id}/frames{a}-{b}" for a, b in plan.anchor.ranges
        ]

    asyncio.run(run())


def test_under_load_no_answer_is_lost_or_duplicated_across_re_anchors(tiny_model_path, synthetic_clip):
    """8 eager streams, appends and questions interleaved, re-anchor prefills slowed: every question
    gets one answer, and every conversation holds its questions in order, each at most once, the
    latest always (the earlier ones as many as ``keep_turns`` keeps)."""
    import random

    frames = np.concatenate([synthetic_clip.frames] * 8)
    svc = _gated_service(tiny_model_path)
    engine = svc.engine
    rng = random.Random(0)

    class Slow(asyncio.Event):
        async def wait(self):
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            return True

    async def one(k):
        stream = svc.open(svc.settings(_eager_request(keep_turns=3)))
        asked, during = 0, 0
        for a in range(0, len(frames), 4):
            await svc.append(stream, list(frames[a : a + 4]))
            await asyncio.sleep(rng.uniform(0, 0.02))
            if a % 8 == 4:
                r = await svc.answer(stream, f"s{k} q{asked}?", max_tokens=4)
                asked += 1
                during += r["stream_state"]["answered_during_reanchor"]
                assert r["stream_state"]["question"] == asked
                questions = [q for q, _, _ in stream.conversation.prompt.turns_since(0)]
                assert questions[-1] == f"s{k} q{asked - 1}?"
                numbers = [int(q.split("q")[1][:-1]) for q in questions]
                assert numbers == sorted(set(numbers)), questions
        await until(lambda: stream.prefill_task is None and stream.reanchoring is None)
        return stream.conversation.reanchors, during, asked

    async def run():
        engine.gate = Slow()
        return await asyncio.gather(*(one(k) for k in range(8)))

    results = asyncio.run(run())
    assert all(reanchors >= 2 for reanchors, _, _ in results), results
    assert sum(during for _, during, _ in results) > 0, results


def test_an_engine_that_goes_silent_gets_the_request_aborted_and_a_503(tiny_model_path, synthetic_clip):
    """A remote data-parallel rank that died gives no output and no error (vLLM 0.32): after
    ``engine_timeout_s`` the question fails with Unavailable, vLLM's generate is cancelled (which
    aborts the request in the engine), and the stream answers again once the engine does."""
    from vllm_plugin.streams.routes import OpenStreamRequest, http_status
    from vllm_plugin.streams.service import StreamService

    class Silent(FakeEngine):
        silent = True
        cancelled = 0

        async def generate(self, prompt, params, request_id, data_parallel_rank=None):
            if self.silent:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    type(self).cancelled += 1
                    raise
            async for out in super().generate(prompt, params, request_id, data_parallel_rank):
                yield out

    engine = Silent(tiny_model_path)
    svc = StreamService(engine, StreamManager(Limits(engine_timeout_s=0.2)))

    async def run():
        stream = svc.open(svc.settings(OpenStreamRequest(fps=2.0, prefill="lazy")))
        await svc.append(stream, list(synthetic_clip.frames[:8]))
        with pytest.raises(errors.Unavailable, match="gave no output for 0.2 s") as e:
            await asyncio.wait_for(svc.answer(stream, "Hello?", max_tokens=4), 10)
        assert http_status(e.value) == 503 and Silent.cancelled == 1
        assert svc.status(stream)["questions"] == 0 and stream.conversation.chunks == []  # the turn did not happen
        engine.silent = False
        r = await svc.answer(stream, "Hello?", max_tokens=4)
        assert r["stream_state"]["chunk_ranges"] == [[0, 8]]

    asyncio.run(run())


def test_a_cancelled_question_stops_however_fast_the_engine_streams(tiny_model_path, synthetic_clip):
    """Cancelling a question (a client's ``response.cancel``, a disconnect) ends it and aborts its request,
    even when the engine's next output is already there as the cancel lands. Python 3.11's
    ``asyncio.wait_for`` returns that output and swallows the cancel: the answer ran to ``max_tokens``
    (a fresh-clone CI run: ``response.done`` "incomplete" after ``response.cancel``)."""
    from types import SimpleNamespace

    from vllm_plugin.streams.routes import OpenStreamRequest
    from vllm_plugin.streams.service import StreamService

    class Fast(FakeEngine):
        """Questions stream ``max_tokens`` outputs, each as soon as the loop turns once."""

        produced = 0
        closed = 0

        async def generate(self, prompt, params, request_id, data_parallel_rank=None):
            if request_kind(request_id) != "q":
                async for out in super().generate(prompt, params, request_id, data_parallel_rank):
                    yield out
                return
            try:
                for i in range(params["max_tokens"]):
                    await asyncio.sleep(0)
                    type(self).produced += 1
                    o = SimpleNamespace(
                        text="a" * (i + 1), token_ids=[1] * (i + 1), finish_reason=None, stop_reason=None
                    )
                    yield SimpleNamespace(
                        request_id=request_id, prompt_token_ids=[1], num_cached_tokens=0, finished=False, outputs=[o]
                    )
            finally:
                type(self).closed += 1

    engine = Fast(tiny_model_path)
    svc = StreamService(engine, StreamManager(Limits(engine_timeout_s=60)))

    async def run():
        stream = svc.open(svc.settings(OpenStreamRequest(fps=2.0, prefill="lazy")))
        await svc.append(stream, list(synthetic_clip.frames[:4]))
        ends = []
        for k in range(1, 41):  # the cancel lands at 40 different points of the stream of outputs
            seen = 0

            async def ask():
                nonlocal seen
                async for _ in svc.generate(stream, "Hello?", 2000, 0.0):
                    seen += 1

            before, closed = Fast.produced, Fast.closed
            task = asyncio.ensure_future(ask())
            while seen < k and not task.done():
                await asyncio.sleep(0)
            if task.done():
                task.result()  # (fails the test with the question's error)
            for _ in range(k % 3):  # and at different phases of the engine's step
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # the request's generate was closed as the cancel landed (vLLM aborts the request then), not at the
            # loop's shutdown
            ends.append((k, task.cancelled(), Fast.produced - before, Fast.closed - closed))
        return ends

    ends = asyncio.run(run())
    assert all(cancelled and produced < 100 and closed == 1 for _, cancelled, produced, closed in ends), ends
