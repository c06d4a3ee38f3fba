"""What DTD did to one video: kept tokens per temporal step, and a digest of the exact mask."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DTDStats:
    """Per-video outcome of DTD.

    ``kept_per_step[t]`` is the number of kept tokens of temporal step ``t`` (one step covers
    ``temporal_patch_size`` frames); every step has ``tokens_per_step`` (= H·W) tokens.
    """

    kept_per_step: tuple[int, ...]
    tokens_per_step: int

    @property
    def total(self) -> int:
        return self.tokens_per_step * len(self.kept_per_step)

    @property
    def kept(self) -> int:
        return sum(self.kept_per_step)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    @property
    def drop_ratio(self) -> float:
        return self.dropped / self.total if self.total else 0.0

    @property
    def kept_fraction_per_step(self) -> tuple[float, ...]:
        return tuple(k / self.tokens_per_step for k in self.kept_per_step)

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "kept": self.kept,
            "drop_ratio": self.drop_ratio,
            "tokens_per_step": self.tokens_per_step,
            "kept_per_step": list(self.kept_per_step),
        }


def check_mask(mask: object) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError("mask must be a bool tensor of shape (T, H, W)")
    return mask


def mask_stats(mask: torch.Tensor) -> DTDStats:
    """Per-step kept counts of a bool (T, H, W) mask."""
    T, H, W = check_mask(mask).shape
    return DTDStats(kept_per_step=tuple(int(k) for k in mask.reshape(T, -1).sum(dim=1).tolist()), tokens_per_step=H * W)


def mask_digest(mask: torch.Tensor) -> str:
    """SHA-256 (hex) of a bool (T, H, W) mask's bits in raster order, with its shape: a compact,
    exact identity to compare masks across processes."""
    h = hashlib.sha256(repr(tuple(check_mask(mask).shape)).encode())
    h.update(bytes(mask.flatten().to(torch.uint8).tolist()))
    return h.hexdigest()
