"""Differential Token Drop (DTD), the pure core: torch only, no vLLM, no transformers.

* :mod:`.config`     — :class:`DTDConfig` (validation, request options) and the one table of default thresholds;
* :mod:`.references` — what a token is compared with: one module per reference, one registry;
* :mod:`.decide`     — :func:`decide_steps`, the one walk over the steps every caller uses;
* :mod:`.masks`      — the metrics' scores and rules; :func:`dtd_keep_mask` for tokens given as a tensor;
* :mod:`.tokens`     — pixel tokens from processed patches or frames; the pixel-level decision step by step;
* :mod:`.positions` — original (t, h, w) and M-RoPE positions of the survivors;
* :mod:`.stats`     — kept tokens per temporal step, mask digests.

Everything is deterministic and runs on any device the input tensors are on. Serving, streams, the
reference pipeline, benchmarks and notebooks import it; nothing re-implements it.
"""

from vllm_plugin.core.config import (
    CRITERIA,
    DEFAULT_FEATURE_METRIC,
    DEFAULT_METRIC,
    DEFAULT_METRICS,
    DEFAULT_THRESHOLDS,
    METRICS,
    DTDConfig,
    DTDOptionError,
    default_threshold,
    reference_names,
    validate_threshold,
)
from vllm_plugin.core.decide import Decision, decide_steps, keep_at_least_one
from vllm_plugin.core.masks import dtd_keep_mask, token_scores
from vllm_plugin.core.positions import (
    kept_thw,
    mrope_positions,
    timestamped_mrope_positions,
    timestamped_position_span,
    video_position_span,
)
from vllm_plugin.core.references import Reference, get_reference, register_reference
from vllm_plugin.core.stats import DTDStats, mask_digest, mask_stats
from vllm_plugin.core.tokens import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PatchLayout,
    frame_tokens,
    pixel_decide,
    pixel_keep_mask,
    pixel_tokens,
)

__all__ = [
    "CRITERIA",
    "DEFAULT_FEATURE_METRIC",
    "DEFAULT_METRIC",
    "DEFAULT_METRICS",
    "DEFAULT_THRESHOLDS",
    "METRICS",
    "DTDConfig",
    "DTDOptionError",
    "default_threshold",
    "reference_names",
    "validate_threshold",
    "Decision",
    "decide_steps",
    "keep_at_least_one",
    "dtd_keep_mask",
    "token_scores",
    "Reference",
    "get_reference",
    "register_reference",
    "kept_thw",
    "mrope_positions",
    "timestamped_mrope_positions",
    "timestamped_position_span",
    "video_position_span",
    "DTDStats",
    "mask_digest",
    "mask_stats",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PatchLayout",
    "frame_tokens",
    "pixel_decide",
    "pixel_keep_mask",
    "pixel_tokens",
]
