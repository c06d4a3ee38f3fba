"""The DTD decision: ONE walk over a video's temporal steps that every caller uses — whole videos in
the processor (pixel and feature level), streams (step by step, the state carried), the reference
pipeline and the workbench.

For each step t: a step without a reference (the first of a video, unless a ``state`` from the
previous chunk of the same stream is given) is kept whole; any other is compared with its reference
(:mod:`vllm_plugin.core.references`: ``previous``, ``last_kept``, ``motion``, ...) with the metric
of :mod:`vllm_plugin.core.masks`, and

* absolute mode (``threshold``): a token is dropped when its score is redundant at τ;
* relative mode (``drop_ratio``): the ``int(H·W·drop_ratio)`` most redundant tokens are dropped
  (ties broken by raster order), so every step after the first keeps the same count;

tokens the reference has no token for (``Comparison.outside``) are always kept. The reference then
updates its state from what was kept.

Shapes: ``tokens`` (T, H, W, C), one token per LLM position of the video; the mask bool (T, H, W),
True = kept; the state (H, W, C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_plugin.core.config import DTDConfig
from vllm_plugin.core.masks import is_redundant, redundancy, token_scores
from vllm_plugin.core.references import get_reference

StepScorer = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class Decision:
    """What :func:`decide_steps` decided for one video or chunk.

    ``mask``: bool (T, H, W), True = kept. ``state``: the reference state after the last step,
    (H, W, C), to pass as ``state`` for the next chunk of the same stream (chunked = whole); None
    when DTD is disabled. ``offsets``: per step, the (dy, dx) in tokens at which the reference was
    read ((0, 0) but for ``motion``; (0, 0) for steps kept whole)."""

    mask: torch.Tensor
    state: torch.Tensor | None
    offsets: tuple[tuple[int, int], ...]


def decide_steps(
    tokens: Any,
    config: DTDConfig,
    state: torch.Tensor | None = None,
    score: StepScorer | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> Decision:
    """Decide which tokens of ``tokens`` survive under ``config``.

    Args:
        tokens: (T, H, W, C) tokens, a tensor or any object with ``shape``, ``dtype``, ``device`` and
            ``tokens[t]`` -> (H, W, C) (the pixel path's step-at-a-time view). Not validated here
            (:func:`vllm_plugin.core.masks.check_tokens` does).
        config: the setting (threshold or drop_ratio, metric, reference; ``enabled=False`` keeps all).
        state: (H, W, C) the reference state a previous chunk ended with (:attr:`Decision.state`);
            without it the first step is kept whole.
        score: ``score(current, reference, metric) -> scores`` deciding as
            :func:`vllm_plugin.core.masks.token_scores` does (e.g. the exact 8-bit pixel L1).
        observe: called with ``(t, scores (H, W))`` for every compared step (workbench statistics).
    Returns:
        :class:`Decision`.
    """
    T, H, W = (int(x) for x in tokens.shape[:3])
    mask = torch.ones((T, H, W), dtype=torch.bool, device=tokens.device)
    offsets: list[tuple[int, int]] = [(0, 0)] * T
    if not config.enabled:
        return Decision(mask, state, tuple(offsets))
    metric, threshold, drop_ratio = str(config.metric), float(config.threshold or 0.0), config.drop_ratio
    reference = get_reference(config.reference)
    scorer = score or token_scores

    def scores_of(current: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return scorer(current, ref, metric)

    def redundant(scores: torch.Tensor) -> torch.Tensor:
        return is_redundant(scores, threshold, metric)

    n_drop = 0 if drop_ratio is None else int(H * W * drop_ratio)
    ref = None if state is None else reference.resume(state, tokens.dtype)
    for t in range(T):
        current = tokens[t]
        if ref is None:
            ref = reference.start(current)
            continue
        cmp = reference.compare(current, ref, scores_of, redundant)
        if observe is not None:
            observe(t, cmp.scores)
        if drop_ratio is None:
            keep = ~redundant(cmp.scores)
        else:
            rank = redundancy(cmp.scores, metric).flatten().double()
            if cmp.outside is not None:
                rank = rank.masked_fill(cmp.outside.flatten(), float("-inf"))
            drop = torch.sort(rank, descending=True, stable=True).indices[:n_drop]
            drop = drop[torch.isfinite(rank[drop])]
            keep = torch.ones(H * W, dtype=torch.bool, device=mask.device)
            keep[drop] = False
            keep = keep.view(H, W)
        if cmp.outside is not None:
            keep = keep | cmp.outside
        mask[t] = keep
        offsets[t] = cmp.offset
        ref = reference.update(ref, current, keep)
    return Decision(mask, None if ref is None else reference.carry(ref), tuple(offsets))


def keep_at_least_one(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (T, H, W) with its first token kept when it keeps none (a fully static chunk of a
    stream: a video item needs at least one token, no empty placeholder). A new tensor only then."""
    if bool(mask.any()):
        return mask
    mask = mask.clone()
    mask.view(-1)[0] = True
    return mask
