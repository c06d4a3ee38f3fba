"""The stream service of one API-server process: streams, their conversations, and the engine.

:class:`StreamService` is built from injected parts: an :class:`Engine` (what it needs of the
server) and a :class:`StreamManager` (the streams), so a unit test builds one with a fake engine.
:class:`VLLMEngine` is the engine of a vLLM server; it reuses vLLM's own request path wherever there
is one: the served tokenizer and multimodal processor come from the engine client's renderer (so
``--tokenizer``, ``--revision``, ``--trust-remote-code`` and ``--mm-processor-kwargs`` apply as for
``/v1/chat/completions``), the chat template is the one vLLM resolves (``--chat-template``, the
processor's, the tokenizer's), and a question is one ``engine_client.generate`` call with token ids
and video items. Errors are the plugin's own (:mod:`vllm_plugin.errors`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.entrypoints.options import dtd_config_from_kwargs, split_dtd_kwargs
from vllm_plugin.errors import InvalidOption, InvalidRequest, ModelNotFound, RateLimited, Unavailable
from vllm_plugin.models import vision
from vllm_plugin.streams import openai_format
from vllm_plugin.streams.encoding import EncodeQueue, processor_patchify
from vllm_plugin.streams.forward import Peers
from vllm_plugin.streams.memory import Anchor, MemorySettings
from vllm_plugin.streams.prompt import ChatPrompt
from vllm_plugin.streams.session import Geometry, Limits, Stream, StreamManager, StreamSettings

logger = logging.getLogger("vllm.dtd_plugin")
MAX_CHARS_PER_TOKEN = 32  # a text longer than the context's tokens × this is refused before tokenizing
MIN_CHUNK_STEPS = 16  # a stream's fps must let a chunk of this many temporal steps fit half the position room
AHEAD_PIECE_TOKENS = 1024  # a re-anchor prefilled ahead goes to the engine in pieces of about this many tokens
QUESTION_ROOM = (
    128  # tokens an eager prefill leaves for the next question's text and answer (at most a quarter of the budget)
)


@dataclass
class ReanchorPlan:
    """A re-anchor planned on a conversation (:meth:`StreamService.plan_reanchor`), applied later
    (:meth:`StreamService.apply_reanchor`): what the conversation had then, to carry what questions
    add before the switch."""

    anchor: Anchor  # the memory policy's selection
    prompt: ChatPrompt  # the re-anchored text: the kept turns
    trigger: str
    budget: int | None
    context_before: int
    chunks: int  # the conversation's chunks when planned
    messages: int  # its prompt's messages when planned
    open_videos: int  # its open user turn's videos when planned
    cut: bool  # the latest chunk was just cut by the request that planned it
    prefilled_s: float | None = None  # the re-anchored conversation's prefill, when it ran ahead
    done: asyncio.Event = field(default_factory=asyncio.Event)


def describe(e: BaseException) -> str:
    """An exception for a log line or an event: its type when it has no message (vLLM's EngineGenerateError)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else f"{type(e).__name__} (no message; see the server log)"


async def off_loop(fn, *args):
    """``fn(*args)`` in a worker thread; a cancelled caller still waits for it to finish (it changes
    stream state under the stream's lock: nothing may run half-done behind the caller's cleanup)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True  # (again): the thread finishes all the same, then the caller's cleanup runs
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


def served_chat_template(engine_client, args, tokenizer) -> str | None:
    """The chat template vLLM's chat endpoint uses for this server (checked vLLM 0.32 functions)."""
    from vllm.renderers import chat_utils, hf

    load = cast(
        Callable[..., Any], vllm_patches.require(chat_utils, "load_chat_template", ["chat_template", "is_literal"])
    )
    resolve = cast(
        Callable[..., str | None],
        vllm_patches.require(hf, "resolve_chat_template", ["tokenizer", "chat_template", "tools", "model_config"]),
    )
    return resolve(tokenizer, load(getattr(args, "chat_template", None)), None, model_config=engine_client.model_config)


def processor_sizer(processor, patch_size: int, temporal_patch_size: int, max_sizes: int = 64):
    """``(height, width) -> (height, width)`` the served multimodal processor gives a video of that
    frame size: one temporal step of black frames through vLLM's own processor (DTD off), with the
    server's processor settings, remembered per input size. Stream frames resized to it are not
    resized again at question time, whatever sizing the server was configured with."""
    import functools

    import numpy as np

    prompt = processor.dummy_inputs.get_dummy_text({"video": 1})

    @functools.lru_cache(maxsize=max_sizes)
    def size(height: int, width: int) -> tuple[int, int]:
        n = temporal_patch_size
        meta = {
            "fps": 1.0,
            "duration": float(n),
            "total_num_frames": n,
            "frames_indices": list(range(n)),
            "video_backend": "dtd_stream",
            "do_sample_frames": False,
        }
        items = processor.info.parse_mm_data({"video": [(np.zeros((n, height, width, 3), np.uint8), meta)]})
        out = processor(prompt, items, hf_processor_mm_kwargs={"dtd_enabled": False})
        _, gh, gw = (int(x) for x in out["mm_kwargs"]["video"][0]["video_grid_thw"].data.tolist())
        return gh * patch_size, gw * patch_size

    return size


class Engine(Protocol):
    """What a :class:`StreamService` needs of the server: the served model's facts, its tokenizer and
    chat template, the family's position rules, and the calls into the engine. :class:`VLLMEngine`
    is vLLM's; a unit test gives a fake one."""

    served_names: list[str]
    max_model_len: int | None
    server_dtd: dict  # the server's dtd_* defaults (its --mm-processor-kwargs)
    tokenizer: Any  # encode, apply_chat_template
    chat_template: str | None
    video_pad: int  # the token id of a video placeholder in a served prompt
    prefix_caching: bool
    dp_ranks: int  # data-parallel engines this server reaches
    position_room: int  # positions the rotary table holds beyond the context

    def step_positions(self, fps: float) -> float:
        """Temporal M-RoPE positions one temporal step of a video item at ``fps`` advances."""
        ...

    def item_positions(self, steps: int, h: int, w: int, fps: float) -> int:
        """Positions a video item of ``steps`` × ``h`` × ``w`` merged tokens at ``fps`` spans, whatever
        DTD keeps (the family's rule)."""
        ...

    def sampling_params(self, max_tokens: int, temperature: float = 0.0, ignore_eos: bool = False) -> Any: ...

    def generate(
        self, prompt: dict, params: Any, request_id: str, data_parallel_rank: int | None = None
    ) -> AsyncIterator[Any]:
        """The request's outputs (vLLM ``RequestOutput``\\ s), as ``EngineClient.generate``."""
        ...

    def encoder(self, max_pending_steps: int) -> EncodeQueue:
        """A queue feeding the family's vision tower (feature criterion); :class:`InvalidOption`
        naming ``dtd_criterion`` when no tower can run here."""
        ...


class VLLMEngine:
    """The :class:`Engine` of a vLLM server: its engine client, renderer and arguments; also this
    API-server process's place among the server's (``api_process_index`` of ``api_process_count``)
    and the stream geometry the served processor gives."""

    def __init__(self, engine_client, args):
        from vllm_plugin.models import DTD_ARCHITECTURES
        from vllm_plugin.models.base import rope_positions

        self.client = engine_client
        self.max_model_len = getattr(getattr(engine_client, "model_config", None), "max_model_len", None)
        names = getattr(args, "served_model_name", None) or [args.model]
        self.served_names = [names] if isinstance(names, str) else list(names)
        archs = list(getattr(engine_client.model_config, "architectures", None) or [])
        if not set(archs) & set(DTD_ARCHITECTURES.values()):
            raise RuntimeError(
                f"the DTD stream routes need a DTD architecture, the server runs {archs}: start it with "
                "python -m vllm_plugin.serve or --hf-overrides '{\"architectures\": [<a DTD architecture>]}' "
                f"(DTD architectures: {sorted(DTD_ARCHITECTURES.values())})"
            )
        renderer = engine_client.renderer
        self.tokenizer = renderer.get_tokenizer()
        self.chat_template = served_chat_template(engine_client, args, self.tokenizer)
        self.mm_processor = mm_processor = renderer.get_mm_processor()
        info = mm_processor.info
        hf_processor = info.get_hf_processor()
        self.video_processor = vp = getattr(hf_processor, "video_processor", None) or info.get_image_processor()
        raw = getattr(args, "mm_processor_kwargs", None) or {}
        self.server_dtd, server_rest = split_dtd_kwargs(json.loads(raw) if isinstance(raw, str) else dict(raw))
        # API-server processes (vLLM sets both in each process it starts; one process: 1 and 0)
        pc = engine_client.vllm_config.parallel_config
        vllm_patches.require(type(pc), "_api_process_count")  # private in vLLM 0.32: checked, never guessed
        vllm_patches.require(type(pc), "_api_process_rank")
        self.api_process_count = max(1, int(pc._api_process_count or 1))
        self.api_process_index = max(0, int(pc._api_process_rank or 0))
        sizer = processor_sizer(mm_processor, int(vp.patch_size), int(vp.temporal_patch_size))
        self.geometry = Geometry.from_video_processor(vp, server_rest, sizer=sizer)
        # data parallelism: every request of a stream goes to one engine (its prefix cache is there)
        self.dp_ranks = int(pc.data_parallel_size_local if pc.local_engines_only else pc.data_parallel_size)
        self.video_pad = self.tokenizer.convert_tokens_to_ids(hf_processor.video_token)
        # feature criterion: the family's vision tower in this process
        self.tower_spec = getattr(mm_processor, "vision_tower", None)
        self.prefix_caching = bool(getattr(engine_client.vllm_config.cache_config, "enable_prefix_caching", True))
        # positions: what the conversation's video items may span beyond their tokens before a request would
        # pass the rotary table (the processor refuses those: DTDMultiModalProcessorMixin._dtd_check_positions)
        self.position_room = rope_positions(info.get_hf_config()) - max(self.max_model_len or 0, 1)

    def step_positions(self, fps: float) -> float:
        return self.mm_processor._dtd_stream_t_factor(fps)

    def item_positions(self, steps: int, h: int, w: int, fps: float) -> int:
        return self.mm_processor._dtd_position_span(steps, h, w, self.step_positions(fps), 0)

    def sampling_params(self, max_tokens: int, temperature: float = 0.0, ignore_eos: bool = False):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos)

    def generate(self, prompt: dict, params, request_id: str, data_parallel_rank: int | None = None):
        return self.client.generate(prompt, params, request_id, data_parallel_rank=data_parallel_rank)

    def encoder(self, max_pending_steps: int) -> EncodeQueue:
        """Loads the vision tower on first use: call it off the event loop."""
        try:
            tower = vision.tower_for(self.tower_spec, self.client.model_config)
        except vision.EncoderUnavailable as e:
            raise InvalidOption("dtd_criterion", str(e)) from None
        return EncodeQueue(
            processor_patchify(self.video_processor),
            tower.encode_many,
            max_pending_steps,
            max_batch_steps=tower.max_steps,
            decision_dim=tower.decision_dim,
        )


class StreamService:
    """The streams of one API-server process, their conversations, and the engine.

    Args:
        engine: the :class:`Engine` (vLLM's: :meth:`from_vllm`).
        manager: this process's streams (:class:`StreamManager`: limits, geometry, process index).
        peers: the server's other API-server processes (:class:`Peers`; None: this one alone).
    """

    def __init__(self, engine: Engine, manager: StreamManager, peers: Peers | None = None):
        self.engine = engine
        self.manager = manager
        self.peers = peers
        self.tasks: set = set()
        # a forwarded append carries base64 (4/3 of the bytes) plus its JSON
        self.max_body_bytes = manager.limits.max_upload_bytes * 4 // 3 + 2**20
        self._encoder: EncodeQueue | None = None  # feature criterion: one batching queue per process
        self._encoder_lock = threading.Lock()

    @classmethod
    def from_vllm(cls, engine_client, args) -> StreamService:
        """The service of a vLLM API-server process (``init_state`` of the endpoint plugin)."""
        engine = VLLMEngine(engine_client, args)
        count = engine.api_process_count
        limits = Limits.from_env().per_process(count)
        manager = StreamManager(limits, engine.geometry, owner=engine.api_process_index)
        return cls(engine, manager, Peers(engine.api_process_index, count))

    @property
    def max_model_len(self) -> int | None:
        return self.engine.max_model_len

    @property
    def served_names(self) -> list[str]:
        return self.engine.served_names

    def chunk_extra_positions(self, stream: Stream, a: int, b: int, steps: int | None = None) -> int:
        """Positions the item of frames ``[a, b)`` spans beyond its video tokens (the family's rule,
        :meth:`DTDMultiModalProcessorMixin._dtd_position_span`): frames far apart in time, or DTD keeping
        few of many steps, whose survivors keep their original positions."""
        tps, factor = stream.geometry.temporal_patch_size, stream.geometry.factor
        steps = (b - a) // tps if steps is None else steps
        size = stream.store.size
        if not steps or size is None:
            return 0
        span = self.engine.item_positions(steps, size[0] // factor, size[1] // factor, stream.settings.fps)
        return span - stream.conversation.chunk_tokens(a, b)

    def extra_positions(self, stream: Stream) -> int:
        return sum(self.chunk_extra_positions(stream, a, b) for a, b in stream.conversation.chunks)

    def encoder(self) -> EncodeQueue:
        """This process's encode-on-arrival queue (loads the vision tower on first use: call it off the
        event loop). Raises :class:`InvalidOption` naming ``dtd_criterion`` when no tower can run."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self.engine.encoder(self.manager.limits.max_pending_encode_steps)
            return self._encoder

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names:
            raise ModelNotFound(f"model {model!r} is not served here (serving {self.served_names})")

    def settings(self, req) -> StreamSettings:
        """The settings of an open request (``OpenStreamRequest``): its ``dtd_*`` options over the
        server's, its memory (the ``memory`` object and the flat fields), the rest."""
        mine = {k: v for k, v in req.model_dump().items() if k.startswith("dtd_") and v is not None}
        defaults = dict(self.engine.server_dtd)
        try:
            dtd = dtd_config_from_kwargs({**defaults, **mine})
        except ValueError as e:  # vllm_plugin.core.DTDOptionError: the option is its field
            raise InvalidOption(getattr(e, "field", None) or "dtd", str(e)) from None
        memory = MemorySettings.from_request(
            req.memory,
            context_tokens=req.context_tokens,
            memory_keep=req.memory_keep,
            max_keyframes=req.max_keyframes,
            keep_turns=req.keep_turns,
        )
        if self.max_model_len and memory.context_tokens and memory.context_tokens > self.max_model_len:
            name = "context_tokens" if req.context_tokens is not None else "memory.context_tokens"
            raise InvalidOption(
                name, f"{name} {memory.context_tokens} is more than the model's context ({self.max_model_len})"
            )
        if req.standing_question is not None:
            self.check_text(req.standing_question, "standing_question")
        if req.instructions is not None:
            self.check_text(req.instructions, "instructions", "instructions")
        positions = self.engine.step_positions
        step = positions(req.fps) if isinstance(req.fps, (int, float)) and req.fps > 0 else 0.0
        room = self.engine.position_room
        if step * MIN_CHUNK_STEPS > room / 2:
            raise InvalidOption(
                "fps",
                f"fps {req.fps:g} is too low for this model: each temporal step advances the video's "
                f"M-RoPE time index by {step:g} positions, and the rotary table leaves room for {room} "
                f"beyond the context; use fps >= {positions(1.0) * MIN_CHUNK_STEPS * 2 / room:.3g}",
            )
        return StreamSettings(
            fps=req.fps,
            dtd=dtd,
            event_level=req.event_level,
            prefill=req.prefill,
            standing_question=req.standing_question,
            instructions=req.instructions,
            answer_max_tokens=req.answer_max_tokens,
            memory=memory,
        )

    def open(self, settings: StreamSettings) -> Stream:
        """Open a stream (feature criterion: call :meth:`encoder` first, off the event loop)."""
        # a template that cannot serve fails before a slot is taken
        prompt = ChatPrompt(self.engine.tokenizer, self.engine.chat_template, settings.instructions)
        feature = settings.dtd.enabled and settings.dtd.criterion == "feature"
        stream = self.manager.open(settings, encoder=self.encoder() if feature else None)
        if settings.prefill == "eager" and not self.engine.prefix_caching:
            stream.eager_stopped = (
                "prefix caching is off on this server: eager prefill would be recomputed at every question"
            )
        stream.conversation.restart(prompt, 0)
        return stream

    def get(self, stream_id: str) -> Stream:
        return self.manager.get(stream_id)

    async def append(self, stream: Stream, frames: list, timestamps: list[float] | None = None) -> dict:
        """Append decoded frames (off the event loop); starts the eager prefill and the proactive
        answers they call for. An append refused because the stream holds too many frames first
        starts a re-anchor (:meth:`relieve`), so that the client's retry fits."""
        try:
            added = await asyncio.to_thread(stream.add_frames, frames, timestamps)
        except RateLimited:
            self.relieve(stream)
            raise
        self.after_append(stream)
        events = added["events"]
        if events and stream.settings.standing_question:
            self._spawn(self.proactive(stream, events))
        return {
            "frames": len(stream.store.frames),
            "steps": stream.store.steps,
            "events": events,
            "kept_per_step": added["kept_per_step"],
        }

    async def close(self, stream_id: str) -> None:
        await asyncio.to_thread(self.manager.close, stream_id)  # may wait for an append's lock

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # a reference until done
        task.add_done_callback(self.tasks.discard)
        return task

    def dp_rank(self, stream: Stream) -> int | None:
        """The engine of a stream under data parallelism: crc32(id) mod the ranks this server reaches."""
        ranks = self.engine.dp_ranks
        return zlib.crc32(stream.id.encode()) % ranks if ranks > 1 else None

    def status(self, stream: Stream) -> dict:
        return {
            **stream.status(),
            "context_budget": self.budget(stream),
            "api_server": self.manager.owner,
            "data_parallel_rank": self.dp_rank(stream),
        }

    async def reap(self, every_s: float) -> None:
        """Free idle streams on a timer (not only when another stream request arrives)."""
        while True:
            await asyncio.sleep(every_s)
            for sid in await asyncio.to_thread(self.manager.sweep):  # may wait for an append's lock
                logger.info("DTD stream %s closed after %.0f s idle", sid, self.manager.limits.idle_seconds)

    @staticmethod
    def dtd_kwargs(stream: Stream) -> dict:
        """The processor options of a stream's requests: its DTD settings, and ``do_resize: false``:
        its frames are already at the size the processor gives one temporal step, and a family whose
        budget covers all frames of a video (Qwen3-VL) would otherwise resize each chunk by its length."""
        return {**stream.settings.dtd.to_kwargs(), "do_resize": False}

    def _prompt(self, stream: Stream, prompt_ids: list[int]) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids, "mm_processor_kwargs": self.dtd_kwargs(stream)}
        items = stream.conversation.video_items()  # the conversation's lock: never held while encoding
        if items:
            prompt["multi_modal_data"] = {"video": items}
            prompt["multi_modal_uuids"] = {"video": stream.conversation.item_uuids()}
        return prompt

    def budget(self, stream: Stream) -> int | None:
        return stream.settings.memory.budget(self.max_model_len)

    def item_cost(self, stream: Stream, chunk: tuple[int, int] | None) -> int:
        """Tokens a video item of frames ``[a, b)`` adds to the conversation (0 for None)."""
        if chunk is None:
            return 0
        a, b = chunk
        conv = stream.conversation
        steps = (b - a) // stream.geometry.temporal_patch_size
        return conv.chunk_tokens(a, b) + 2 + int(conv.step_overhead * steps)

    def next_chunk_cost(self, stream: Stream, steps: int) -> int:
        """Tokens the next chunk of the first ``steps`` decided steps would add (0 when none waits)."""
        conv = stream.conversation
        decided = steps * stream.geometry.temporal_patch_size
        end = min(decided, conv.next_frame + conv.chunk_frames())
        return self.item_cost(stream, (conv.next_frame, end)) if end > conv.next_frame else 0

    def _dropped(self, stream: Stream, frames: int, message: str) -> None:
        stream.events.add(
            {
                "type": "dropped",
                "time": stream.store.timestamps[stream.conversation.next_frame - 1],
                "frames": frames,
                "message": message,
            }
        )

    def eager(self, stream: Stream) -> bool:
        """The stream prefills its frames as they arrive (eager, and its prefill never failed)."""
        return stream.settings.prefill == "eager" and not stream.eager_stopped

    def new_frames_limit(self, stream: Stream, room: int) -> int | None:
        """Kept tokens the next chunk may hold: the share of the budget a re-anchor leaves free, less
        ``room`` (the question); None without a budget."""
        budget = self.budget(stream)
        if budget is None:
            return None
        return max(1, int((1 - stream.settings.memory.anchor_fraction) * budget) - room)

    def prefill_room(self, stream: Stream) -> int:
        """Tokens an eager prefill leaves for the next question (:data:`QUESTION_ROOM`, at most a quarter
        of the budget)."""
        return min(QUESTION_ROOM, (self.budget(stream) or 0) // 4)

    def over_limit(self, stream: Stream, room: int, steps: int | None = None) -> bool:
        """More kept tokens wait, not in a chunk yet (of the first ``steps`` decided steps), than the next
        chunk may hold (:meth:`new_frames_limit`)."""
        limit = self.new_frames_limit(stream, room)
        conv, tps = stream.conversation, stream.geometry.temporal_patch_size
        uncut = conv.uncut_steps()
        stop = uncut.stop if steps is None else min(uncut.stop, steps)
        return limit is not None and stop > uncut.start and conv.chunk_tokens(uncut.start * tps, stop * tps) > limit

    def bound_next_chunk(self, stream: Stream, room: int, decided: int | None = None) -> int | None:
        """Before a cut: the next chunk holds at most :meth:`new_frames_limit` kept tokens. When more
        steps wait, an eager stream (whose prefill fell behind: frames pushed faster than prefilled, or
        held back by a question) cuts them in several chunks, re-anchoring between: the decided steps the
        next cut may take are returned (None: all), nothing is dropped (``decided``: of the first
        ``decided`` steps). A lazy stream nobody asked for longer than its budget holds keeps the latest
        (the older ones are dropped, with an event)."""
        conv = stream.conversation
        steps = conv.uncut_steps()
        tps = stream.geometry.temporal_patch_size
        # positions: the next chunk spans at most half of the room the rotary table leaves (re-anchoring frees the rest)
        room_positions = self.engine.position_room // 2
        max_steps = len(steps)
        while (
            max_steps > 1
            and self.chunk_extra_positions(stream, (steps.stop - max_steps) * tps, steps.stop * tps) > room_positions
        ):
            max_steps = max(1, max_steps // 2)
        if max_steps < len(steps):
            dropped = conv.drop_uncut(0, keep_steps=max_steps)
            self._dropped(
                stream,
                dropped,
                f"{dropped} frames were dropped: the new frames spanned more M-RoPE positions "
                "than the model's rotary table leaves room for (a long stretch at a low fps)",
            )
            steps = conv.uncut_steps()
        limit = self.new_frames_limit(stream, room)
        if limit is None or not self.over_limit(stream, room, decided if self.eager(stream) else None):
            return None
        if self.eager(stream):
            return steps.start + conv.steps_within(limit)
        dropped = conv.drop_uncut(limit)
        if dropped:
            self._dropped(
                stream,
                dropped,
                f"{dropped} frames not asked about were dropped "
                "(they were more than the budget leaves for new frames; an eager stream prefills them instead)",
            )
        return None

    def plan_reanchor(self, stream: Stream, incoming: int, trigger: str, cut: bool = False) -> ReanchorPlan | None:
        """A re-anchor, when ``incoming`` more tokens would take the conversation past its budget or the
        stream nears its frame or item limit (under the stream's chat lock; None when none is due, or
        one is already being prefilled): the memory policy's selection (:meth:`Conversation.plan`;
        ``cut``: the chunk the request just cut is the latest and stays) and the last ``keep_turns``
        turns, as many as fit a quarter of the re-anchored share (:meth:`ChatPrompt.restart`). Nothing
        changes until :meth:`apply_reanchor`."""
        conv = stream.conversation
        if stream.reanchoring is not None:
            return None
        budget = self.budget(stream)
        # positions: the items' span beyond their tokens must stay within the rotary table's room
        full = conv.full() or self.extra_positions(stream) > self.engine.position_room * 3 // 4
        older = len(conv.chunks) - int(cut)
        if older < 1 or (not full and (budget is None or conv.context_tokens + incoming <= budget)):
            return None
        memory = stream.settings.memory
        share = int(memory.anchor_fraction * (budget or self.max_model_len or 4096))
        prompt = ChatPrompt(self.engine.tokenizer, self.engine.chat_template, stream.settings.instructions)
        turns = conv.prompt.last_turns(memory.keep_turns)
        prompt.restart(turns, 0)
        while turns and len(prompt.ids) > share // 4:  # long questions do not wedge the stream
            turns = turns[1:]
            prompt.restart(turns, 0)
        target = share - len(prompt.ids) - 16
        if not full and conv.context_tokens <= target:
            return None  # what is in would stay: the new frames (or a long answer) are too many for any re-anchor
        anchor = conv.plan(max(1, target), step_overhead=conv.step_overhead)
        return ReanchorPlan(
            anchor=anchor,
            prompt=prompt,
            trigger=trigger,
            budget=budget,
            context_before=conv.context_tokens,
            chunks=len(conv.chunks),
            messages=len(conv.prompt.messages),
            open_videos=conv.prompt.open_videos,
            cut=cut,
        )

    def apply_reanchor(self, stream: Stream, plan: ReanchorPlan) -> None:
        """Make ``plan`` the stream's conversation (under the stream's chat lock): its items, then the
        chunks questions cut since it was planned; its text, then the turns answered since (as text).
        The next request prefills what the engine does not hold yet."""
        conv, prompt = stream.conversation, plan.prompt
        old = conv.prompt
        carried = conv.apply(plan.anchor, plan.chunks)
        # the re-anchored items open the user turn (the cut chunk, if any, opens when its request is done)
        prompt.open_videos = len(plan.anchor.ranges) - int(plan.cut)
        turns = old.turns_since(plan.messages)
        for i, (question, videos, answer) in enumerate(turns):
            # the first turn's videos began with the ones open at the plan: they are in the anchor now
            prompt.replay(question, prompt.open_videos + videos - plan.open_videos if i == 0 else videos, answer)
        prompt.open_videos += old.open_videos - (plan.open_videos if not turns else 0)
        # until the engine counts it (a cut chunk, in the anchor's tokens, is counted again by its request)
        tokens = plan.anchor.tokens + sum(self.item_cost(stream, c) for c in carried)
        conv.restart(prompt, len(prompt.ids) + tokens + 16)
        store = stream.store
        stream.events.add(
            {
                "type": "reanchor",
                "time": store.timestamps[conv.next_frame - 1],
                "reanchor": conv.reanchors,
                "budget": plan.budget,
                "trigger": plan.trigger,
                "context_tokens_before": plan.context_before,
                "context_tokens_after": conv.context_tokens,
                "chunks_before": plan.chunks,
                "chunk_ranges": [list(c) for c in conv.chunks],
                "keyframes": plan.anchor.keyframes,
                "turns_kept": len(prompt.messages) // 2,
                "answered_meanwhile": len(turns),
                "prefilled_s": plan.prefilled_s,
                "evicted_frames": store.evicted_frames,
                "held_frames": store.held_frames,
            }
        )
        logger.info(
            "DTD stream %s: re-anchored at %d tokens (budget %s): %d video items (%d keyframes), %d turns",
            stream.id,
            plan.context_before,
            plan.budget,
            len(conv.chunks),
            len(plan.anchor.keyframes),
            len(prompt.messages) // 2,
        )

    def maybe_reanchor(self, stream: Stream, incoming: int, trigger: str, cut: bool = False) -> bool:
        """Re-anchor now, if due (:meth:`plan_reanchor`, :meth:`apply_reanchor`): the request that called
        it prefills the re-anchored conversation (a lazy stream's question, or an eager stream that
        must re-anchor before its next chunk fits; an eager stream's prefill otherwise re-anchors off
        the question path: :meth:`reanchor_ahead`)."""
        plan = self.plan_reanchor(stream, incoming, trigger, cut)
        if plan is None:
            return False
        self.apply_reanchor(stream, plan)
        return True

    def old_can_take(self, stream: Stream, room: int) -> bool:
        """While a re-anchor is prefilled: whether the conversation as it is can still take a question
        of ``room`` tokens (text and answer) with the frames not in it yet, within the model's context,
        the item limit and the rotary table's room."""
        conv = stream.conversation
        tps = stream.geometry.temporal_patch_size
        steps = conv.uncut_steps()
        new = conv.chunk_tokens(steps.start * tps, steps.stop * tps) if len(steps) else 0
        # the items the question and the prefills before it cut (an eager stream's are bounded in kept tokens too)
        items = conv.chunks_to_cut(
            self.new_frames_limit(stream, self.prefill_room(stream)) if self.eager(stream) else None
        )
        incoming = new + items * 2 + int(conv.step_overhead * len(steps)) + room
        if self.max_model_len and conv.context_tokens + incoming + 16 > self.max_model_len:
            return False
        if len(conv.chunks) + items + 1 >= stream.limits.max_chunks:
            return False
        # positions: the conversation's items and the ones the question cuts (the processor refuses past the room)
        a, b, frames = steps.start * tps, steps.stop * tps, conv.chunk_frames()
        new_extra = sum(max(0, self.chunk_extra_positions(stream, s, min(s + frames, b))) for s in range(a, b, frames))
        return self.extra_positions(stream) + new_extra <= self.engine.position_room

    async def reanchor_ahead(self, stream: Stream, plan: ReanchorPlan) -> None:
        """An eager stream's re-anchor, off the question path: the re-anchored conversation (its items,
        kept turns and the open user turn's videos) is prefilled WITHOUT the stream's chat lock, in
        pieces of about :data:`AHEAD_PIECE_TOKENS` (one-token requests for growing prefixes, each
        served from the prefix cache up to the piece before: a question reaches the engine between two
        pieces instead of waiting behind the whole prefill); questions meanwhile are answered on the
        conversation as it is (its KV is in the prefix cache), then the stream switches
        (:meth:`apply_reanchor`). A prefill that fails costs speed only: the switch happens all the
        same and the next request prefills it."""
        t0 = time.perf_counter()
        try:
            ranges = plan.anchor.ranges
            items, uuids = stream.conversation.items_of(ranges)
            params = self.engine.sampling_params(1, 0.0)
            for piece, k in enumerate(self.ahead_pieces(stream, ranges)):
                if stream.closed:  # nobody switches to it (the switch is skipped)
                    return
                request = {
                    "prompt_token_ids": await off_loop(plan.prompt.video_prefix, k),
                    "mm_processor_kwargs": self.dtd_kwargs(stream),
                    "multi_modal_data": {"video": items[:k]},
                    "multi_modal_uuids": {"video": uuids[:k]},
                }
                rid = f"{stream.id[:12]}-reanchor{stream.conversation.reanchors + 1}.{piece}-{uuid.uuid4().hex[:8]}"
                async for _ in self.engine_outputs(stream, request, params, rid):
                    pass
            plan.prefilled_s = round(time.perf_counter() - t0, 4)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("DTD stream %s: the re-anchored conversation's prefill failed: %s", stream.id, describe(e))
        finally:
            try:
                async with stream.chat_lock:
                    if not stream.closed:
                        await off_loop(self.apply_reanchor, stream, plan)
            finally:
                stream.reanchoring = None
                plan.done.set()

    def ahead_pieces(self, stream: Stream, ranges: list[tuple[int, int]]) -> list[int]:
        """How many of the re-anchored items each piece of :meth:`reanchor_ahead` ends with: every
        piece adds at most :data:`AHEAD_PIECE_TOKENS` (or one item), the last one ends with all."""
        ends, added = [], 0
        for k, r in enumerate(ranges):
            cost = self.item_cost(stream, r)
            if k and added + cost > AHEAD_PIECE_TOKENS:
                ends.append(k)
                added = 0
            added += cost
        return [*ends, len(ranges)] if ranges else []

    def relieve(self, stream: Stream) -> None:
        """An eager stream refused frames because it holds too many and no prefill is running (all it
        holds is in its conversation): re-anchor now, off the append, so that the client's retry fits."""

        async def run():
            async with stream.chat_lock:
                if not stream.closed and stream.conversation.full():
                    await off_loop(self.maybe_reanchor, stream, 0, "memory")  # renders the template: not on the loop

        if stream.prefill_task is None:
            self._spawn(run())

    async def engine_outputs(self, stream: Stream, prompt: dict, params, rid: str):
        """The engine's outputs for one request of the stream (on its data-parallel rank), each within
        ``engine_timeout_s`` of the one before: an engine that goes silent (a remote data-parallel rank
        that died: vLLM 0.32 does not notice) gets the request aborted (cancelling vLLM's ``generate``
        aborts it) and :class:`Unavailable`, instead of a question and its stream hanging forever."""
        rank = self.dp_rank(stream)
        timeout = self.manager.limits.engine_timeout_s or None  # 0: none
        outputs = aiter(self.engine.generate(prompt, params, rid, data_parallel_rank=rank))
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an output that is already there
                # when the caller is cancelled, and swallows the cancel (a response.cancel ran to max_tokens)
                async with asyncio.timeout(timeout):
                    out = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                where = f" (data-parallel rank {rank})" if rank is not None else ""
                logger.error(
                    "DTD stream %s: request %s: no output from the engine%s for %.0f s", stream.id, rid, where, timeout
                )
                raise Unavailable(
                    f"the engine{where} gave no output for {timeout:g} s (DTD_STREAM_ENGINE_TIMEOUT_S); "
                    "the request was aborted: retry, or check the engine node"
                ) from None
            yield out

    async def _engine_generate(self, stream: Stream, prompt_ids: list[int], params, rid: str):
        """The engine's ``generate`` for a request of the stream's conversation. vLLM ends a request
        whose items its engine-side processor cache lost (P0/P1 drift) with ``finish_reason`` "error"
        and no token, and drops them from the API server's cache: the request is sent again once, with
        every item's data (the stream holds it). A request that still fails raises :class:`Unavailable`."""
        for attempt in range(2):
            async for out in self.engine_outputs(
                stream, self._prompt(stream, prompt_ids), params, rid if not attempt else f"{rid}-retry"
            ):
                o = out.outputs[0] if out.outputs else None
                if out.finished and o is not None and o.finish_reason == "error" and not o.token_ids:
                    # vLLM 0.32 ends a request this way when its engine-side multimodal cache lost an item
                    logger.warning(
                        "DTD stream %s: request %s ended with an engine error (no token)%s",
                        stream.id,
                        rid,
                        "; sending it again with every item's data" if not attempt else "",
                    )
                    break
                yield out
            else:
                return
        raise Unavailable("the engine ended this request with an error twice (see the server log); retry")

    def counted(self, stream: Stream, prompt_ids: list[int], out, answer: int = 0) -> None:
        """Record what the engine counted for a request of the conversation (:meth:`Conversation.counted`)."""
        stream.conversation.counted(len(out.prompt_token_ids or []), len(prompt_ids), answer)

    def past_budget(self, stream: Stream) -> bool:
        """The conversation is past its budget (a question on an eager stream passed it: the re-anchor
        follows ahead, frames or not)."""
        budget = self.budget(stream)
        return budget is not None and stream.conversation.context_tokens > budget

    def after_append(self, stream: Stream) -> None:
        """Eager prefill: start the stream's prefill task when complete steps wait, or the conversation is
        past its budget, and none runs."""
        if (
            stream.settings.prefill != "eager"
            or stream.eager_stopped
            or stream.prefill_task is not None
            or not (stream.eager_due() or self.past_budget(stream))
        ):
            return
        stream.prefill_task = self._spawn(self.prefill(stream))

    async def prefill(self, stream: Stream) -> None:
        """Eager prefill: while complete temporal steps with kept tokens are not in a chunk, cut them
        into one and send the conversation up to that chunk as a prompt-only request (one generated
        token, discarded). Steps where DTD kept nothing wait for the next chunk.
        Its KV blocks stay in vLLM's prefix cache, so the next question prefills only its own text
        (plus the partial block before it). Eviction costs speed only: every question sends its
        whole prompt."""
        # the conversation's next frame when the last re-anchor was planned ahead: one plan per point (chunks
        # questions cut meanwhile move it, and the switch may leave the conversation due again: planned ahead too)
        ahead_at = -1
        try:
            while True:
                plan = None
                async with stream.chat_lock:
                    if stream.closed or stream.eager_stopped or not (stream.eager_due() or self.past_budget(stream)):
                        return
                    room = self.prefill_room(stream)
                    steps = len(stream.store.kept_per_step)  # what the check and the cut below both take
                    try:
                        # a re-anchor due before the next chunk is prefilled ahead, off the question path
                        if stream.conversation.next_frame != ahead_at:
                            plan = await off_loop(
                                self.plan_reanchor, stream, self.next_chunk_cost(stream, steps) + room, "prefill"
                            )
                            if plan is not None:
                                ahead_at = stream.conversation.next_frame
                        if plan is None and not await self._prefill_chunk(stream, room, steps):
                            return
                    except Exception as e:
                        # stop, once: the stream goes on lazily (questions prefill what arrived)
                        stream.eager_stopped = f"eager prefill failed: {describe(e)}"
                        logger.warning(
                            "DTD stream %s: %s; the stream continues with lazy prefill", stream.id, stream.eager_stopped
                        )
                        stream.events.add(
                            {"type": "error", "message": f"{stream.eager_stopped}; questions now prefill new frames"}
                        )
                        return
                    stream.reanchoring = plan
                if plan is not None:
                    await self.reanchor_ahead(stream, plan)
        finally:
            stream.prefill_task = None

    async def _prefill_chunk(self, stream: Stream, room: int, steps: int | None = None) -> bool:
        """Under the stream's chat lock: cut the next chunk (at most :meth:`Conversation.chunk_frames`)
        and prefill the conversation up to it (a one-token request), re-anchoring first if due. False
        when nothing waits. On failure the chunk is dropped (its steps go with the next request) and
        the error raised."""
        conv = stream.conversation
        cut: list = []
        try:
            # off the event loop; a cancellation waits for it, then the handler below sees the cut
            await off_loop(self._cut_into, stream, room, cut, steps)
            if not cut:
                return False
            # the re-anchored conversation is prefilled here, with the new chunk, off the question path
            prompt_ids = await off_loop(self._prefill_prompt, stream, cut[0], room)
            if self.max_model_len and len(prompt_ids) + 1 > self.max_model_len:
                raise InvalidRequest(f"the conversation ({len(prompt_ids)} tokens) no longer fits the model's context")
            rid = f"{stream.id[:12]}-prefill{len(conv.chunks)}-{uuid.uuid4().hex[:8]}"
            last = None
            async for out in self._engine_generate(stream, prompt_ids, self.engine.sampling_params(1, 0.0), rid):
                last = out
            if last is not None:
                self.counted(stream, prompt_ids, last)
        except BaseException:
            if cut:
                conv.drop_last_chunk()
            raise
        conv.prompt.open_videos += 1
        conv.prefills += 1
        return True

    def check_text(self, text: str, what: str, field: str | None = None) -> None:
        """A question (or standing question) longer than any context could hold is refused before it is
        tokenized: at most ``max_model_len`` tokens of :data:`MAX_CHARS_PER_TOKEN` characters each."""
        limit = MAX_CHARS_PER_TOKEN * (self.max_model_len or 32768)
        if len(text) > limit:
            raise InvalidOption(
                field or what, f"{what} has {len(text)} characters; at most {limit} fit this model's context"
            )

    def _question_tokens(self, question: str) -> int:
        return len(self.engine.tokenizer.encode(question, add_special_tokens=False)) + 16

    def _cut_into(self, stream: Stream, room: int, cut: list, steps: int | None = None) -> None:
        """Bound what waits (:meth:`bound_next_chunk`), cut the next chunk into ``cut`` (none: empty; of
        the first ``steps`` decided steps: :meth:`Conversation.cut_chunk`)."""
        bound = self.bound_next_chunk(stream, room, steps)
        if bound is not None:
            steps = bound if steps is None else min(steps, bound)
        chunk = stream.conversation.cut_chunk(steps)
        if chunk is not None:
            cut.append(chunk)

    def _prefill_prompt(self, stream: Stream, chunk: tuple[int, int], room: int) -> list[int]:
        conv = stream.conversation
        self.maybe_reanchor(stream, self.item_cost(stream, chunk) + room, "prefill", cut=True)
        prompt_ids = conv.prompt.video_prefix(conv.prompt.open_videos + 1)
        conv.video_items()
        return prompt_ids

    def _question_prompt(self, stream: Stream, chunk, question: str, room: int) -> tuple[int, list[int]]:
        """(video items in the prompt, prompt ids) of the question's turn, re-anchoring first if due; the
        items are built here (frames stacked), not on the event loop."""
        conv = stream.conversation
        incoming = self.item_cost(stream, chunk) + room
        # an eager stream's re-anchor is prefilled ahead by its next prefill: the question is answered on the
        # conversation as it is while the model's context takes it (the budget is passed by one question)
        ahead = self.eager(stream) and self.engine.prefix_caching
        if not (ahead and not conv.full() and self.old_can_take(stream, incoming)):
            self.maybe_reanchor(stream, incoming, "question", cut=chunk is not None)
        videos = conv.prompt.open_videos + (chunk is not None)
        prompt_ids = conv.prompt.next_turn(question, videos)
        conv.video_items()
        return videos, prompt_ids

    async def generate(
        self,
        stream: Stream,
        question: str,
        max_tokens: int,
        temperature: float,
        ignore_eos: bool = False,
        remember: bool = True,
        timing: openai_format.Timing | None = None,
    ):
        """Async generator of the engine's outputs for one question at the stream's current point.
        ``remember=False``: the turn does not stay in the conversation (:meth:`ChatPrompt.forget`).
        While a re-anchor is prefilled ahead (:meth:`reanchor_ahead`) the question is answered on the
        conversation as it is, unless that can no longer take it (:meth:`old_can_take`): then it waits
        for the switch. ``timing`` records that wait and whether this question re-anchored itself."""
        self.check_text(question, "the question", "messages")
        conv = stream.conversation
        timing = timing if timing is not None else openai_format.Timing()
        # tokenizing runs off the event loop
        question_tokens = await off_loop(self._question_tokens, question)
        if self.max_model_len and question_tokens + max_tokens > self.max_model_len:  # refused before any change
            raise InvalidOption(
                "max_tokens",
                f"max_tokens is too large: {max_tokens}; the model's context is "
                f"{self.max_model_len} tokens and the question alone takes {question_tokens}",
            )
        room = question_tokens + max_tokens
        while True:  # no await between taking the lock and the try below: a cancellation cannot leak it
            await stream.chat_lock.acquire()
            pending = stream.reanchoring
            if pending is None or self.old_can_take(stream, room):
                break
            stream.chat_lock.release()
            t0 = time.perf_counter()
            await pending.done.wait()
            timing.reanchor_wait_s += time.perf_counter() - t0
        try:
            timing.during_reanchor = pending is not None
            reanchors = conv.reanchors
            # a backlog longer than one chunk: all but its last chunk are prefilled first, as an eager stream
            # would have (each video item bounded in frames and bytes, and an eager stream's in kept tokens:
            # :meth:`bound_next_chunk`, in the chunks its prefill cuts); an error here fails the question, with
            # its reason. An eager stream's question takes the steps decided when it got the stream: frames
            # arriving meanwhile wait for the next prefill (the question does not chase a fast client)
            eager = self.eager(stream)
            decided = len(stream.store.kept_per_step) if eager else None
            while conv.backlog(decided) or (eager and self.over_limit(stream, room, decided)):
                if not await self._prefill_chunk(stream, self.prefill_room(stream) if eager else room, decided):
                    break
            cut: list = []
            try:
                # rendering the chat template and stacking frames run off the event loop
                await off_loop(self._cut_into, stream, room, cut, decided)
                chunk = cut[0] if cut else None
                videos, prompt_ids = await off_loop(self._question_prompt, stream, chunk, question, room)
                # the question prefills a re-anchored conversation itself (lazy, or one no prefill ran ahead for)
                timing.reanchored = conv.reanchors > reanchors
                if self.max_model_len and len(prompt_ids) + max_tokens > self.max_model_len:
                    raise InvalidOption(
                        "max_tokens",
                        f"max_tokens is too large: {max_tokens}; the model's context is "
                        f"{self.max_model_len} tokens and this conversation already has at least {len(prompt_ids)}",
                    )
                params = self.engine.sampling_params(max_tokens, temperature, ignore_eos)
                rid = f"{stream.id[:12]}-q{conv.questions}-{uuid.uuid4().hex[:8]}"
                last = None
                timing.sent()
                async for out in self._engine_generate(stream, prompt_ids, params, rid):
                    last = out
                    yield out
            except BaseException:
                if cut:  # the turn did not happen: its chunk is not part of the conversation
                    conv.drop_last_chunk()
                raise
            conv.questions += 1
            o = last.outputs[0] if last is not None else None
            ids = list(o.token_ids) if o is not None else []
            if last is not None:
                self.counted(stream, prompt_ids, last, answer=len(ids) + 2 if remember else 0)
            if not remember:
                conv.prompt.forget(videos)
            else:
                # ended on a stop TOKEN (EOS: stop_reason None, or a generation-config EOS / stop token id,
                # which vLLM keeps in token_ids); a stop string (str) is not in the ids
                stopped = o is not None and o.finish_reason == "stop" and not isinstance(o.stop_reason, str)
                conv.prompt.commit(
                    prompt_ids,
                    question,
                    videos,
                    ids,
                    o.text if o is not None else "",
                    stop_ids=ids[-1:] if stopped else (),
                )
            self.after_append(stream)  # an eager stream this question took past its budget: the re-anchor follows ahead
        finally:
            stream.chat_lock.release()

    def state(self, stream: Stream, out, timing: openai_format.Timing, with_ids: bool = False) -> dict:
        prompt_ids = list(out.prompt_token_ids or [])
        store, conv = stream.store, stream.conversation
        state = {
            "frames": len(store.frames),
            "chunks": len(conv.chunks),
            "time": store.timestamps[-1] if store.timestamps else None,
            "question": conv.questions,
            "ttft_s": timing.ttft_s,
            "e2e_s": timing.elapsed(),
            "video_tokens_per_chunk": openai_format.video_tokens_per_chunk(
                conv.video_items(), prompt_ids, self.engine.video_pad
            ),
            "chunk_ranges": [list(c) for c in conv.chunks],
            "context_tokens": conv.context_tokens,
            "reanchors": conv.reanchors,
            "held_frames": store.held_frames,
            "evicted_frames": store.evicted_frames,
            # answered on the conversation as it was while a re-anchor was prefilled ahead
            "answered_during_reanchor": timing.during_reanchor,
            # this question's prompt was a re-anchored conversation it prefilled itself
            "reanchored": timing.reanchored,
            # waited for a re-anchor's prefill: another request's, and this one's own when it re-anchored
            # from the question's arrival to its request reaching the engine: waiting for the stream (a prefill
            # of its running, a re-anchor), its backlog's prefills, rendering; the rest of ttft_s is the engine's
            "stream_wait_s": None if timing.sent_s is None else round(timing.sent_s, 4),
            "reanchor_wait_s": round(timing.reanchor_wait_s + (timing.ttft_s or 0.0) * timing.reanchored, 4),
        }
        if with_ids:
            state["prompt_token_ids"] = prompt_ids
            state["completion_token_ids"] = list(out.outputs[0].token_ids)
        return state

    async def answer(
        self,
        stream: Stream,
        question: str,
        max_tokens: int,
        temperature: float = 0.0,
        with_ids: bool = False,
        ignore_eos: bool = False,
        remember: bool = True,
    ) -> dict:
        timing, out = openai_format.Timing(), None
        async for out in self.generate(stream, question, max_tokens, temperature, ignore_eos, remember, timing):
            timing.saw(out)
        return openai_format.completion(out, self.served_names[0], self.state(stream, out, timing, with_ids))

    async def answer_sse(
        self,
        stream: Stream,
        question: str,
        max_tokens: int,
        temperature: float = 0.0,
        ignore_eos: bool = False,
        remember: bool = True,
    ):
        """The async iterator of SSE lines of one question's answer (:meth:`generate`'s outputs): errors
        before the first output raise here, so the route can answer them with a 4xx before the event
        stream starts."""
        timing = openai_format.Timing()
        gen = self.generate(stream, question, max_tokens, temperature, ignore_eos, remember, timing)
        first = await gen.__anext__()
        model = self.served_names[0]

        async def events():
            out, sent = first, 0
            try:
                while True:
                    timing.saw(out)
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield openai_format.sse(openai_format.delta_chunk(out, model, text[sent:]))
                        sent = len(text)
                    try:
                        out = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                final = openai_format.completion(out, model, self.state(stream, out, timing))
                yield openai_format.sse(openai_format.final_chunk(final))
            except Exception as e:  # a clean SSE error instead of a torn connection
                yield openai_format.sse({"error": {"message": str(e), "code": 500}})
            yield openai_format.DONE

        return events()

    async def proactive(self, stream: Stream, events: list[dict]) -> None:
        q = stream.settings.standing_question
        if q is None:
            return
        for e in events:
            try:
                resp = await self.answer(stream, q, stream.settings.answer_max_tokens)
                stream.events.add(
                    {
                        "type": "answer",
                        "trigger": e["index"],
                        "time": e["time"],
                        "question": q,
                        "text": resp["choices"][0]["message"]["content"],
                        "usage": resp["usage"],
                    }
                )
            except Exception as exc:  # never let a background answer take anything down
                logger.warning("DTD stream %s: proactive answer failed: %s", stream.id, describe(exc))
                stream.events.add({"type": "error", "trigger": e["index"], "message": describe(exc)})
