"""DTD request options (``mm_processor_kwargs`` keys ``dtd_*``): parsing and validation. No vLLM import.

Server defaults come from ``--mm-processor-kwargs '{"dtd_threshold": 0.05, ...}'``; a request
overrides them with ``extra_body={"mm_processor_kwargs": {"dtd_threshold": 0.1}}``.
"""

from __future__ import annotations

from typing import Any, Mapping

from vllm_plugin.core import CRITERIA, METRICS, DTDConfig

PREFIX = "dtd_"
KEYS = ("dtd_enabled", "dtd_threshold", "dtd_metric", "dtd_reference", "dtd_criterion")
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
    """Build the DTD setting from ``dtd_*`` kwargs (other keys are ignored).

    Raises ``ValueError`` whose message starts with the offending field name.
    """
    dtd, _ = split_dtd_kwargs(kwargs)
    unknown = sorted(set(dtd) - set(KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown DTD option; known options are {list(KEYS)}")
    enabled = dtd.get("dtd_enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"dtd_enabled: must be true or false, got {enabled!r}")
    criterion = dtd.get("dtd_criterion", "pixel")
    if criterion not in criteria:
        raise ValueError(f"dtd_criterion: must be one of {list(criteria)}, got {criterion!r}")
    metric = dtd.get("dtd_metric")  # absent: the criterion's default (vllm_plugin.core.DEFAULT_METRICS)
    if metric is not None and metric not in METRICS:
        raise ValueError(f"dtd_metric: must be one of {sorted(METRICS)}, got {metric!r}")
    if "dtd_threshold" in dtd and dtd["dtd_threshold"] is None:
        raise ValueError("dtd_threshold: must be a number, got None")
    threshold = dtd.get("dtd_threshold")  # absent: the default of the criterion and metric
    try:
        return DTDConfig(
            threshold=threshold, metric=metric, reference=dtd.get("dtd_reference", "previous"),
            criterion=criterion, enabled=enabled,
        )
    except ValueError as e:
        msg = str(e)
        field = next((k for k in KEYS if msg.startswith(k)), None)
        if field is None:
            raise ValueError(f"dtd_threshold: {msg}") from None
        raise ValueError(f"{field}: {msg[len(field):].lstrip(': ')}") from None
