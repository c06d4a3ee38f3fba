"""A stream's DTD decision: the keep mask of each temporal step as it arrives, and the reference
state carried from one append to the next, so that chunked DTD equals DTD on the whole stream.

No vLLM import. The decision itself is the core's (:func:`vllm_plugin.core.decide_steps`); this
class holds what a stream carries between calls.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from vllm_plugin.core import DTDConfig, decide_steps, frame_tokens
from vllm_plugin.core.masks import check_tokens


class DecisionState:
    """The causal decision of one stream.

    Args:
        config: the stream's DTD setting.
        patch_size, merge_size, temporal_patch_size: the served geometry (pixel tokens).
    """

    def __init__(self, config: DTDConfig, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
        self.config = config
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.state: torch.Tensor | None = None  # the reference the next step is compared with (H, W, C)
        self._lock = threading.Lock()

    def pixel_tokens(self, frames: np.ndarray) -> torch.Tensor:
        """Tokens (steps, H, W, C) of frames uint8 (steps × temporal_patch_size, h, w, 3) already at the
        served size: the pixel criterion's tokens."""
        return frame_tokens(
            torch.from_numpy(frames),
            merge_size=self.merge_size,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
        )

    def decide(self, tokens: torch.Tensor) -> torch.Tensor:
        """The keep masks, bool (steps, H, W), of the next ``tokens`` (steps, H, W, C) of the stream,
        compared with the state the steps before them left (the stream's first step is kept whole);
        the state moves on. DTD disabled: every token is kept."""
        with self._lock:
            if not self.config.enabled:
                return torch.ones(tokens.shape[:3], dtype=torch.bool)
            decision = decide_steps(check_tokens(tokens), self.config, state=self.state)  # NaN/inf: refused
            self.state = decision.state
            return decision.mask

    def rewind(self, state: torch.Tensor | None) -> None:
        """Go back to an earlier :attr:`state` (the steps decided since were not kept)."""
        with self._lock:
            self.state = state
