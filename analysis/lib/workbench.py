"""The research workbench's library: what the notebooks and the sweep CLI call (no logic lives in
notebooks). DTD itself is :mod:`vllm_plugin.core`; this module loads videos into tokens, runs grids
of settings, times them, and talks to a live server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from analysis.lib.video import load_video
from vllm_plugin.core import CRITERIA, DTDConfig, decide_steps, frame_tokens, mask_stats
from vllm_plugin.streams.session import Geometry


@dataclass
class VideoTokens:
    """A video as the model sees it: frames resized to the processor's size (a multiple of the
    28-px token cell, at most ``max_pixels``), an even number of them, and their pixel tokens."""

    name: str
    frames: np.ndarray  # uint8 (N, height, width, 3), N even
    fps: float
    pixel: torch.Tensor  # (T, H, W, C) in [0, 1], T = N / 2
    step_times: list[float] = field(default_factory=list)  # time of the first frame of every step
    path: str | None = None
    _features: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = self.pixel.shape[:3]
        return t, h, w

    @property
    def tokens_per_step(self) -> int:
        return self.grid[1] * self.grid[2]

    def tokens(self, criterion: str = "pixel", model_path: str | Path | None = None) -> torch.Tensor:
        if criterion == "pixel":
            return self.pixel
        if criterion != "feature":
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        key = str(model_path) if model_path else "tiny-test"
        if key not in self._features:
            self._features[key] = feature_tokens(self, model_path)
        return self._features[key]


def load_tokens(
    path: str | Path,
    fps: float = 1.0,
    max_pixels: int = Geometry.max_pixels,
    max_frames: int | None = None,
    name: str | None = None,
) -> VideoTokens:
    """Decode ``path`` at ``fps`` (PyAV), resize like Qwen2.5-VL's processor, pad to whole temporal
    patches (repeating the last frame, as the processor does) and compute pixel tokens."""

    v = load_video(path, fps=fps, max_frames=max_frames)
    return tokens_from_frames(
        v.frames, fps, v.timestamps, max_pixels=max_pixels, name=name or Path(path).name, path=str(path)
    )


def tokens_from_frames(
    frames: np.ndarray,
    fps: float,
    timestamps: Sequence[float] | np.ndarray | None = None,
    max_pixels: int = 448 * 448,
    name: str = "frames",
    path: str | None = None,
) -> VideoTokens:
    from PIL import Image

    geo = Geometry(max_pixels=max_pixels)
    h, w = geo.target_size(*frames.shape[1:3])
    if frames.shape[1:3] != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])
    times = list(timestamps) if timestamps is not None else [i / fps for i in range(len(frames))]
    times += [times[-1] + 1 / fps] * (len(frames) - len(times))
    pixel = frame_tokens(torch.from_numpy(frames))
    return VideoTokens(name, frames, fps, pixel, [float(times[2 * t]) for t in range(pixel.shape[0])], path)


def feature_tokens(video: VideoTokens, model_path: str | Path | None = None) -> torch.Tensor:
    """The vision encoder's merged output for every LLM token, (T, H, W, C): the paper's
    feature-level criterion. ``model_path``: any local checkpoint of a family DTD serves (the tiny
    Qwen2.5-VL test one by default). A family whose token covers another cell than 28 px (Qwen3-VL:
    32) encodes the frames scaled to the same token grid, so its features line up with the pixel
    tokens. DeepStack levels are left out (DTD compares the main output)."""
    from PIL import Image

    from analysis.harness.tiny_model import ensure_tiny_model

    pipe = _pipeline(str(model_path or ensure_tiny_model("test")))
    cell = int(pipe.processor.video_processor.patch_size) * pipe.merge_size
    T, H, W = video.grid
    if cell * H != video.frames.shape[1] or cell * W != video.frames.shape[2]:
        frames = np.stack(
            [
                np.asarray(Image.fromarray(f).resize((W * cell, H * cell), Image.Resampling.BICUBIC))
                for f in video.frames
            ]
        )
        processed = pipe.process_video(frames, video.fps, do_resize=False)
    else:
        processed = pipe.process_video(video.frames, video.fps)
    T, H, W = processed.llm_grid
    if video.grid != (T, H, W):
        raise ValueError(f"processor grid {(T, H, W)} differs from the video's {video.grid}")
    return pipe.video_embeddings(processed).reshape(T, H, W, -1).float()


_PIPES: dict = {}


def _pipeline(path: str):
    from analysis.lib.reference import reference_pipeline

    if path not in _PIPES:
        _PIPES[path] = reference_pipeline(path)
    return _PIPES[path]


def run_dtd(tokens: torch.Tensor, threshold: float, metric: str, reference: str) -> dict:
    """One DTD run (:func:`vllm_plugin.core.decide_steps`): mask, per-step kept tokens, drop ratio,
    the time the decision took, the offset (dy, dx) the reference was read at per step (``motion``:
    the estimated camera translation in tokens) and the held error (:func:`held_error`)."""
    config = DTDConfig(threshold=threshold, metric=metric, reference=reference)
    t0 = time.perf_counter()
    decision = decide_steps(tokens, config)
    seconds = time.perf_counter() - t0
    s = mask_stats(decision.mask)
    offsets = [list(o) for o in decision.offsets]
    return {
        "mask": decision.mask,
        "kept_per_step": list(s.kept_per_step),
        "kept": s.kept,
        "total": s.total,
        "drop_ratio": s.drop_ratio,
        "seconds": seconds,
        "offsets": offsets,
        "held_error": held_error(tokens, decision.mask, decision.offsets),
    }


def held_error(tokens: torch.Tensor, mask: torch.Tensor, offsets: Sequence[Sequence[int]] | None = None) -> float:
    """How much of every frame a model that sees only the kept tokens misses: the mean absolute
    difference between each token and the token it is held as — the most recent kept token at its
    (h, w), or, with ``offsets`` (a motion-compensated reference), the held token of the previous
    step at the compensated place (h - dy, w - dx).

    Args:
        tokens: float (T, H, W, C). mask: bool (T, H, W), ``mask[0]`` all True (DTD's first frame,
            or uniform subsampling's first step). offsets: per step (dy, dx) in tokens
            (``Decision.offsets``); None: all (0, 0).
    Returns:
        the mean over T, H, W, C (0 when every token is kept; pixel tokens are on a 0–1 scale).
    """
    from vllm_plugin.core.references.motion import shifted

    if mask.shape != tokens.shape[:3] or not bool(mask[0].all()):
        raise ValueError("mask must be (T, H, W) like tokens, with the first step all kept")
    held = tokens[0]
    err = 0.0
    for t in range(tokens.shape[0]):
        dy, dx = (int(v) for v in offsets[t]) if offsets is not None else (0, 0)
        if (dy, dx) != (0, 0):
            held, outside = shifted(held, dy, dx)
            if bool((outside & ~mask[t]).any()):
                raise ValueError(f"step {t}: a token with no compensated reference was dropped")
        held = torch.where(mask[t, ..., None], tokens[t], held)
        err += float((tokens[t] - held).abs().mean())
    return err / tokens.shape[0]


def parse_range(spec: str) -> list[float]:
    """``start:stop:step`` (stop included, up to float rounding) or a comma list -> thresholds."""
    if ":" in spec:
        parts = [float(x) for x in spec.split(":")]
        if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
            raise ValueError(f"thresholds must be start:stop:step with step > 0 and stop >= start, got {spec!r}")
        start, stop, step = parts
        n = int(np.floor((stop - start) / step + 1e-9)) + 1
        return [round(start + i * step, 10) for i in range(n)]
    return [float(x) for x in spec.split(",") if x.strip()]


def cell_key(video: str, criterion: str, metric: str, reference: str, threshold: float) -> tuple:
    return (video, criterion, metric, reference, round(float(threshold), 10))


def sweep(
    videos: Sequence[VideoTokens],
    thresholds: Iterable[float],
    metrics: Iterable[str] = ("cosine", "l1"),
    references: Iterable[str] = ("previous", "last_kept", "motion"),
    criteria: Iterable[str] = ("pixel",),
    model_path: str | Path | None = None,
    skip: Iterable[tuple] = (),
    progress: bool = True,
) -> list[dict]:
    """DTD over the grid videos × criteria × metrics × references × thresholds. Thresholds outside a
    metric's range (cosine [-1, 1], l1 [0, 1]) are skipped. Cells whose :func:`cell_key` is in
    ``skip`` are not run again. Returns one row per cell run."""
    from tqdm.auto import tqdm

    from vllm_plugin.core import validate_threshold

    done = set(skip)
    cells = []
    for v in videos:
        for c in criteria:
            for m in metrics:
                for r in references:
                    for t in thresholds:
                        try:
                            validate_threshold(t, m)
                        except ValueError:
                            continue
                        if cell_key(v.name, c, m, r, t) not in done:
                            cells.append((v, c, m, r, t))
    rows = []
    for v, c, m, r, t in tqdm(cells, desc="DTD sweep", disable=not progress):
        res = run_dtd(v.tokens(c, model_path), t, m, r)
        rows.append(
            {
                "video": v.name,
                "criterion": c,
                "metric": m,
                "reference": r,
                "threshold": float(t),
                "kept": res["kept"],
                "total": res["total"],
                "drop_ratio": res["drop_ratio"],
                "seconds": res["seconds"],
                "held_error": res["held_error"],
                "kept_per_step": res["kept_per_step"],
                "offsets": res["offsets"],
                "tokens_per_step": v.tokens_per_step,
                "frames": len(v.frames),
                "fps": v.fps,
            }
        )
    return rows


def served_video_request(client, model: str, video_url: str, mm: dict, question: str = "What happens in this video?"):
    """One chat request with one video and ``mm_processor_kwargs`` (one generated token): (the
    response, the video's ``x-dtd-stats`` entry or ``{}``, seconds)."""
    import json

    from analysis.harness.server import video_question

    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        max_tokens=1,
        temperature=0.0,
        extra_body={"mm_processor_kwargs": mm},
        messages=video_question(video_url, question),
    )
    latency = time.perf_counter() - t0
    return raw.parse(), json.loads(raw.headers.get("x-dtd-stats", '{"videos": [{}]}'))["videos"][0], latency


def serving_sweep(
    base_url: str,
    video_url: str,
    thresholds: Iterable[float],
    metric: str = "l1",
    question: str = "What happens in this video?",
    model: str | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Against a live DTD server: per threshold, the prompt tokens and latency of one request
    (``dtd_enabled=False`` for threshold ``None``). Each setting's first request is cold (its
    multimodal hash is new); with ``repeats`` > 1 the later ones show the cached latency."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY")
    model = model or client.models.list().data[0].id
    rows = []
    for thr in thresholds:
        mm = {"dtd_enabled": False} if thr is None else {"dtd_threshold": float(thr), "dtd_metric": metric}
        for rep in range(repeats):
            resp, stats, latency = served_video_request(client, model, video_url, mm, question)
            rows.append(
                {
                    "threshold": thr,
                    "metric": metric,
                    "repeat": rep,
                    "latency_s": latency,
                    "prompt_tokens": resp.usage.prompt_tokens,
                    "video_tokens_kept": stats.get("kept"),
                    "video_tokens_total": stats.get("total"),
                }
            )
    return rows


def translation_bound(tokens: torch.Tensor, threshold: float, metric: str = "l1", max_shift: int = 3) -> dict:
    """What ANY whole-token translation could drop: per step t ≥ 1, the most tokens redundant
    against step t − 1 over every shift (dy, dx) with |dy|, |dx| ≤ ``max_shift`` (the entering edge
    kept), by exhaustive search. An upper bound for the ``motion`` reference on a clip (its
    estimator picks among such shifts), for telling a weak estimator from a clip whose motion is not
    a translation. Returns ``{"drop_ratio", "shifts"}`` (the best shift per step, (0, 0) first)."""
    from vllm_plugin.core import token_scores
    from vllm_plugin.core.masks import is_redundant
    from vllm_plugin.core.references.motion import shifted

    T, H, W, _ = tokens.shape
    dropped, shifts = 0, [(0, 0)]
    for t in range(1, T):
        best = (-1, (0, 0))
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                aligned, outside = shifted(tokens[t - 1], dy, dx)
                n = int((is_redundant(token_scores(tokens[t], aligned, metric), threshold, metric) & ~outside).sum())
                if n > best[0] or (n == best[0] and (dy, dx) == (0, 0)):
                    best = (n, (dy, dx))
        dropped += best[0]
        shifts.append(best[1])
    return {"drop_ratio": dropped / (T * H * W), "shifts": shifts}
