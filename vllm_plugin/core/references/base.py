"""The reference protocol and its registry: what a visual token is compared with.

A :class:`Reference` carries a *state* from step to step (a float or integer tensor (H, W, C): the
tokens the next step is compared with) and, for each step, says which reference token each place is
compared with. Three calls:

* ``start(first)``: the state after a step that is kept whole (the first step of a video);
* ``compare(current, state, score, redundant)``: the scores (H, W) of ``current`` (H, W, C) against
  the state, the places that have no reference token (kept whatever their score: e.g. the edge that
  enters the view when the camera pans) and the offset (dy, dx) in tokens at which the state was read;
* ``update(state, current, keep)``: the state for the next step, given what this step kept.

``score(current (..., C), reference (..., C)) -> (...)`` is the metric's scorer (it may be a faster
exact one, e.g. the 8-bit pixel L1); ``redundant(scores) -> bool`` is the metric's rule at the
threshold, for references that choose between candidate alignments.

A new reference is one module in this package: a subclass with a ``name`` and a
``@register_reference`` decorator, imported by the package's ``__init__``. Every caller
(whole videos in the processor, streams, the reference pipeline, the workbench) reaches it through
:func:`vllm_plugin.core.decide.decide_steps`; ``dtd_reference`` validation reads this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Rule = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Comparison:
    """One step compared with its reference.

    ``scores``: float (H, W), the metric's scores (meaningless where ``outside``);
    ``outside``: bool (H, W) places without a reference token (always kept), or None for none;
    ``offset``: (dy, dx) in tokens: place (h, w) was compared with the state's (h - dy, w - dx)."""

    scores: torch.Tensor
    outside: torch.Tensor | None = None
    offset: tuple[int, int] = (0, 0)


class Reference:
    """Base class of references (see the module's docstring). Subclasses set ``name`` and override
    :meth:`compare` and, when the state is not simply the last step, :meth:`update`."""

    name: ClassVar[str] = ""
    rank: ClassVar[int] = 100  # where it is listed among the choices (lower first)

    def start(self, first: torch.Tensor) -> torch.Tensor:
        """The state after ``first`` (H, W, C) was kept whole. May be a view of ``first``."""
        return first

    def resume(self, state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The state carried from a previous chunk (:meth:`carry`), as the state of this one's
        tokens' dtype. Must not modify ``state`` later (copy when :meth:`update` works in place)."""
        return state.to(dtype)

    def compare(self, current: torch.Tensor, state: torch.Tensor, score: Scorer, redundant: Rule) -> Comparison:
        raise NotImplementedError

    def update(self, state: torch.Tensor, current: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The state for the next step. Default: the step itself (a view of ``current``)."""
        return current

    def carry(self, state: torch.Tensor) -> torch.Tensor:
        """The state as a tensor of its own (the caller's buffers may be reused), to start the next
        chunk of the same stream from."""
        return state.clone()


_REGISTRY: dict[str, type[Reference]] = {}


def register_reference(cls: type[Reference]) -> type[Reference]:
    """Class decorator: make ``cls`` selectable as ``dtd_reference=cls.name`` everywhere."""
    if not (isinstance(cls, type) and issubclass(cls, Reference)) or not cls.name:
        raise TypeError(f"{cls!r} must be a Reference subclass with a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a reference named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_reference(name: str) -> None:
    """Remove a reference (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def reference_names() -> tuple[str, ...]:
    """The registered references' names (the paper's ``previous`` first)."""
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].rank, n)))


def get_reference(name: str) -> Reference:
    """A fresh instance of the reference named ``name``; ``ValueError`` naming the choices if none."""
    if name not in _REGISTRY:
        raise ValueError(f"dtd_reference must be one of {list(reference_names())}, got {name!r}")
    return _REGISTRY[name]()
