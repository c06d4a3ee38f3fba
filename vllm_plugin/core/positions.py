"""Where kept tokens sit: their original (t, h, w) and M-RoPE position ids. Dropped tokens leave
holes; nothing shifts."""

from __future__ import annotations

import torch

from vllm_plugin.core.stats import check_mask


def kept_thw(mask: torch.Tensor) -> torch.Tensor:
    """Original (t, h, w) of every kept token, in the order the LLM receives them.

    Args:
        mask: bool (T, H, W).
    Returns:
        long (N, 3), N = mask.sum(); rows ordered time-major, then row, then column.
    """
    return check_mask(mask).nonzero()


def mrope_positions(
    mask: torch.Tensor,
    start: int = 0,
    second_per_grid_t: float = 1.0,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of the kept tokens of one video, as Qwen2.5-VL computes them for the
    whole video (``get_rope_index``) and then keeps only the survivors — dropped tokens leave holes.

    Temporal index: ``int(t * second_per_grid_t * tokens_per_second)``; height/width: the merged
    grid row/column; all offset by ``start`` (the position after the preceding text).

    Args:
        mask: bool (T, H, W).
        start: position id of the first video token.
        second_per_grid_t: seconds covered by one temporal step (temporal_patch_size / fps).
        tokens_per_second: the vision config's ``tokens_per_second`` (2 for Qwen2.5-VL); use 1 and
            second_per_grid_t=1 for Qwen2-VL (plain frame index).
    Returns:
        (positions long (3, N), next_start) where ``next_start`` is the position of the text that
        follows the video: 1 + the largest position of the FULL (undropped) grid, as in the model.
    """
    T, H, W = mask.shape
    thw = kept_thw(mask)
    t_index = (torch.arange(T, dtype=torch.float64) * float(second_per_grid_t) * float(tokens_per_second)).long()
    pos = torch.stack([t_index[thw[:, 0]], thw[:, 1], thw[:, 2]]) + int(start)
    next_start = int(start) + max(int(t_index[-1]), H - 1, W - 1) + 1
    return pos, next_start
