"""DTD keep masks: which tokens of a video survive, given tokens of any kind (pixel or feature).

DTD (TimeChat-Online, "token_drop" in its ``modeling_qwen2_5_vl_DTD.py``) compares every visual
token of temporal step ``t`` with the token at the same spatial place ``(h, w)`` of a reference
step and drops it when the two are redundant:

* ``metric="cosine"`` — redundant when cosine similarity > ``threshold`` (in [-1, 1]; the paper's
  feature-level criterion);
* ``metric="l1"`` — redundant when the mean absolute difference < ``threshold`` (in [0, 1]; the
  paper's pixel-level criterion, on pixels denormalized to [0, 1]).

What a token is compared with is a *reference* (:mod:`vllm_plugin.core.references`: step ``t-1``,
the paper's rule; the last token kept at ``(h, w)``; step ``t-1`` moved by the camera's motion), and
the walk over the steps is :func:`vllm_plugin.core.decide.decide_steps`. The first step is kept
whole unless a state (the end of a previous chunk of the same stream) is given.

Shapes (one video): ``T`` temporal steps (frames after ``temporal_patch_size`` grouping), ``H, W``
the merged spatial grid (one entry per LLM token), ``C`` channels of a token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_plugin.core.config import DEFAULT_METRIC, METRICS, check_choice


def check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
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


def check_initial_reference(initial_reference: torch.Tensor | None, tokens: torch.Tensor) -> None:
    if initial_reference is None:
        return
    if not isinstance(initial_reference, torch.Tensor) or tuple(initial_reference.shape) != tuple(tokens.shape[1:]):
        shape = tuple(initial_reference.shape) if isinstance(initial_reference, torch.Tensor) else initial_reference
        raise ValueError(f"initial_reference must have shape (H, W, C) = {tuple(tokens.shape[1:])}, got {shape}")
    if not bool(torch.isfinite(initial_reference).all()):
        raise ValueError("initial_reference contains NaN or inf")


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


def redundancy(scores: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores turned so that larger = more redundant (for ranking in relative mode)."""
    return scores if metric == "cosine" else -scores


def dtd_keep_mask(
    tokens: torch.Tensor,
    threshold: float | None = None,
    metric: str = DEFAULT_METRIC,
    reference: str = "previous",
    initial_reference: torch.Tensor | None = None,
    drop_ratio: float | None = None,
) -> torch.Tensor:
    """Which tokens of a video survive DTD: :func:`vllm_plugin.core.decide.decide_steps`'s mask, for
    tokens given as a tensor.

    Args:
        tokens: float (T, H, W, C), one token per LLM position of the video.
        threshold: cosine: drop when similarity > threshold, in [-1, 1];
            l1: drop when mean |difference| < threshold, in [0, 1]. None: the pixel default.
        metric: ``"cosine"`` or ``"l1"``.
        reference: a registered reference (``"previous"``, ``"last_kept"``, ``"motion"``, ...).
        initial_reference: optional float (H, W, C): the reference state the previous chunk of the
            same stream ended with (``Decision.state``). Without it frame 0 is kept whole.
        drop_ratio: relative mode: each step after the first drops its ``int(H*W*drop_ratio)`` most
            redundant tokens, instead of a threshold.
    Returns:
        bool (T, H, W); True = kept. Frame 0 is all True when ``initial_reference`` is None.
    Raises:
        ValueError: empty or non-rank-4 tokens, NaN/inf, unknown metric/reference, threshold or
            drop_ratio out of range.
    """
    from vllm_plugin.core.config import DTDConfig
    from vllm_plugin.core.decide import decide_steps

    check_tokens(tokens)
    check_initial_reference(initial_reference, tokens)
    config = DTDConfig(threshold=threshold, metric=metric, reference=reference, drop_ratio=drop_ratio)
    return decide_steps(tokens, config, state=initial_reference).mask
