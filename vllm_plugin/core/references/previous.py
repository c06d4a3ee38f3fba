"""``previous``: step t is compared with step t − 1 at the same place (the paper's rule)."""

from __future__ import annotations

import torch

from vllm_plugin.core.references.base import Comparison, Reference, Rule, Scorer, register_reference


@register_reference
class Previous(Reference):
    name = "previous"
    rank = 0

    def compare(self, current: torch.Tensor, state: torch.Tensor, score: Scorer, redundant: Rule) -> Comparison:
        return Comparison(score(current, state.to(current.dtype)))
