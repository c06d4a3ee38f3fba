"""DTD request options (``mm_processor_kwargs`` keys ``dtd_*``): parsing and validation. No vLLM import.

Server defaults come from ``--mm-processor-kwargs '{"dtd_threshold": 0.05, ...}'``; a request
overrides them with ``extra_body={"mm_processor_kwargs": {"dtd_threshold": 0.1}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_plugin.core import CRITERIA, DTDConfig
from vllm_plugin.core.config import OPTION_PREFIX

PREFIX = OPTION_PREFIX
KEYS = DTDConfig.option_keys()  # dtd_enabled, dtd_threshold, dtd_metric, dtd_reference, dtd_criterion, dtd_drop_ratio
SERVING_CRITERIA = CRITERIA  # pixel and feature; defaults per (criterion, metric): vllm_plugin.core.DEFAULT_THRESHOLDS
# Video item metadata key: a keep mask its caller already decided, bool (T, H, W) of the processed
# video (streams decide each temporal step when its frames arrive). Only in-process callers can
# set item metadata; the OpenAI API's video loaders never do.
GIVEN_MASK = "dtd_keep_mask"
# With GIVEN_MASK, feature level: the vision tower's outputs of the kept tokens, float (kept, hidden),
# already computed by the caller (streams encode each temporal step on arrival).
GIVEN_EMBEDS = "dtd_kept_embeds"
# With GIVEN_MASK: the time of every temporal step in seconds (streams: the mean time of its frames,
# as the client stamped them). Families whose prompt writes each step's time (Qwen3-VL) use it.
GIVEN_TIMES = "dtd_step_times"


def split_dtd_kwargs(kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dtd_* keys, everything else)."""
    kwargs = dict(kwargs or {})
    dtd = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(PREFIX)}
    return dtd, kwargs


def dtd_config_from_kwargs(kwargs: Mapping[str, Any] | None, criteria=SERVING_CRITERIA) -> DTDConfig:
    """The DTD setting of ``dtd_*`` kwargs (other keys are ignored): :meth:`DTDConfig.from_kwargs`,
    whose :class:`vllm_plugin.core.DTDOptionError` names the offending option (``.field``)."""
    return DTDConfig.from_kwargs(kwargs, criteria)
