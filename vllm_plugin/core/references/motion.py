"""``motion``: step t is compared with step t − 1 moved by the camera's global translation.

A handheld or panning camera shifts the whole view between steps, so almost no token repeats the
token at its own place: ``previous`` keeps nearly everything. ``motion`` estimates each step's
translation against the previous step on the token grid (phase correlation of a per-token
signature: the token's first :data:`SIGNATURE_CHANNELS` channels, i.e. for pixel tokens the first
pixels of its first sub-patch, for feature tokens the first feature channels), rounds it to whole
tokens, compares each token with the previous step's token at the shifted place, and keeps the
tokens whose shifted place falls outside the previous step (the edge that enters the view).

Candidates are the highest correlation peaks (:data:`CANDIDATES`) within a quarter of the grid
(:data:`MAX_SHIFT_FRACTION`) that beat the unshifted alignment's correlation by :data:`MIN_GAIN`;
each is scored, and the alignment — (0, 0) or a candidate — under which the most tokens are
redundant at τ wins (ties: (0, 0) first). At offset (0, 0) the scores are ``previous``'s bit for bit,
so a video without motion gets ``previous``'s mask exactly, and a step never drops fewer tokens than
``previous`` would drop from the same reference. Cost per step: one small FFT of (K, H, W) and one
scoring pass, plus one pass per candidate on steps where the view moved. In relative mode (no τ)
the rule ranks the same way with the threshold of the setting.
"""

from __future__ import annotations

import torch

from vllm_plugin.core.references.base import Comparison, Reference, Rule, Scorer, register_reference

SIGNATURE_CHANNELS = 64  # channels of each token the translation is estimated from
MIN_GAIN = 1.5  # a shifted peak must be this many times the correlation at (0, 0)
MAX_SHIFT_FRACTION = 0.25  # of the grid's height/width, per step
CANDIDATES = 2  # translations tried besides (0, 0)


def _signature(tokens: torch.Tensor) -> torch.Tensor:
    """(H, W, C) tokens -> float32 (K, H, W), each channel zero-mean."""
    k = min(int(tokens.shape[-1]), SIGNATURE_CHANNELS)
    sig = tokens[..., :k].float().permute(2, 0, 1)
    return sig - sig.mean(dim=(1, 2), keepdim=True)


def candidate_shifts(current: torch.Tensor, reference: torch.Tensor, count: int = CANDIDATES) -> list[tuple[int, int]]:
    """Up to ``count`` whole-token translations (dy, dx) that may map ``reference`` (H, W, C) onto
    ``current`` (H, W, C) — ``current[h, w] ≈ reference[h - dy, w - dx]`` — best first: the highest
    peaks of the phase correlation of the two signatures within :data:`MAX_SHIFT_FRACTION` of the
    grid, each above :data:`MIN_GAIN` × the correlation at (0, 0). Empty when nothing moved."""
    H, W = int(current.shape[0]), int(current.shape[1])
    max_dy, max_dx = int(H * MAX_SHIFT_FRACTION), int(W * MAX_SHIFT_FRACTION)
    if max_dy == 0 and max_dx == 0:
        return []
    a, b = torch.fft.rfft2(_signature(current)), torch.fft.rfft2(_signature(reference))
    cross = (a * b.conj()).sum(0)
    corr = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-12), s=(H, W))
    dys = torch.arange(H)
    dys = torch.where(dys > H // 2, dys - H, dys)
    dxs = torch.arange(W)
    dxs = torch.where(dxs > W // 2, dxs - W, dxs)
    allowed = (dys.abs() <= max_dy)[:, None] & (dxs.abs() <= max_dx)[None, :]
    allowed[0, 0] = False
    floor = MIN_GAIN * max(float(corr[0, 0]), 0.0)
    peaks = corr.masked_fill(~allowed, float("-inf")).flatten()
    values, order = torch.sort(peaks, descending=True, stable=True)
    return [
        (int(dys[i // W]), int(dxs[i % W]))
        for v, i in zip(values[:count].tolist(), order[:count].tolist())
        if v > floor
    ]


def shifted(state: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` (H, W, C) read at offset (dy, dx): (aligned (H, W, C), outside bool (H, W)) with
    ``aligned[h, w] = state[h - dy, w - dx]`` where that place exists (``outside`` False), and
    ``state[h, w]`` elsewhere (``outside`` True: the caller keeps those tokens)."""
    H, W = state.shape[:2]
    aligned = state.clone()
    outside = torch.ones((H, W), dtype=torch.bool, device=state.device)
    ys, yd = slice(max(0, -dy), H - max(0, dy)), slice(max(0, dy), H - max(0, -dy))
    xs, xd = slice(max(0, -dx), W - max(0, dx)), slice(max(0, dx), W - max(0, -dx))
    aligned[yd, xd] = state[ys, xs]
    outside[yd, xd] = False
    return aligned, outside


@register_reference
class Motion(Reference):
    name = "motion"
    rank = 2

    def compare(self, current: torch.Tensor, state: torch.Tensor, score: Scorer, redundant: Rule) -> Comparison:
        state = state.to(current.dtype)
        best = Comparison(score(current, state))
        shifts = candidate_shifts(current, state)
        if not shifts:
            return best
        most = int(redundant(best.scores).sum())
        for dy, dx in shifts:
            aligned, outside = shifted(state, dy, dx)
            cmp = Comparison(score(current, aligned), outside, (dy, dx))
            n = int((redundant(cmp.scores) & ~outside).sum())
            if n > most:
                best, most = cmp, n
        return best
