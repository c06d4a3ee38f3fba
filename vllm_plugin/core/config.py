"""DTD settings: metrics, references, criteria and the ONE table of default thresholds.

Torch-free and vLLM-free: the serving options, the streams, the reference pipeline, the workbench
and the README all read their defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

METRICS: tuple[str, ...] = ("cosine", "l1")
REFERENCES: tuple[str, ...] = ("previous", "last_kept")
CRITERIA: tuple[str, ...] = ("pixel", "feature")
THRESHOLD_RANGE = {"cosine": (-1.0, 1.0), "l1": (0.0, 1.0)}

DEFAULT_METRIC = "l1"  # pixel level: the reference code's pixel rule
DEFAULT_FEATURE_METRIC = "cosine"  # feature level: the paper's criterion
DEFAULT_METRICS: dict[str, str] = {"pixel": DEFAULT_METRIC, "feature": DEFAULT_FEATURE_METRIC}
# Default τ per (criterion, metric). Pixel L1 on pixels in [0, 1]; cosine on raw pixels is high for
# any two natural patches (all values positive), so its useful thresholds sit close to 1. Feature
# cosine: the paper's evaluation setting (0.5; its demo uses 0.25, its fine-tuning 0.7).
DEFAULT_THRESHOLDS: dict[tuple[str, str], float] = {
    ("pixel", "l1"): 0.05,
    ("pixel", "cosine"): 0.98,
    ("feature", "cosine"): 0.5,
    ("feature", "l1"): 0.05,
}


def default_threshold(metric: str = DEFAULT_METRIC, criterion: str = "pixel") -> float:
    """The default τ of a criterion and metric (:data:`DEFAULT_THRESHOLDS`)."""
    check_choice("dtd_criterion", criterion, CRITERIA)
    check_choice("dtd_metric", metric, METRICS)
    return DEFAULT_THRESHOLDS[(criterion, metric)]


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def validate_threshold(threshold: object, metric: str, name: str = "threshold") -> float:
    """Return ``threshold`` as a float, or raise ``ValueError`` if it is not a finite number in the
    metric's range (cosine: [-1, 1]; l1: [0, 1])."""
    check_choice("metric", metric, METRICS)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{name} must be a number, got {threshold!r}")
    value = float(threshold)
    lo, hi = THRESHOLD_RANGE[metric]
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}] for metric {metric!r}, got {threshold!r}")
    return value


@dataclass(frozen=True)
class DTDConfig:
    """One DTD setting, validated on construction (``ValueError`` names the bad field).

    ``criterion`` says what the tokens are: ``"pixel"`` (the processed patches, decided before the
    vision encoder) or ``"feature"`` (the vision encoder's merged output). ``threshold=None`` takes
    :func:`default_threshold` of the criterion and metric; ``metric=None`` the criterion's default
    metric (:data:`DEFAULT_METRICS`). ``enabled=False`` keeps every token.
    """

    threshold: Optional[float] = None
    metric: Optional[str] = None
    reference: str = "previous"
    criterion: str = "pixel"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"dtd_enabled must be a boolean, got {self.enabled!r}")
        check_choice("dtd_criterion", self.criterion, CRITERIA)
        if self.metric is None:
            object.__setattr__(self, "metric", DEFAULT_METRICS[self.criterion])
        check_choice("dtd_metric", self.metric, METRICS)
        check_choice("dtd_reference", self.reference, REFERENCES)
        if self.threshold is None:
            object.__setattr__(self, "threshold", default_threshold(self.metric, self.criterion))
        validate_threshold(self.threshold, self.metric, name="dtd_threshold")
