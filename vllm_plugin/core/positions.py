"""Where kept tokens sit: their original (t, h, w) and M-RoPE position ids. Dropped tokens leave
holes; nothing shifts."""

from __future__ import annotations

from collections.abc import Sequence

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
    return pos, int(start) + video_position_span(T, H, W, float(second_per_grid_t) * float(tokens_per_second))


def video_position_span(T: int, H: int, W: int, t_factor: float) -> int:
    """Positions one video item takes in the Qwen2-VL / Qwen2.5-VL rule, whatever DTD keeps: 1 + the
    largest position of its FULL grid relative to its start, ``max(int((T-1) * t_factor), H-1, W-1) + 1``
    (``t_factor`` = seconds per temporal step × the vision config's ``tokens_per_second``; 1 for Qwen2-VL).
    A video with frames far apart in time spans far more positions than it has tokens."""
    last_t = int(torch.tensor(float(T - 1), dtype=torch.float64).mul(float(t_factor)).item()) if T > 0 else 0
    return max(last_t, H - 1, W - 1) + 1


def timestamped_mrope_positions(
    mask: torch.Tensor, text_lens: Sequence[int], start: int = 0
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of one video item laid out as Qwen3-VL lays it out: each temporal step is
    its own frame group, preceded by text (its ``<t.t seconds>`` timestamp and ``<|vision_start|>``;
    from the second step on also the previous step's ``<|vision_end|>``), and time is carried by that
    text, not by the temporal position. Dropped tokens leave holes; nothing shifts: every text token
    and every kept token gets the position it has in the FULL (undropped) item.

    Per step ``t``: its ``text_lens[t]`` text tokens take consecutive positions ``p, p+1, ...`` (all
    three sections equal); its grid starts at ``s = p + text_lens[t]`` and the kept token (h, w) gets
    ``(s, s + h, s + w)``; the text after it starts at ``s + max(H, W)`` (1 + the largest position of
    the full grid, as for a one-frame video). This is vLLM's and transformers' Qwen3-VL rule for the
    full grid.

    Args:
        mask: bool (T, H, W); a step may keep no token (its text stays).
        text_lens: T + 1 non-negative ints: the text tokens before each step's grid, then the text
            tokens after the last grid that still belong to the item.
        start: position id of the item's first token.
    Returns:
        (positions long (3, N) in item order, N = sum(text_lens) + mask.sum(); next_start: the position
        of the token after the item).
    """
    T, H, W = check_mask(mask).shape
    lens = [int(x) for x in text_lens]
    if len(lens) != T + 1 or min(lens) < 0:
        raise ValueError(f"text_lens must be {T + 1} non-negative ints for {T} steps, got {list(text_lens)}")
    parts = []
    p = int(start)
    for t in range(T + 1):
        parts.append(torch.arange(p, p + lens[t]).expand(3, -1))
        p += lens[t]
        if t < T:
            pos, p = mrope_positions(mask[t : t + 1], start=p)
            parts.append(pos)
    return torch.cat(parts, dim=1), p


def timestamped_position_span(T: int, H: int, W: int, text_tokens: int) -> int:
    """Positions one Qwen3-VL-style video item takes (:func:`timestamped_mrope_positions`): its
    ``text_tokens`` text tokens one each, and ``max(H, W)`` per temporal step whatever DTD keeps."""
    return int(text_tokens) + int(T) * max(int(H), int(W))
