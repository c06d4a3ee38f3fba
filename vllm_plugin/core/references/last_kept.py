"""``last_kept``: per place (h, w), the last token that was KEPT there (our ablation: slow drift
cannot hide forever, since the reference only moves when a token is kept)."""

from __future__ import annotations

import torch

from vllm_plugin.core.references.base import Comparison, Reference, Rule, Scorer, register_reference


@register_reference
class LastKept(Reference):
    name = "last_kept"
    rank = 1

    def start(self, first: torch.Tensor) -> torch.Tensor:
        return first.clone()  # updated in place below

    def resume(self, state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return state.to(dtype).clone()

    def compare(self, current: torch.Tensor, state: torch.Tensor, score: Scorer, redundant: Rule) -> Comparison:
        return Comparison(score(current, state))

    def update(self, state: torch.Tensor, current: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        state[keep] = current[keep].to(state.dtype)
        return state
