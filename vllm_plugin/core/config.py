"""DTD settings: metrics, criteria, the ONE table of default thresholds, and :class:`DTDConfig`,
the only place a setting is validated and converted to and from request options (``dtd_*``).

vLLM-free: the serving options, the streams, the reference pipeline, the workbench and the docs all
read their defaults from here. References are registered in :mod:`vllm_plugin.core.references`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

METRICS: tuple[str, ...] = ("cosine", "l1")
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


class DTDOptionError(ValueError):
    """A DTD setting that is not valid. ``field``: the request option (``dtd_threshold``, ...) as
    data, for callers that report it (the message starts with it too)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def reference_names() -> tuple[str, ...]:
    """The registered references (:mod:`vllm_plugin.core.references`)."""
    from vllm_plugin.core.references import reference_names as names

    return names()


def validate_drop_ratio(drop_ratio: object, name: str = "drop_ratio") -> float:
    """``drop_ratio`` as a float in [0, 1], or ``ValueError``."""
    if (
        isinstance(drop_ratio, bool)
        or not isinstance(drop_ratio, (int, float))
        or not 0.0 <= _as_float(drop_ratio) <= 1.0
    ):
        raise ValueError(f"{name} must be a number in [0, 1], got {drop_ratio!r}")
    return float(drop_ratio)


def _as_float(value: int | float) -> float:
    """``float(value)``; an integer too large for a float is infinity (never an OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def validate_threshold(threshold: object, metric: str, name: str = "threshold") -> float:
    """Return ``threshold`` as a float, or raise ``ValueError`` if it is not a finite number in the
    metric's range (cosine: [-1, 1]; l1: [0, 1])."""
    check_choice("metric", metric, METRICS)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{name} must be a number, got {threshold!r}")
    value = _as_float(threshold)
    lo, hi = THRESHOLD_RANGE[metric]
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}] for metric {metric!r}, got {threshold!r}")
    return value


@dataclass(frozen=True)
class DTDConfig:
    """One DTD setting, validated on construction (:class:`DTDOptionError` names the bad field).

    ``criterion`` says what the tokens are: ``"pixel"`` (the processed patches, decided before the
    vision encoder) or ``"feature"`` (the vision encoder's merged output). ``threshold=None`` takes
    :func:`default_threshold` of the criterion and metric; ``metric=None`` the criterion's default
    metric (:data:`DEFAULT_METRICS`). ``reference``: a registered reference
    (:mod:`vllm_plugin.core.references`). ``drop_ratio``: relative mode instead of τ — every step
    after the first drops ``int(H·W·drop_ratio)`` of its most redundant tokens (a bound on the
    tokens of any video, whatever its content). ``enabled=False`` keeps every token.

    Request options are the fields with a ``dtd_`` prefix (:meth:`from_kwargs`, :meth:`to_kwargs`).
    """

    threshold: float | None = None
    metric: str | None = None
    reference: str = "previous"
    criterion: str = "pixel"
    enabled: bool = True
    drop_ratio: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise DTDOptionError("dtd_enabled", f"must be true or false, got {self.enabled!r}")
        if self.criterion not in CRITERIA:
            raise DTDOptionError("dtd_criterion", f"must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if self.metric is None:
            object.__setattr__(self, "metric", DEFAULT_METRICS[self.criterion])
        if self.metric not in METRICS:
            raise DTDOptionError("dtd_metric", f"must be one of {list(METRICS)}, got {self.metric!r}")
        if self.reference not in reference_names():
            raise DTDOptionError("dtd_reference", f"must be one of {list(reference_names())}, got {self.reference!r}")
        if self.threshold is None:
            object.__setattr__(self, "threshold", default_threshold(self.metric, self.criterion))
        try:
            object.__setattr__(self, "threshold", validate_threshold(self.threshold, self.metric, name="dtd_threshold"))
        except ValueError as e:
            raise DTDOptionError("dtd_threshold", str(e).removeprefix("dtd_threshold ")) from None
        if self.drop_ratio is not None:
            try:
                object.__setattr__(self, "drop_ratio", validate_drop_ratio(self.drop_ratio, "dtd_drop_ratio"))
            except ValueError as e:
                raise DTDOptionError("dtd_drop_ratio", str(e).removeprefix("dtd_drop_ratio ")) from None

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        """The request options: ``dtd_`` + each field."""
        return tuple(OPTION_PREFIX + f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None, criteria: Sequence[str] = CRITERIA) -> DTDConfig:
        """The setting of a request's ``dtd_*`` options (other keys are ignored; absent ones take the
        defaults). Raises :class:`DTDOptionError` naming the option: an unknown ``dtd_*`` key, an
        explicit null, a criterion outside ``criteria``, a bad value."""
        given = {k: v for k, v in dict(kwargs or {}).items() if k.startswith(OPTION_PREFIX)}
        keys = cls.option_keys()
        unknown = sorted(set(given) - set(keys))
        if unknown:
            raise DTDOptionError(unknown[0], f"unknown DTD option; known options are {list(keys)}")
        for key in ("dtd_threshold", "dtd_enabled", "dtd_criterion", "dtd_reference"):
            if key in given and given[key] is None:
                raise DTDOptionError(key, "must not be null (leave it out for the default)")
        # dtd_drop_ratio: null is absolute mode (it switches a server default of relative mode off); with a
        # drop ratio the setting is relative mode, whatever dtd_threshold says (a server default threshold
        # must not refuse a request's relative mode): docs/serving.md says so
        criterion = given.get("dtd_criterion", "pixel")
        if criterion not in criteria:
            raise DTDOptionError("dtd_criterion", f"must be one of {list(criteria)}, got {criterion!r}")
        return cls(**{k[len(OPTION_PREFIX) :]: v for k, v in given.items()})

    def to_kwargs(self) -> dict[str, Any]:
        """The request options that give this setting (``from_kwargs(c.to_kwargs()) == c``)."""
        skip = "drop_ratio" if self.drop_ratio is None else "threshold"  # one mode: the other option stays out
        return {OPTION_PREFIX + f.name: getattr(self, f.name) for f in fields(self) if f.name != skip}


OPTION_PREFIX = "dtd_"
