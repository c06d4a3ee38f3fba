"""A stream's memory: what stays in its conversation when the conversation reaches its budget.

No vLLM import: the policies and their selection are plain data and arithmetic;
:class:`vllm_plugin.streams.conversation.Conversation` applies a selection (frees what is not
selected) and :mod:`vllm_plugin.streams.service` rebuilds the conversation's text and prefills it.

Memory policies
---------------
A policy is one class: a :class:`MemoryPolicy` subclass with a ``name``, registered with
:func:`register_policy`. Each stream has its own instance (its state is the stream's), which

* reads and validates its own options (:meth:`MemoryPolicy.configure`, through an :class:`Options`
  reader: a bad or unknown option is a 400 naming it);
* :meth:`~MemoryPolicy.observe` sees every temporal step as DTD decides it (its kept tokens, whether
  it is a scene change), and :meth:`~MemoryPolicy.forget` hears of steps whose frames were freed;
* :meth:`~MemoryPolicy.select` picks, at a re-anchor, what the new conversation holds within a
  :class:`Budget`: frame ranges of the stream, returned as an :class:`Anchor`.

A request names the policy and its options in its ``memory`` object (``{"keep": "recent",
...}``), next to the options every policy shares (:class:`MemorySettings`: ``context_tokens``,
``keep_turns``, ``anchor_fraction``); nothing else changes when a policy is added.

Re-anchoring
------------
A stream's conversation is its video chunks (one video item per eager prefill or question with new
frames) and its turns. Before a request would take the conversation past ``context_tokens``, the
stream **re-anchors**: a new conversation is built from the policy's selection:

* ``recent``: the latest chunks, whole and unchanged, as many as fit in ``anchor_fraction`` of the
  budget (always at least the latest one);
* ``recent+keyframes`` (the default): the same, and before them **keyframes**: the stream's first
  temporal step and every step whose kept fraction rose to ``event_level`` (the scene changes,
  :class:`vllm_plugin.streams.events.EventLog`), each a one-step video item with the tokens DTD kept
  for it when it arrived; of those before the recent window at most ``max_keyframes``, spread evenly
  over the time they span (the stream's first step and the latest always among them: long-term
  memory over the whole stream, not only before the window); a keyframe a re-anchor drops is gone
  (its frames are freed);

and the last ``keep_turns`` questions and answers, as text turns before the videos.

Time. Every kept token keeps the place it had in its video item: a recent chunk is the same item
(same frames, same mask, same step times), and a keyframe's item is its one step. What each family
was trained on decides how time across items reaches the model:

* Qwen3-VL writes each step's time as text (``<t seconds>``) and reads time from nothing else; the
  items carry the steps' original stream times (``dtd_step_times``), so a keyframe from minute 3
  says ``<180.0 seconds>`` after any number of re-anchors.
* Qwen2.5-VL and Qwen2-VL have no time text: their temporal M-RoPE index is time since the start of
  the video item (``t × second_per_grid_t × tokens_per_second``), as in training, where one video
  is one item. Inside an item that is kept exactly; between items the model sees their order, as it
  does for the chunks of any stream. Absolute stream time is NOT put into the positions: a stream of
  hours would push temporal indices past anything the model was trained on (and past the rotary
  table of ``max_position_embeddings``), and a re-anchor would change the index of every past token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from vllm_plugin.errors import InvalidOption

CONTEXT_FRACTION = 0.75  # default budget: this share of the server's max model length
DEFAULT_POLICY = "recent+keyframes"
# the open request's flat fields (the memory object's keys at the top level of the request)
FLAT_FIELDS = {
    "context_tokens": "context_tokens",
    "memory_keep": "keep",
    "max_keyframes": "max_keyframes",
    "keep_turns": "keep_turns",
}


class Options:
    """Options as a request gave them, each read once by whoever owns it: :meth:`take` validates
    one (a value it cannot take raises :class:`InvalidOption` naming it), :meth:`finish` refuses
    what nobody read. ``spell(key)`` is the option as the client wrote it (``memory.max_keyframes``,
    or a flat request field)."""

    def __init__(self, given: Mapping[str, Any] | None = None, spell: Callable[[str], str] = str):
        self.given = {k: v for k, v in dict(given or {}).items() if v is not None}
        self.spell = spell
        self.read: dict[str, Any] = {}

    def take(self, key: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        """The option ``key`` (``default`` when absent or null); ``ok(value)`` must hold, else
        ``<field> must be <expected>, got <value>``."""
        value = self.given.get(key, default)
        if key in self.given and not ok(value):
            name = self.spell(key)
            raise InvalidOption(name, f"{name} must be {expected}, got {value!r}")
        self.read[key] = value
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        return self.take(key, default, lambda v: isinstance(v, int) and lo <= v <= hi, f"in [{lo}, {hi}]")

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        return self.take(key, default, lambda v: isinstance(v, (int, float)) and lo <= v <= hi, f"in [{lo:g}, {hi:g}]")

    def finish(self, owner: str) -> None:
        """Every option given was read (by ``owner``, the last reader), else :class:`InvalidOption`."""
        unknown = sorted((k for k in self.given if k not in self.read), key=str)
        if unknown:
            name = self.spell(unknown[0])
            raise InvalidOption(name, f"{name}: not an option of {owner} (its options: {sorted(self.read, key=str)})")


@dataclass(frozen=True)
class Anchor:
    """A re-anchor's selection: frame ranges ``[a, b)`` in stream order (keyframe steps, then the
    recent chunks), which of them are keyframes (temporal steps: one-step items the policy adds,
    not chunks of the conversation), and the estimated video tokens they hold."""

    ranges: list[tuple[int, int]]
    keyframes: list[int]  # temporal steps
    tokens: int


@dataclass(frozen=True)
class Budget:
    """What a re-anchored conversation's video items may hold: ``tokens`` (videos and their
    per-item overhead), ``max_frames`` and ``max_items`` (the stream's frame and item limits: a
    static camera fills them before any token budget; None: no limit). ``cost(a, b)``: the tokens the
    video item of frames ``[a, b)`` adds (:func:`item_cost`); ``temporal_patch_size``: frames per
    temporal step (a one-step item of step ``s`` is frames ``[s·tps, (s+1)·tps)``)."""

    tokens: int
    cost: Callable[[int, int], int]
    temporal_patch_size: int
    max_frames: int | None = None
    max_items: int | None = None

    def fits(self, tokens: int, frames: int, items: int) -> bool:
        return (
            tokens <= self.tokens
            and (self.max_frames is None or frames <= self.max_frames)
            and (self.max_items is None or items <= self.max_items)
        )


def item_cost(
    kept_per_step: Sequence[int], temporal_patch_size: int, item_overhead: int = 2, step_overhead: float = 0.0
) -> Callable[[int, int], int]:
    """``cost(a, b)``: tokens the video item of frames ``[a, b)`` adds: its kept tokens (one for an
    item that kept none), ``item_overhead`` (its placeholder's frame) and ``step_overhead`` per
    temporal step (Qwen3-VL's time text)."""
    tps = temporal_patch_size

    def cost(a: int, b: int) -> int:
        return max(1, sum(kept_per_step[a // tps : b // tps])) + item_overhead + int(step_overhead * (b - a) // tps)

    return cost


class MemoryPolicy:
    """Base class of memory policies (see the module's docstring). A subclass sets ``name``,
    reads its options in :meth:`configure` and implements :meth:`select`; :meth:`observe` and
    :meth:`forget` when it keeps state. Its options are its constructor's keyword arguments
    (``RecentKeyframesPolicy(max_keyframes=3)``); a stream gets its own instance (:meth:`fresh`)."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self._setup(Options(options))

    @classmethod
    def from_options(cls, options: Options) -> MemoryPolicy:
        """The policy with the options ``options`` holds (validated; unknown ones refused)."""
        policy = cls.__new__(cls)
        policy._setup(options)
        return policy

    def _setup(self, options: Options) -> None:
        shared = set(options.read)  # read before: the options every policy shares (MemorySettings)
        self.configure(options)
        options.finish(f"memory policy {self.name!r}")
        self._options = {k: v for k, v in options.read.items() if k not in shared}

    def configure(self, options: Options) -> None:
        """Read and validate this policy's options (``options.integer(...)``, ...) and set up its
        state. None by default."""

    def options(self) -> dict[str, Any]:
        """This policy's options, as a request gives them."""
        return dict(self._options)

    def fresh(self) -> MemoryPolicy:
        """A policy with the same options and no state (for a new stream)."""
        return type(self)(**self._options)

    def observe(self, step: int, kept: int, scene_change: bool = False) -> None:
        """Temporal step ``step`` was decided: DTD kept ``kept`` of its tokens; ``scene_change``: its
        kept fraction rose to the stream's ``event_level`` (the first step is never one)."""

    def forget(self, steps: Iterable[int]) -> None:
        """The frames of these temporal steps were freed: they cannot be selected again."""

    def select(self, chunks: Sequence[tuple[int, int]], budget: Budget) -> Anchor:
        """What a re-anchored conversation holds.

        Args:
            chunks: frame ranges ``[a, b)`` of the conversation's video items, in stream order (the
                last one is the latest; one-step items a previous selection added are not among
                them: the policy adds its own again).
            budget: what the selection may hold.
        Returns:
            :class:`Anchor`, ranges in stream order; it must hold the latest chunk.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({opts})"


_REGISTRY: dict[str, type[MemoryPolicy]] = {}


def register_policy(cls: type[MemoryPolicy]) -> type[MemoryPolicy]:
    """Class decorator: make ``cls`` selectable as ``memory: {"keep": cls.name}``."""
    if not (isinstance(cls, type) and issubclass(cls, MemoryPolicy)) or not cls.name:
        raise TypeError(f"{cls!r} must be a MemoryPolicy subclass with a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"a memory policy named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})"
        )
    _REGISTRY[cls.name] = cls
    return cls


def unregister_policy(name: str) -> None:
    """Remove a policy (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def policy_names() -> tuple[str, ...]:
    """The registered policies' names."""
    return tuple(_REGISTRY)


def get_policy(name: str) -> type[MemoryPolicy]:
    """The policy class named ``name``; :class:`InvalidOption` naming ``memory.keep`` if none."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidOption("memory.keep", f"memory.keep must be one of {list(policy_names())}, got {name!r}")
    return _REGISTRY[name]


def select_window(
    chunks: Sequence[tuple[int, int]], budget: Budget, candidates: Sequence[int] = (), max_keyframes: int = 0
) -> Anchor:
    """The recent window and, before it, keyframes: the latest chunk is always selected; older
    chunks join the window, latest first, while the window and the keyframes before it fit the
    budget; the keyframes are the ``candidates`` (temporal steps) before the window, at most
    ``max_keyframes`` of them spread evenly over the time the candidates span (:func:`spread`: the
    oldest and the latest always among them), thinned the same way until they fit."""
    if not chunks:
        return Anchor([], [], 0)
    tps, cost = budget.temporal_patch_size, budget.cost
    candidates = sorted(set(candidates)) if max_keyframes > 0 else []

    def keys_before(frame: int, k: int = max_keyframes) -> list[int]:
        return spread([s for s in candidates if s * tps < frame], k)

    def keys_cost(keys: list[int]) -> int:
        return sum(cost(s * tps, (s + 1) * tps) for s in keys)

    def fits(used: int, frames: int, items: int, keys: list[int]) -> bool:
        return budget.fits(used + keys_cost(keys), frames + tps * len(keys), items + len(keys))

    recent = [chunks[-1]]
    used = cost(*chunks[-1])
    frames, items = chunks[-1][1] - chunks[-1][0], 1
    for a, b in reversed(chunks[:-1]):
        if not fits(used + cost(a, b), frames + b - a, items + 1, keys_before(a)):
            break
        recent.insert(0, (a, b))
        used, frames, items = used + cost(a, b), frames + b - a, items + 1
    keys = keys_before(recent[0][0])
    while keys and not fits(used, frames, items, keys):
        keys = spread(keys, len(keys) - 1)
    used += keys_cost(keys)
    return Anchor([(s * tps, (s + 1) * tps) for s in keys] + recent, keys, used)


@register_policy
class RecentPolicy(MemoryPolicy):
    """``recent``: the latest chunks, whole, as many as fit."""

    name = "recent"

    def select(self, chunks: Sequence[tuple[int, int]], budget: Budget) -> Anchor:
        return select_window(chunks, budget)


@register_policy
class RecentKeyframesPolicy(MemoryPolicy):
    """``recent+keyframes``: the latest chunks and, before them, at most ``max_keyframes`` keyframes
    (the stream's first step and its scene changes, spread over the stream)."""

    name = "recent+keyframes"

    def configure(self, options: Options) -> None:
        self.max_keyframes = options.integer("max_keyframes", 8, 0, 256)
        self.candidates: list[int] = []  # the first step and scene changes whose frames are still held

    def observe(self, step: int, kept: int, scene_change: bool = False) -> None:
        if step == 0 or scene_change:
            self.candidates.append(step)

    def forget(self, steps: Iterable[int]) -> None:
        gone = set(steps)
        self.candidates = [s for s in self.candidates if s not in gone]

    def select(self, chunks: Sequence[tuple[int, int]], budget: Budget) -> Anchor:
        return select_window(chunks, budget, self.candidates, self.max_keyframes)


def _common(options: Options) -> dict[str, Any]:
    """The options every policy shares, read and validated."""
    return {
        "context_tokens": options.take(
            "context_tokens", None, lambda v: isinstance(v, int) and v >= 256, "an integer >= 256"
        ),
        "keep_turns": options.integer("keep_turns", 2, 0, 64),
        "anchor_fraction": options.number("anchor_fraction", 0.5, 0.05, 0.9),
    }


@dataclass(frozen=True)
class MemorySettings:
    """What a stream's conversation may hold, declared at open.

    ``context_tokens``: the conversation's budget in tokens (None: :data:`CONTEXT_FRACTION` of the
    server's max model length); ``keep_turns``: past question/answer turns carried over as text;
    ``anchor_fraction``: share of the budget the re-anchored conversation may fill (the rest is room
    for new frames before the next re-anchor); ``policy``: what a re-anchor keeps (a
    :class:`MemoryPolicy`; each stream works on its own :meth:`MemoryPolicy.fresh` copy)."""

    context_tokens: int | None = None
    keep_turns: int = 2
    anchor_fraction: float = 0.5
    policy: MemoryPolicy = field(default_factory=lambda: get_policy(DEFAULT_POLICY)(), compare=False)

    def __post_init__(self):
        _common(
            Options(
                {
                    "context_tokens": self.context_tokens,
                    "keep_turns": self.keep_turns,
                    "anchor_fraction": self.anchor_fraction,
                }
            )
        )

    @classmethod
    def parse(
        cls, given: Mapping[str, Any] | None, spell: Callable[[str], str] = lambda k: f"memory.{k}"
    ) -> MemorySettings:
        """From a request's ``memory`` object: ``keep`` (the policy's name), the shared options and
        the policy's own; every key validated by its owner, unknown ones refused."""
        return cls._from(Options(given, spell))

    @classmethod
    def from_request(cls, memory: Any = None, **flat: Any) -> MemorySettings:
        """From an open request: its ``memory`` object and its flat fields (:data:`FLAT_FIELDS`:
        ``context_tokens``, ``memory_keep``, ``max_keyframes``, ``keep_turns``); an option given both
        ways is refused. Errors name the option as the request spelled it."""
        if memory is not None and not isinstance(memory, Mapping):
            raise InvalidOption("memory", f"memory must be an object, got {memory!r}")
        nested = dict(memory or {})
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise TypeError(f"not a flat memory field: {unknown}")
        given = {FLAT_FIELDS[k]: v for k, v in flat.items() if v is not None}
        for key in given:
            if nested.get(key) is not None:
                flat_name = next(k for k, v in FLAT_FIELDS.items() if v == key)
                raise InvalidOption(
                    f"memory.{key}", f"memory.{key} and {flat_name} are the same option: give one of them"
                )
        spelled = {v: k for k, v in FLAT_FIELDS.items() if v in given}
        return cls._from(Options({**nested, **given}, lambda k: spelled.get(k, f"memory.{k}")))

    @classmethod
    def _from(cls, options: Options) -> MemorySettings:
        name = options.take(
            "keep", DEFAULT_POLICY, lambda v: isinstance(v, str) and v in _REGISTRY, f"one of {list(policy_names())}"
        )
        common = _common(options)
        return cls(policy=get_policy(name).from_options(options), **common)

    @property
    def keep(self) -> str:
        """The policy's name."""
        return self.policy.name

    def budget(self, max_model_len: int | None) -> int | None:
        """The budget in tokens for a server of ``max_model_len`` (None: no budget known)."""
        if self.context_tokens is not None:
            return self.context_tokens if not max_model_len else min(self.context_tokens, max_model_len)
        return int(CONTEXT_FRACTION * max_model_len) if max_model_len else None

    def as_dict(self) -> dict:
        """The ``memory`` object of a request that gives these settings."""
        return {
            "keep": self.policy.name,
            **self.policy.options(),
            "context_tokens": self.context_tokens,
            "keep_turns": self.keep_turns,
            "anchor_fraction": self.anchor_fraction,
        }


def spread(items: Sequence[int], k: int) -> list[int]:
    """At most ``k`` of ``items`` (ascending temporal steps), spread evenly over the time they span: for
    ``k`` targets evenly spaced from the first to the last, the nearest item (the first and the last
    always kept when ``k >= 2``, the last when ``k == 1``; duplicates merge, so fewer may come back).
    Applied at every re-anchor, the keyframes stay spread over the whole stream, its start included,
    instead of crowding before the recent window."""
    items = list(items)
    if k <= 0:
        return []
    if len(items) <= k:
        return items
    if k == 1:
        return items[-1:]
    lo, hi = items[0], items[-1]
    arr = np.asarray(items, dtype=np.float64)
    picked = {items[int(np.abs(arr - (lo + (hi - lo) * i / (k - 1))).argmin())] for i in range(k)}
    return sorted(picked)
