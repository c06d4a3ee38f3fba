"""Pixel tokens: one token per LLM position, made of the raw pixels it covers (Qwen2-VL family
patch layout), and the pixel-level keep mask computed straight from processed patches.

Shapes: processed patches ``(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch²)``;
tokens ``(T, H, W, C)`` with ``T = grid_t``, ``H = grid_h // merge``, ``W = grid_w // merge``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from vllm_plugin.core.config import DEFAULT_METRIC, DTDConfig
from vllm_plugin.core.decide import Decision, decide_steps
from vllm_plugin.core.masks import token_scores

# Qwen2-VL / Qwen2.5-VL normalize pixels with OpenAI CLIP's statistics.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchLayout:
    """How a Qwen2-VL family processor lays out and normalizes ``pixel_values_videos`` (defaults:
    Qwen2-VL / Qwen2.5-VL). ``normalized``: True when the patches are rescaled and normalized (the HF
    processor's default); False when they are raw pixel values (vLLM's ``mm_device_do_normalize``,
    where the vision tower normalizes on the device): those are multiplied by ``rescale_factor``."""

    merge_size: int = 2
    temporal_patch_size: int = 2
    channels: int = 3
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    normalized: bool = True
    rescale_factor: float = 1.0 / 255.0

    def with_(self, **changes: Any) -> PatchLayout:
        return replace(self, **changes) if changes else self

    def denormalize(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Float patches (..., channels, rest) to [0, 1]; the same arithmetic in place or not (bit-identical)."""
        if self.normalized:
            mean = torch.tensor(self.image_mean, dtype=x.dtype, device=x.device).view(self.channels, 1)
            std = torch.tensor(self.image_std, dtype=x.dtype, device=x.device).view(self.channels, 1)
            return x.mul_(std).add_(mean) if inplace else x * std + mean
        return x.mul_(float(self.rescale_factor)) if inplace else x * float(self.rescale_factor)

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw patches (``normalized=False``: pixel values, e.g. uint8) as the vision tower expects them:
        rescaled and normalized like the HF processor does. (patches, channels * rest) float32."""
        x = pixel_values.float().reshape(pixel_values.shape[0], self.channels, -1) * float(self.rescale_factor)
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(self.channels, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(self.channels, 1)
        return ((x - mean) / std).reshape(pixel_values.shape[0], -1)


def pixel_tokens(
    pixel_values: torch.Tensor,
    grid_thw: Sequence[int] | torch.Tensor,
    layout: PatchLayout = PatchLayout(),
    **overrides: Any,
) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL processed video patches -> one pixel token per LLM position.

    Args:
        pixel_values: (grid_t * grid_h * grid_w, channels * temporal_patch_size * patch² ) — the
            processor's ``pixel_values_videos`` for ONE video, rows ordered (t, h_block, w_block,
            merge_row, merge_col) and columns (channel, temporal, patch_row, patch_col), normalized
            with ``image_mean``/``image_std``.
        grid_thw: (grid_t, grid_h, grid_w) in patches (before merging).
        layout: the patch layout and normalization (:class:`PatchLayout`); ``overrides`` replace
            fields of it, e.g. ``normalized=False``.
    Returns:
        float32 (T, H, W, C) with T = grid_t, H = grid_h // merge_size, W = grid_w // merge_size and
        C = channels * temporal_patch_size * merge_size² * patch²: all pixels the LLM token covers
        (both frames of its temporal patch), denormalized to [0, 1]. The L1 metric on these is the
        reference code's "rescaled average RGB difference" (it compares one frame of each temporal
        patch; we compare the whole tubelet).
    """
    lay = layout.with_(**overrides)
    x = _patch_view(pixel_values, grid_thw, lay).float()
    return lay.denormalize(x, inplace=False).reshape(*x.shape[:3], -1)


def _patch_view(
    pixel_values: torch.Tensor, grid_thw: Sequence[int] | torch.Tensor, layout: PatchLayout
) -> torch.Tensor:
    """Validate and view the patches as (T, H, W, merge², channels, rest) (no copy)."""
    merge_size, temporal_patch_size, channels = layout.merge_size, layout.temporal_patch_size, layout.channels
    t, h, w = (int(x) for x in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw))
    if t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size:
        raise ValueError(f"grid_thw must be positive with h, w divisible by merge_size={merge_size}, got {(t, h, w)}")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
        raise ValueError("pixel_values must be a 2-D tensor (patches, features)")
    n, d = pixel_values.shape
    if n != t * h * w:
        raise ValueError(f"pixel_values has {n} patches but grid_thw {(t, h, w)} needs {t * h * w}")
    if d % (channels * temporal_patch_size):
        raise ValueError(f"pixel_values feature dim {d} is not a multiple of channels*temporal_patch_size")
    return pixel_values.reshape(t, h // merge_size, w // merge_size, merge_size * merge_size, channels, -1)


class _StepTokens:
    """Pixel tokens of a video, produced one temporal step at a time into a few reused buffers:
    ``self[t]`` equals ``pixel_tokens(...)[t + first]`` bit for bit, and the (T, H, W, C) float copy
    of the whole video (and its page faults; the patches may be uint8) is never made. A returned
    step stays valid until two other steps have been asked for."""

    def __init__(self, patches: torch.Tensor, first: int, denormalize: Callable[[torch.Tensor], torch.Tensor]):
        self._patches, self._first, self._denormalize = patches, first, denormalize
        T, H, W = patches.shape[:3]
        self.shape = (T - first, H, W, patches[0, 0, 0].numel())
        self.dtype, self.device = torch.float32, patches.device
        self._buffers = [torch.empty(patches.shape[1:], dtype=torch.float32, device=patches.device) for _ in range(3)]
        self._held: dict[int, int] = {}  # step -> buffer index, the two most recent

    def __getitem__(self, t: int) -> torch.Tensor:
        if t not in self._held:
            free = next(i for i in range(3) if i not in self._held.values())
            buf = self._buffers[free]
            buf.copy_(self._patches[t + self._first])
            self._denormalize(buf)
            if len(self._held) == 2:
                self._held.pop(min(self._held))
            self._held[t] = free
        return self._buffers[self._held[t]].view(self.shape[1:])


def pixel_keep_mask(
    pixel_values: torch.Tensor,
    grid_thw: Sequence[int] | torch.Tensor,
    threshold: float | None = None,
    metric: str = DEFAULT_METRIC,
    reference: str = "previous",
    reference_steps: int = 0,
    layout: PatchLayout = PatchLayout(),
    drop_ratio: float | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """:func:`pixel_decide`'s mask for a threshold (or ``drop_ratio``), metric and reference."""
    config = DTDConfig(threshold=threshold, metric=metric, reference=reference, drop_ratio=drop_ratio)
    return pixel_decide(pixel_values, grid_thw, config, reference_steps, layout, **overrides).mask


def pixel_decide(
    pixel_values: torch.Tensor,
    grid_thw: Sequence[int] | torch.Tensor,
    config: DTDConfig,
    reference_steps: int = 0,
    layout: PatchLayout = PatchLayout(),
    **overrides: Any,
) -> Decision:
    """DTD straight from processed patches: ``decide_steps(pixel_tokens(pixel_values, grid_thw, ...)
    [reference_steps:], config, state=<step reference_steps - 1>)``, the same mask bit for bit,
    computed one temporal step at a time (what the serving plugin runs). Raw 8-bit patches (vLLM's
    default for Qwen2-VL-family models: the tower normalizes) with the L1 metric and a threshold are
    scored from integer sums, never copied to float (:func:`_l1_scores_8bit`; measured 1.5-3.2x
    faster than float steps on the shared clips at 2 fps, the same masks): a detail of the pixel L1
    scorer, whatever the reference.

    Args:
        pixel_values, grid_thw, layout, overrides: as for :func:`pixel_tokens`.
        config: the DTD setting (``config.criterion`` is not read: these are pixel tokens).
        reference_steps: the first steps are only the reference (the end of a stream's previous
            chunk): the last of them is the initial state.
    Returns:
        :class:`vllm_plugin.core.decide.Decision` over the T - reference_steps other steps.
    """
    lay = layout.with_(**overrides)
    patches = _patch_view(pixel_values, grid_thw, lay)
    if (
        isinstance(reference_steps, bool)
        or not isinstance(reference_steps, int)
        or not 0 <= reference_steps < patches.shape[0]
    ):
        raise ValueError(f"reference_steps must be an int in [0, T), got {reference_steps!r}")
    if (
        pixel_values.is_floating_point()
        and not bool(torch.isfinite(pixel_values.sum()))
        and not bool(torch.isfinite(pixel_values).all())
    ):
        raise ValueError("pixel_values contains NaN or inf")
    metric, threshold = str(config.metric), float(config.threshold or 0.0)
    if (
        pixel_values.dtype == torch.uint8
        and not lay.normalized
        and metric == "l1"
        and config.drop_ratio is None
        and _exact_scale_ok(lay.rescale_factor)
    ):
        steps = patches.reshape(*patches.shape[:3], -1)  # uint8 (T, H, W, C), token elements in pixel_tokens' order
        initial = steps[reference_steps - 1] if reference_steps else None
        score = _l1_scores_8bit(threshold, float(lay.rescale_factor))
        return decide_steps(steps[reference_steps:], config, state=initial, score=score)
    tokens = _StepTokens(patches, reference_steps, lambda buf: lay.denormalize(buf, inplace=True))
    initial = tokens[-1].clone() if reference_steps else None
    return decide_steps(tokens, config, state=initial)


# How far (relative to τ) an exact L1 score must be from τ for the float path's score to fall on the
# same side. float32 scores err by far less: each |Δ| term by ≤ 3·2⁻²⁴ of a full-scale pixel
# (≤ 5e-5 of the score, whose every nonzero term is ≥ 1 level); the C-term sum by ≤ C·2⁻²⁴ summed
# naively (≤ 3e-4 for C = 4704, Qwen2.5-VL's token; below 1e-3 up to C ≈ 16,000), and torch sums in
# cascades: a review measured ≤ 1.6e-5 over every pixel pair and adversarial patterns up to C = 2²⁰.
_EXACT_BAND = 1e-3


def _exact_scale_ok(rescale: float) -> bool:
    """The integer path needs the float path's scale (``rescale`` as float32) positive and far from
    float32's limits: a negative one flips the sign only the float path's ``abs`` removes; a tiny one
    makes the float path's means subnormal (imprecise) or zero, a huge one overflows. Real ones are
    1/255 (8-bit) to 1/65535 (16-bit) or 1."""
    r32 = float(torch.tensor(float(rescale), dtype=torch.float32))
    return 1e-20 <= r32 <= 1e20


def _l1_scores_8bit(threshold: float, rescale: float) -> Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]:
    """A :func:`vllm_plugin.core.decide.decide_steps` ``score`` for raw 8-bit tokens (uint8 (H, W, C)) that
    decides exactly as :func:`vllm_plugin.core.masks.token_scores` on ``tokens.float() * rescale`` (the float path),
    faster: the exact score ``Σ|a − b| · rescale / C`` from integer sums (uint8 max − min, no float
    copy of the pixels); a step with any token whose exact score lies within ``_EXACT_BAND`` of τ is
    scored by the float path itself, so every decision is the float path's bit for bit (for a
    ``rescale`` that :func:`_exact_scale_ok` accepts; for others the float path runs)."""
    band = _EXACT_BAND * threshold
    rescale32 = float(torch.tensor(rescale, dtype=torch.float32))  # the float path's multiplier

    def score(current: torch.Tensor, reference: torch.Tensor, metric: str) -> torch.Tensor:
        diff = torch.maximum(current, reference).sub_(torch.minimum(current, reference))
        wide = torch.int32 if current.shape[-1] < 2**23 else torch.int64  # 255·C fits; int32 sums ~7x faster here
        exact = diff.sum(-1, dtype=wide).double() * (rescale32 / current.shape[-1])
        if bool(((exact - threshold).abs() < band).any()):
            return token_scores(current.float().mul_(rescale), reference.float().mul_(rescale), metric)
        return exact

    return score


def frame_tokens(
    frames: torch.Tensor, patch_size: int = 14, layout: PatchLayout = PatchLayout(), **overrides: Any
) -> torch.Tensor:
    """Pixel tokens straight from frames that are already at the processor's target size.

    Args:
        frames: uint8 or float (N, height, width, 3) RGB with N a multiple of ``temporal_patch_size``
            and height, width multiples of ``patch_size * merge_size``.
    Returns:
        float32 (T, H, W, C), T = N / temporal_patch_size, in EXACTLY the element order of
        :func:`pixel_tokens` (so both give bit-identical tokens for the same pixels when the
        processor does not resize): per token (merge_row, merge_col, channel, temporal, py, px).
    """
    lay = layout.with_(**overrides)
    merge_size, temporal_patch_size = lay.merge_size, lay.temporal_patch_size
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError("frames must be a tensor of shape (N, height, width, 3)")
    n, hh, ww, c = frames.shape
    cell = patch_size * merge_size
    if n == 0 or n % temporal_patch_size or hh % cell or ww % cell:
        raise ValueError(
            f"frames {tuple(frames.shape)}: N must be a positive multiple of {temporal_patch_size}, "
            f"height and width multiples of {cell}"
        )
    T, H, W, m, ps = n // temporal_patch_size, hh // cell, ww // cell, merge_size, patch_size
    x = frames.reshape(T, temporal_patch_size, H, m, ps, W, m, ps, c)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)  # T, H, W, mh, mw, C, tps, py, px
    return x.reshape(T, H, W, -1).float() * float(lay.rescale_factor)
