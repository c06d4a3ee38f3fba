"""DTD keep masks: which tokens of a video survive, given tokens of any kind (pixel or feature).

DTD (TimeChat-Online, "token_drop" in its ``modeling_qwen2_5_vl_DTD.py``) compares every visual
token of temporal step ``t`` with the token at the same spatial place ``(h, w)`` of a reference
step and drops it when the two are redundant:

* ``metric="cosine"`` — redundant when cosine similarity > ``threshold`` (in [-1, 1]; the paper's
  feature-level criterion);
* ``metric="l1"`` — redundant when the mean absolute difference < ``threshold`` (in [0, 1]; the
  paper's pixel-level criterion, on pixels denormalized to [0, 1]).

The reference is step ``t-1`` (``reference="previous"``, the paper's rule) or, per ``(h, w)``, the
last token that was KEPT there (``reference="last_kept"``, our ablation: slow drift cannot hide
forever). The first step is kept whole unless an ``initial_reference`` (the end of a previous chunk
of the same stream) is given.

Shapes (one video): ``T`` temporal steps (frames after ``temporal_patch_size`` grouping), ``H, W``
the merged spatial grid (one entry per LLM token), ``C`` channels of a token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_plugin.core.config import DEFAULT_METRIC, METRICS, REFERENCES, check_choice, validate_threshold


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


def _check_inputs(tokens, metric: str, reference: str, initial_reference) -> None:
    _check_tokens(tokens)
    check_choice("metric", metric, METRICS)
    check_choice("reference", reference, REFERENCES)
    _check_initial_reference(initial_reference, tokens)


def token_scores(current: torch.Tensor, reference: torch.Tensor, metric: str = DEFAULT_METRIC) -> torch.Tensor:
    """Per-token redundancy score between two aligned token sets.

    Args:
        current: (..., C) tokens.
        reference: (..., C) tokens at the same places.
        metric: ``"cosine"`` (cosine similarity, higher = more redundant) or ``"l1"`` (mean
            absolute difference, lower = more redundant).
    Returns:
        (...) float32 scores.
    """
    check_choice("metric", metric, METRICS)
    current = current.float()
    reference = reference.float()
    if metric == "cosine":
        return F.cosine_similarity(current, reference, dim=-1)
    return (current - reference).abs_().mean(dim=-1)


def is_redundant(scores: torch.Tensor, threshold: float, metric: str) -> torch.Tensor:
    scores = scores.double()  # compare at the threshold's own precision (a float64 Python number)
    return scores > threshold if metric == "cosine" else scores < threshold


def _redundancy(scores: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores turned so that larger = more redundant (for ranking in relative mode)."""
    return scores if metric == "cosine" else -scores


def scan_steps(
    tokens: torch.Tensor,
    decide,
    metric: str,
    reference: str,
    initial_reference: Optional[torch.Tensor],
    score=token_scores,
) -> torch.Tensor:
    """Walk the frames in time order. ``decide(scores (H, W)) -> keep (H, W)`` for frames that have
    a reference; a frame without one (frame 0 with no ``initial_reference``) is kept whole.
    ``score(current (H, W, C), reference (H, W, C), metric) -> (H, W)``: :func:`token_scores`, or
    one that gives the same decisions faster for the tokens' dtype."""
    check_choice("reference", reference, REFERENCES)
    T, H, W, _ = tokens.shape
    mask = torch.ones((T, H, W), dtype=torch.bool, device=tokens.device)
    ref = initial_reference
    if reference == "previous":
        # Every frame's reference is the frame before it, whatever was kept. Frame by frame: each
        # difference stays in cache (~3x faster than one (T, H, W, C) pass).
        first = 0 if ref is not None else 1
        for t in range(first, T):
            prev = ref.to(tokens.dtype) if t == 0 else tokens[t - 1]
            mask[t] = decide(score(tokens[t], prev, metric))
        return mask
    # last_kept: the reference at (h, w) is the last token kept there; sequential by nature.
    start = 0
    if ref is None:
        ref = tokens[0]
        start = 1
    ref = ref.to(tokens.dtype).clone()
    for t in range(start, T):
        keep = decide(score(tokens[t], ref, metric))
        mask[t] = keep
        ref[keep] = tokens[t][keep]
    return mask


def dtd_keep_mask(
    tokens: torch.Tensor,
    threshold: float,
    metric: str = DEFAULT_METRIC,
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
    _check_inputs(tokens, metric, reference, initial_reference)
    threshold = validate_threshold(threshold, metric)
    return scan_steps(tokens, lambda s: ~is_redundant(s, threshold, metric), metric, reference, initial_reference)


def relative_kept_counts(num_steps: int, tokens_per_step: int, drop_ratio: float, first_step_whole: bool = True) -> list[int]:
    """Kept tokens per temporal step in relative mode, known before any token is looked at.

    Step t ≥ 1 drops ``int(tokens_per_step * drop_ratio)`` tokens (the reference code's rounding);
    step 0 keeps all when ``first_step_whole``.
    """
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0.0 <= float(drop_ratio) <= 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1], got {drop_ratio!r}")
    if num_steps < 1 or tokens_per_step < 1:
        raise ValueError(f"num_steps and tokens_per_step must be >= 1, got {num_steps}, {tokens_per_step}")
    k = tokens_per_step - int(tokens_per_step * float(drop_ratio))
    counts = [k] * num_steps
    if first_step_whole:
        counts[0] = tokens_per_step
    return counts


def dtd_keep_mask_relative(tokens: torch.Tensor, drop_ratio: float, **options) -> torch.Tensor:
    """Relative mode: every step with a reference drops its ``int(H*W*drop_ratio)`` most redundant
    tokens (ties broken by raster order), so the kept count is :func:`relative_kept_counts`.

    Args:
        tokens: as for :func:`dtd_keep_mask`.
        drop_ratio: in [0, 1], instead of a threshold.
        options: ``metric``, ``reference``, ``initial_reference``, as for :func:`dtd_keep_mask`.
    Returns:
        as :func:`dtd_keep_mask`.
    """
    unknown = sorted(set(options) - {"metric", "reference", "initial_reference"})
    if unknown:
        raise TypeError(f"dtd_keep_mask_relative() got unexpected options {unknown}")
    metric = options.get("metric", DEFAULT_METRIC)
    reference = options.get("reference", "previous")
    initial_reference = options.get("initial_reference")
    _check_inputs(tokens, metric, reference, initial_reference)
    T, H, W, _ = tokens.shape
    n_drop = H * W - relative_kept_counts(1, H * W, drop_ratio, first_step_whole=False)[0]

    def decide(scores: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(H * W, dtype=torch.bool, device=scores.device)
        order = torch.sort(_redundancy(scores.flatten(), metric), descending=True, stable=True).indices
        keep[order[:n_drop]] = False
        return keep.view(H, W)

    return scan_steps(tokens, decide, metric, reference, initial_reference)


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
    check_choice("reference", reference, REFERENCES)
    if reference == "previous":
        return tokens[-1].clone()
    ref = tokens[0].clone() if initial_reference is None else initial_reference.to(tokens.dtype).clone()
    for t in range(tokens.shape[0]):
        ref[mask[t]] = tokens[t][mask[t]]
    return ref
