"""Differential Token Drop (DTD), the pure core: torch only, no vLLM, no transformers.

* :mod:`.config`    — :class:`DTDConfig` and the one table of default thresholds;
* :mod:`.masks`     — keep masks from tokens of any kind (absolute τ, relative ratio, chunk carry-over);
* :mod:`.tokens`    — pixel tokens from processed patches or frames; the pixel-level mask step by step;
* :mod:`.positions` — original (t, h, w) and M-RoPE positions of the survivors;
* :mod:`.stats`     — kept tokens per temporal step, mask digests.

Everything is deterministic and runs on any device the input tensors are on. Serving, streams, the
reference pipeline, benchmarks and notebooks import it; nothing re-implements it.
"""

from vllm_plugin.core.config import (
    CRITERIA, DEFAULT_FEATURE_METRIC, DEFAULT_METRIC, DEFAULT_METRICS, DEFAULT_THRESHOLDS, METRICS, REFERENCES, DTDConfig,
    default_threshold, validate_threshold,
)
from vllm_plugin.core.masks import dtd_keep_mask, dtd_keep_mask_relative, next_reference, relative_kept_counts, token_scores
from vllm_plugin.core.positions import (
    kept_thw, mrope_positions, timestamped_mrope_positions, timestamped_position_span, video_position_span,
)
from vllm_plugin.core.stats import DTDStats, mask_digest, mask_stats
from vllm_plugin.core.tokens import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PatchLayout, frame_tokens, pixel_keep_mask, pixel_tokens

__all__ = [
    "CRITERIA", "DEFAULT_FEATURE_METRIC", "DEFAULT_METRIC", "DEFAULT_METRICS", "DEFAULT_THRESHOLDS", "METRICS", "REFERENCES", "DTDConfig",
    "default_threshold", "validate_threshold", "dtd_keep_mask", "dtd_keep_mask_relative", "next_reference",
    "relative_kept_counts", "token_scores", "kept_thw", "mrope_positions", "timestamped_mrope_positions",
    "timestamped_position_span", "video_position_span", "DTDStats", "mask_digest", "mask_stats",
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PatchLayout", "frame_tokens", "pixel_keep_mask", "pixel_tokens",
]
