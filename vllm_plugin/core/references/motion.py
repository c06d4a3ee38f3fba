"""``motion``: step t is compared with step t − 1 moved by the camera's global translation.

A handheld or panning camera shifts the whole view between steps, so almost no token repeats the
token at its own place: ``previous`` keeps nearly everything. ``motion`` estimates each step's
translation against the previous step on the token grid (phase correlation of a per-token
signature: the token's first :data:`SIGNATURE_CHANNELS` channels averaged in
:data:`SIGNATURE_GROUPS` groups, i.e. for pixel tokens the first pixels of its first sub-patch, for
feature tokens the first feature channels), rounds it to whole
tokens, compares each token with the previous step's token at the shifted place, and keeps the
tokens whose shifted place falls outside the previous step (the edge that enters the view).

Candidates are the highest correlation peaks (:data:`CANDIDATES`) within a quarter of the grid
(:data:`MAX_SHIFT_FRACTION`) that beat the unshifted alignment's correlation by :data:`MIN_GAIN`;
each is scored, and the alignment — (0, 0) or a candidate — under which the most tokens are
redundant at τ wins (ties: (0, 0) first). At offset (0, 0) the scores are ``previous``'s bit for bit,
so a video without motion gets ``previous``'s mask exactly, and a step never drops fewer tokens than
``previous`` would drop from the same reference. Cost per step: one small FFT of (8, H, W) and one
scoring pass, plus one pass per candidate on steps where the view moved. In relative mode (no τ)
the rule ranks the same way with the threshold of the setting.
"""

from __future__ import annotations

import functools

import torch

from vllm_plugin.core.references.base import Comparison, Reference, Rule, Scorer, register_reference

SIGNATURE_CHANNELS = 64  # leading channels of each token the translation is estimated from ...
SIGNATURE_GROUPS = 8  # ... averaged in this many groups (the FFT's channels)
MIN_GAIN = 1.5  # a shifted peak must be this many times the correlation at (0, 0)
MAX_SHIFT_FRACTION = 0.25  # of the grid's height/width, per step
CANDIDATES = 2  # translations tried besides (0, 0)


def spectrum(tokens: torch.Tensor) -> torch.Tensor:
    """(H, W, C) tokens -> complex (K, H, W // 2 + 1): the 2-D spectrum of the tokens' signature —
    their first :data:`SIGNATURE_CHANNELS` channels averaged in :data:`SIGNATURE_GROUPS` groups
    (all of them, ungrouped, when fewer), each zero-mean."""
    H, W = int(tokens.shape[0]), int(tokens.shape[1])
    k = min(int(tokens.shape[-1]), SIGNATURE_CHANNELS)
    sig = tokens[..., :k].float()
    if k % SIGNATURE_GROUPS == 0:
        sig = sig.view(H, W, SIGNATURE_GROUPS, k // SIGNATURE_GROUPS).mean(-1)
    sig = sig.permute(2, 0, 1)
    spec: torch.Tensor = torch.fft.rfft2(sig - sig.mean(dim=(1, 2), keepdim=True))
    return spec


@functools.lru_cache(maxsize=64)
def _shift_grid(H: int, W: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The signed (dy, dx) of every place of an (H, W) correlation and which are allowed candidates
    (within :data:`MAX_SHIFT_FRACTION`, not (0, 0)), flattened."""
    dys = torch.arange(H)
    dys = torch.where(dys > H // 2, dys - H, dys)
    dxs = torch.arange(W)
    dxs = torch.where(dxs > W // 2, dxs - W, dxs)
    allowed = (dys.abs() <= int(H * MAX_SHIFT_FRACTION))[:, None] & (dxs.abs() <= int(W * MAX_SHIFT_FRACTION))[None, :]
    allowed[0, 0] = False
    return dys.repeat_interleave(W), dxs.repeat(H), allowed.flatten()


def candidate_shifts(
    current: torch.Tensor,
    reference: torch.Tensor,
    count: int = CANDIDATES,
    spectra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[int, int]]:
    """Up to ``count`` whole-token translations (dy, dx) that may map ``reference`` (H, W, C) onto
    ``current`` (H, W, C) — ``current[h, w] ≈ reference[h - dy, w - dx]`` — best first: the highest
    peaks of the phase correlation of the two signatures within :data:`MAX_SHIFT_FRACTION` of the
    grid, each above :data:`MIN_GAIN` × the correlation at (0, 0). Empty when nothing moved.
    ``spectra``: (:func:`spectrum` of current, of reference) when already computed."""
    H, W = int(current.shape[0]), int(current.shape[1])
    dys, dxs, allowed = _shift_grid(H, W)
    if not bool(allowed.any()):
        return []
    a, b = spectra if spectra is not None else (spectrum(current), spectrum(reference))
    cross = (a * b.conj()).sum(0)
    corr = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-12), s=(H, W)).flatten()
    floor = MIN_GAIN * max(float(corr[0]), 0.0)
    values, order = torch.topk(
        corr.masked_fill(~allowed.to(corr.device), float("-inf")), min(count, int(allowed.sum()))
    )
    return [(int(dys[i]), int(dxs[i])) for v, i in zip(values.tolist(), order.tolist()) if v > floor]


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

    def __init__(self) -> None:
        # the spectrum of the last step compared: the next step's state is that step (update), so
        # each step's spectrum is computed once
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def compare(self, current: torch.Tensor, state: torch.Tensor, score: Scorer, redundant: Rule) -> Comparison:
        cached = self._last is not None and self._last[0] is state
        state = state.to(current.dtype)
        best = Comparison(score(current, state))
        spec_current = spectrum(current)
        spec_state = self._last[1] if cached and self._last is not None else spectrum(state)
        self._last = (current, spec_current)
        shifts = candidate_shifts(current, state, spectra=(spec_current, spec_state))
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
