"""Differential Token Drop (DTD), the pure core. Torch only: no vLLM, no transformers.

DTD (TimeChat-Online, "token_drop" in its ``modeling_qwen2_5_vl_DTD.py``) compares every visual
token of frame ``t`` with the token at the same spatial place ``(h, w)`` of a reference frame and
drops it when the two are redundant:

* ``metric="cosine"`` — redundant when cosine similarity > ``threshold`` (``threshold`` in [-1, 1];
  the paper's feature-level criterion: 0.5 in its evaluation, 0.25 in its demo, 0.7 in fine-tuning);
* ``metric="l1"`` — redundant when the mean absolute difference < ``threshold`` (``threshold`` in
  [0, 1]; the paper's pixel-level criterion, on pixels denormalized to [0, 1]).

The reference frame is frame ``t-1`` (``reference="previous"``, the paper's rule) or, per ``(h, w)``,
the last token that was KEPT there (``reference="last_kept"``, our ablation: slow drift cannot hide
forever). The first frame is kept whole unless an ``initial_reference`` (the end of a previous
chunk of the same stream) is given. Survivors keep their ORIGINAL ``(t, h, w)`` and so their
original M-RoPE positions: dropped tokens leave holes, nothing shifts.

Shapes used throughout (one video):

* ``T`` — temporal grid (frames after ``temporal_patch_size`` grouping),
* ``H, W`` — merged spatial grid (one entry per LLM token: ``grid_h // merge``, ``grid_w // merge``),
* ``C`` — channels of a token (vision-encoder output dim, or the token's raw pixels).

Everything here is deterministic and runs on any device the input tensors are on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "METRICS",
    "REFERENCES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "DTDConfig",
    "DTDStats",
    "validate_threshold",
    "token_scores",
    "dtd_keep_mask",
    "dtd_keep_mask_relative",
    "relative_kept_counts",
    "next_reference",
    "pixel_tokens",
    "pixel_keep_mask",
    "frame_tokens",
    "kept_thw",
    "mrope_positions",
    "dtd_stats",
    "mask_digest",
]

Metric = Literal["cosine", "l1"]
Reference = Literal["previous", "last_kept"]
METRICS: tuple[str, ...] = ("cosine", "l1")
REFERENCES: tuple[str, ...] = ("previous", "last_kept")
_THRESHOLD_RANGE = {"cosine": (-1.0, 1.0), "l1": (0.0, 1.0)}

# Qwen2-VL / Qwen2.5-VL normalize pixels with OpenAI CLIP's statistics.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DTDConfig:
    """One DTD setting, validated on construction (``ValueError`` names the bad field).

    ``criterion`` says what the tokens are: ``"pixel"`` (the processed patches, decided before the
    vision encoder) or ``"feature"`` (the vision encoder's merged output). ``enabled=False`` keeps
    every token.
    """

    threshold: float = 0.1
    metric: str = "l1"
    reference: str = "previous"
    criterion: str = "pixel"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"dtd_enabled must be a boolean, got {self.enabled!r}")
        _check_choice("dtd_metric", self.metric, METRICS)
        _check_choice("dtd_reference", self.reference, REFERENCES)
        _check_choice("dtd_criterion", self.criterion, ("pixel", "feature"))
        validate_threshold(self.threshold, self.metric, name="dtd_threshold")


@dataclass(frozen=True)
class DTDStats:
    """Per-video outcome of DTD.

    ``kept_per_frame[t]`` is the number of kept tokens of temporal step ``t``; every step has
    ``tokens_per_frame`` (= H·W) tokens.
    """

    kept_per_frame: tuple[int, ...]
    tokens_per_frame: int

    @property
    def total(self) -> int:
        return self.tokens_per_frame * len(self.kept_per_frame)

    @property
    def kept(self) -> int:
        return sum(self.kept_per_frame)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    @property
    def drop_ratio(self) -> float:
        return self.dropped / self.total if self.total else 0.0

    @property
    def kept_fraction_per_frame(self) -> tuple[float, ...]:
        return tuple(k / self.tokens_per_frame for k in self.kept_per_frame)

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "drop_ratio": self.drop_ratio,
            "tokens_per_frame": self.tokens_per_frame,
            "kept_per_frame": list(self.kept_per_frame),
        }


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def validate_threshold(threshold: object, metric: str, name: str = "threshold") -> float:
    """Return ``threshold`` as a float, or raise ``ValueError`` if it is not a finite number in the
    metric's range (cosine: [-1, 1]; l1: [0, 1])."""
    _check_choice("metric", metric, METRICS)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{name} must be a number, got {threshold!r}")
    value = float(threshold)
    lo, hi = _THRESHOLD_RANGE[metric]
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}] for metric {metric!r}, got {threshold!r}")
    return value


def _check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (T, H, W, C), got {type(tokens).__name__}")
    if tokens.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (T, H, W, C), got shape {tuple(tokens.shape)}")
    if any(s == 0 for s in tokens.shape):
        raise ValueError(f"{name} must be non-empty in every dimension (T, H, W, C), got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tokens.dtype}")
    # a finite sum proves every element finite (NaN and inf propagate); the element-wise check,
    # ~30x slower on CPU, only runs when the sum is not finite (NaN/inf, or an overflowing sum)
    if not bool(torch.isfinite(tokens.sum())) and not bool(torch.isfinite(tokens).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return tokens


def _check_initial_reference(initial_reference: Optional[torch.Tensor], tokens: torch.Tensor) -> None:
    if initial_reference is None:
        return
    if not isinstance(initial_reference, torch.Tensor) or tuple(initial_reference.shape) != tuple(tokens.shape[1:]):
        shape = tuple(initial_reference.shape) if isinstance(initial_reference, torch.Tensor) else initial_reference
        raise ValueError(f"initial_reference must have shape (H, W, C) = {tuple(tokens.shape[1:])}, got {shape}")
    if not bool(torch.isfinite(initial_reference).all()):
        raise ValueError("initial_reference contains NaN or inf")


def token_scores(current: torch.Tensor, reference: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Per-token redundancy score between two aligned token sets.

    Args:
        current: (..., C) tokens.
        reference: (..., C) tokens at the same places.
        metric: ``"cosine"`` (cosine similarity, higher = more redundant) or ``"l1"`` (mean
            absolute difference, lower = more redundant).
    Returns:
        (...) float32 scores.
    """
    _check_choice("metric", metric, METRICS)
    current = current.float()
    reference = reference.float()
    if metric == "cosine":
        return F.cosine_similarity(current, reference, dim=-1)
    return (current - reference).abs_().mean(dim=-1)


def _redundant(scores: torch.Tensor, threshold: float, metric: str) -> torch.Tensor:
    scores = scores.double()  # compare at the threshold's own precision (a float64 Python number)
    return scores > threshold if metric == "cosine" else scores < threshold


def _redundancy(scores: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores turned so that larger = more redundant (for ranking in relative mode)."""
    return scores if metric == "cosine" else -scores


def _scan(
    tokens: torch.Tensor,
    decide,
    metric: str,
    reference: str,
    initial_reference: Optional[torch.Tensor],
) -> torch.Tensor:
    """Walk the frames in time order. ``decide(scores (H, W)) -> keep (H, W)`` for frames that have
    a reference; a frame without one (frame 0 with no ``initial_reference``) is kept whole."""
    _check_choice("reference", reference, REFERENCES)
    T, H, W, _ = tokens.shape
    mask = torch.ones((T, H, W), dtype=torch.bool, device=tokens.device)
    ref = initial_reference
    if reference == "previous":
        # Every frame's reference is the frame before it, whatever was kept. Frame by frame: each
        # difference stays in cache (~3x faster than one (T, H, W, C) pass).
        first = 0 if ref is not None else 1
        for t in range(first, T):
            prev = ref.to(tokens.dtype) if t == 0 else tokens[t - 1]
            mask[t] = decide(token_scores(tokens[t], prev, metric))
        return mask
    # last_kept: the reference at (h, w) is the last token kept there; sequential by nature.
    start = 0
    if ref is None:
        ref = tokens[0]
        start = 1
    ref = ref.to(tokens.dtype).clone()
    for t in range(start, T):
        keep = decide(token_scores(tokens[t], ref, metric))
        mask[t] = keep
        ref[keep] = tokens[t][keep]
    return mask


def dtd_keep_mask(
    tokens: torch.Tensor,
    threshold: float,
    metric: str = "cosine",
    reference: str = "previous",
    initial_reference: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which tokens of a video survive DTD (absolute threshold).

    Args:
        tokens: float (T, H, W, C), one token per LLM position of the video.
        threshold: cosine: drop when similarity > threshold, in [-1, 1];
            l1: drop when mean |difference| < threshold, in [0, 1].
        metric: ``"cosine"`` or ``"l1"``.
        reference: ``"previous"`` (frame t-1) or ``"last_kept"`` (last kept token at (h, w)).
        initial_reference: optional float (H, W, C): the reference for frame 0, i.e. the state
            :func:`next_reference` returned for the previous chunk of the same stream. Without it
            frame 0 is kept whole.
    Returns:
        bool (T, H, W); True = kept. Frame 0 is all True when ``initial_reference`` is None.
    Raises:
        ValueError: empty or non-rank-4 tokens, NaN/inf, unknown metric/reference, threshold out of
            range.
    """
    _check_tokens(tokens)
    _check_choice("metric", metric, METRICS)
    _check_choice("reference", reference, REFERENCES)
    threshold = validate_threshold(threshold, metric)
    _check_initial_reference(initial_reference, tokens)
    return _scan(tokens, lambda s: ~_redundant(s, threshold, metric), metric, reference, initial_reference)


def relative_kept_counts(num_frames: int, tokens_per_frame: int, drop_ratio: float, first_frame_whole: bool = True) -> list[int]:
    """Kept tokens per frame in relative mode, known before any token is looked at.

    Frame t ≥ 1 drops ``int(tokens_per_frame * drop_ratio)`` tokens (the reference code's rounding);
    frame 0 keeps all when ``first_frame_whole``.
    """
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0.0 <= float(drop_ratio) <= 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1], got {drop_ratio!r}")
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(f"num_frames and tokens_per_frame must be >= 1, got {num_frames}, {tokens_per_frame}")
    k = tokens_per_frame - int(tokens_per_frame * float(drop_ratio))
    counts = [k] * num_frames
    if first_frame_whole:
        counts[0] = tokens_per_frame
    return counts


def dtd_keep_mask_relative(
    tokens: torch.Tensor,
    drop_ratio: float,
    metric: str = "cosine",
    reference: str = "previous",
    initial_reference: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Relative mode: every frame with a reference drops its ``int(H*W*drop_ratio)`` most redundant
    tokens (ties broken by raster order), so the kept count is :func:`relative_kept_counts`.

    Args/returns as :func:`dtd_keep_mask`, with ``drop_ratio`` in [0, 1] instead of a threshold.
    """
    _check_tokens(tokens)
    _check_choice("metric", metric, METRICS)
    _check_initial_reference(initial_reference, tokens)
    T, H, W, _ = tokens.shape
    n_drop = H * W - relative_kept_counts(1, H * W, drop_ratio, first_frame_whole=False)[0]

    def decide(scores: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(H * W, dtype=torch.bool, device=scores.device)
        order = torch.sort(_redundancy(scores.flatten(), metric), descending=True, stable=True).indices
        keep[order[:n_drop]] = False
        return keep.view(H, W)

    return _scan(tokens, decide, metric, reference, initial_reference)


def next_reference(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    reference: str = "previous",
    initial_reference: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The reference state to carry into the next chunk of the same stream.

    Args:
        tokens: float (T, H, W, C) of this chunk; mask: bool (T, H, W) its keep mask.
        initial_reference: (H, W, C) the state this chunk started from, if any.
    Returns:
        float (H, W, C): the last frame (``previous``) or, per (h, w), the last kept token
        (``last_kept``). Feeding it as ``initial_reference`` makes chunked DTD equal to DTD on the
        concatenated video.
    """
    _check_choice("reference", reference, REFERENCES)
    if reference == "previous":
        return tokens[-1].clone()
    ref = tokens[0].clone() if initial_reference is None else initial_reference.to(tokens.dtype).clone()
    for t in range(tokens.shape[0]):
        ref[mask[t]] = tokens[t][mask[t]]
    return ref


def pixel_tokens(
    pixel_values: torch.Tensor,
    grid_thw: Sequence[int] | torch.Tensor,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    channels: int = 3,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    normalized: bool = True,
    rescale_factor: float = 1.0 / 255.0,
) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL processed video patches -> one pixel token per LLM position.

    Args:
        pixel_values: (grid_t * grid_h * grid_w, channels * temporal_patch_size * patch² ) — the
            processor's ``pixel_values_videos`` for ONE video, rows ordered (t, h_block, w_block,
            merge_row, merge_col) and columns (channel, temporal, patch_row, patch_col), normalized
            with ``image_mean``/``image_std``.
        grid_thw: (grid_t, grid_h, grid_w) in patches (before merging).
        normalized: True when the patches are rescaled and normalized (the HF processor's default);
            False when they are raw pixel values (vLLM's ``mm_device_do_normalize``, where the
            vision tower normalizes on the device): those are multiplied by ``rescale_factor``.
    Returns:
        float32 (T, H, W, C) with T = grid_t, H = grid_h // merge_size, W = grid_w // merge_size and
        C = channels * temporal_patch_size * merge_size² * patch²: all pixels the LLM token covers
        (both frames of its temporal patch), denormalized to [0, 1]. The L1 metric on these is the
        reference code's "rescaled average RGB difference" (it compares one frame of each temporal
        patch; we compare the whole tubelet).
    """
    x = _patch_view(pixel_values, grid_thw, merge_size, temporal_patch_size, channels).float()
    return _denormalize(x, image_mean, image_std, normalized, rescale_factor, inplace=False).reshape(*x.shape[:3], -1)


def _patch_view(pixel_values: torch.Tensor, grid_thw, merge_size: int, temporal_patch_size: int, channels: int) -> torch.Tensor:
    """Validate and view the patches as (T, H, W, merge², channels, rest) (no copy)."""
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


def _denormalize(x: torch.Tensor, image_mean, image_std, normalized: bool, rescale_factor: float, inplace: bool) -> torch.Tensor:
    """Float patches (..., channels, rest) to [0, 1]; the same arithmetic in place or not (bit-identical)."""
    if normalized:
        channels = x.shape[-2]
        mean = torch.tensor(image_mean, dtype=x.dtype, device=x.device).view(channels, 1)
        std = torch.tensor(image_std, dtype=x.dtype, device=x.device).view(channels, 1)
        return x.mul_(std).add_(mean) if inplace else x * std + mean
    return x.mul_(float(rescale_factor)) if inplace else x * float(rescale_factor)


class _StepTokens:
    """Pixel tokens of a video, produced one temporal step at a time into a few reused buffers:
    ``self[t]`` equals ``pixel_tokens(...)[t + first]`` bit for bit, and the (T, H, W, C) float copy
    of the whole video (and its page faults; the patches may be uint8) is never made. A returned
    step stays valid until two other steps have been asked for."""

    def __init__(self, patches: torch.Tensor, first: int, denormalize):
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
    threshold: float,
    metric: str = "l1",
    reference: str = "previous",
    reference_steps: int = 0,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    channels: int = 3,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    normalized: bool = True,
    rescale_factor: float = 1.0 / 255.0,
) -> torch.Tensor:
    """DTD straight from processed patches: ``dtd_keep_mask(pixel_tokens(pixel_values, grid_thw, ...)
    [reference_steps:], threshold, metric, reference, initial_reference=<step reference_steps - 1>)``,
    the same mask bit for bit, computed one temporal step at a time (what the serving plugin runs;
    ~5x faster on uint8 patches than converting the whole video first).

    Args:
        pixel_values, grid_thw and the layout / normalization arguments: as for :func:`pixel_tokens`.
        reference_steps: the first steps are only the reference (the end of a stream's previous
            chunk, ``reference="previous"``): the last of them is the initial reference.
    Returns:
        bool (T - reference_steps, H, W); True = kept.
    """
    patches = _patch_view(pixel_values, grid_thw, merge_size, temporal_patch_size, channels)
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int) or not 0 <= reference_steps < patches.shape[0]:
        raise ValueError(f"reference_steps must be an int in [0, T), got {reference_steps!r}")
    if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values.sum())) and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values contains NaN or inf")
    _check_choice("metric", metric, METRICS)
    _check_choice("reference", reference, REFERENCES)
    threshold = validate_threshold(threshold, metric)
    tokens = _StepTokens(patches, reference_steps,
                         lambda buf: _denormalize(buf, image_mean, image_std, normalized, rescale_factor, inplace=True))
    initial = tokens[-1].clone() if reference_steps else None
    return _scan(tokens, lambda sc: ~_redundant(sc, threshold, metric), metric, reference, initial)


def frame_tokens(
    frames: torch.Tensor,
    merge_size: int = 2,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    rescale_factor: float = 1.0 / 255.0,
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
    return x.reshape(T, H, W, -1).float() * float(rescale_factor)


def kept_thw(mask: torch.Tensor) -> torch.Tensor:
    """Original (t, h, w) of every kept token, in the order the LLM receives them.

    Args:
        mask: bool (T, H, W).
    Returns:
        long (N, 3), N = mask.sum(); rows ordered time-major, then row, then column.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError("mask must be a bool tensor of shape (T, H, W)")
    return mask.nonzero()


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


def dtd_stats(mask: torch.Tensor) -> DTDStats:
    """Per-frame kept counts of a bool (T, H, W) mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError("mask must be a bool tensor of shape (T, H, W)")
    T, H, W = mask.shape
    return DTDStats(kept_per_frame=tuple(int(k) for k in mask.reshape(T, -1).sum(dim=1).tolist()), tokens_per_frame=H * W)


def mask_digest(mask: torch.Tensor) -> str:
    """SHA-256 (hex) of a bool (T, H, W) mask's bits in raster order, with its shape: a compact,
    exact identity to compare masks across processes."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError("mask must be a bool tensor of shape (T, H, W)")
    h = hashlib.sha256(repr(tuple(mask.shape)).encode())
    h.update(bytes(mask.flatten().to(torch.uint8).tolist()))
    return h.hexdigest()
