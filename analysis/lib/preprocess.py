"""Video preprocessing, vLLM's loader against the plugin's: what each path produces and costs.

:func:`compare_loaders` runs, in this process, both loaders on the same bytes and the model's HF
video processor on each result, and reports: the sampled frame indices (must be equal), the
processor grid (must be equal), the pixel difference of the processed patches (mean and max
absolute, in 0-255 units; only the resampling filter differs), the DTD pixel-level mask agreement at
a threshold (fraction of tokens decided the same), and the seconds of each stage. The serving
benchmark (:mod:`analysis.cli.bench_preprocess`) measures the same through real servers. A clip
either loader refuses (the plugin's guards: container, codec — ``DTD_VIDEO_CODECS`` — and size;
or a file neither can decode) raises :class:`ClipRefused`, what a server answers with a 400.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from vllm_plugin.core import DTDConfig, PatchLayout, pixel_decide

# what a loader raises for a file it refuses or cannot read: the plugin's VideoDecodeError (a
# ValueError: codec, container, size), vLLM's ValueError / OpenCV's and FFmpeg's errors
LOADER_ERRORS = (ValueError, RuntimeError, OSError)


class ClipRefused(Exception):
    """A video loader refused the clip: ``clip`` (its file name) and ``reason`` (one line)."""

    def __init__(self, clip: str, reason: str):
        super().__init__(f"{clip}: {reason}")
        self.clip, self.reason = clip, reason


@dataclass
class LoaderComparison:
    clip: str
    fps: float
    frames: int
    indices_equal: bool
    grid_equal: bool
    grid: tuple[int, int, int]
    mean_abs_diff: float  # processed pixels, 0-255 units
    max_abs_diff: float
    mask_agreement: float  # fraction of tokens DTD decides the same (pixel level, the given τ)
    kept_vllm: int
    kept_fast: int
    tokens: int
    decode_s_vllm: float
    decode_s_fast: float
    processor_s_vllm: float
    processor_s_fast: float
    decision_s_vllm: float
    decision_s_fast: float
    planned: bool = True  # the plugin's loader decoded it (False: the file went to vLLM's loader)

    @property
    def preprocess_s_vllm(self) -> float:
        return self.decode_s_vllm + self.processor_s_vllm + self.decision_s_vllm

    @property
    def preprocess_s_fast(self) -> float:
        return self.decode_s_fast + self.processor_s_fast + self.decision_s_fast

    @property
    def speedup(self) -> float:
        return self.preprocess_s_vllm / max(self.preprocess_s_fast, 1e-9)

    def as_row(self) -> dict:
        return {
            **asdict(self),
            "preprocess_s_vllm": self.preprocess_s_vllm,
            "preprocess_s_fast": self.preprocess_s_fast,
            "speedup": self.speedup,
        }


def _processor(model_path: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_path)).video_processor


def _process(vp, frames: np.ndarray, metadata: dict):
    out = vp(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    return out["pixel_values_videos"], out["video_grid_thw"][0]


def compare_loaders(
    path: str | Path, model_path: str | Path, fps: float = 2.0, dtd: DTDConfig | None = None, repeats: int = 1
) -> LoaderComparison:
    """Both loaders (vLLM's ``qwen2_vl`` on OpenCV; the plugin's, scaled to the processor's size) on
    the clip at ``path``, each followed by the model's HF video processor and the pixel-level DTD
    decision (``dtd``, default :class:`DTDConfig`). Seconds are the best of ``repeats``. Raises
    :class:`ClipRefused` when either loader refuses the clip (the plugin's is tried first)."""
    from vllm.multimodal.video import Qwen2VLVideoBackend

    from vllm_plugin.entrypoints import video_loader

    dtd = dtd or DTDConfig()
    data = Path(path).read_bytes()
    vp = _processor(model_path)
    cls = video_loader.loader_class(Qwen2VLVideoBackend)
    assert cls is not None, "the plugin reproduces vLLM's qwen2_vl loader"
    fast_cls = cast("type[Qwen2VLVideoBackend]", cls)  # loader_class subclasses its base
    sizing = video_loader.FrameSizing.of(vp, {})
    layout = PatchLayout(
        merge_size=vp.merge_size,
        temporal_patch_size=vp.temporal_patch_size,
        image_mean=tuple(vp.image_mean),
        image_std=tuple(vp.image_std),
    )

    def run(load, loader: str):
        best = None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            try:
                frames, meta = load()
            except LOADER_ERRORS as e:
                reason = " ".join(str(e).split()) or "no message"
                raise ClipRefused(Path(path).name, f"{loader} refused it: {type(e).__name__}: {reason}") from e
            t1 = time.perf_counter()
            pv, grid = _process(vp, frames, meta)
            t2 = time.perf_counter()
            mask = pixel_decide(pv, grid, dtd, layout=layout).mask
            t3 = time.perf_counter()
            times = (t1 - t0, t2 - t1, t3 - t2)
            if best is None or sum(times) < sum(best[-1]):
                best = (meta, pv, grid, mask, times)
        return best

    previous = video_loader._SIZING
    try:
        video_loader._SIZING = sizing
        # fps: vLLM annotates it int, its loaders sample at any rate (the server passes a float)
        fast = run(lambda: fast_cls.load_bytes(data, fps=fps), "the plugin's video loader")  # type: ignore[arg-type]
    finally:
        video_loader._SIZING = previous
    ref = run(lambda: Qwen2VLVideoBackend.load_bytes(data, fps=fps), "vLLM's video loader")  # type: ignore[arg-type]
    grid_equal = bool(torch.equal(ref[2], fast[2]))
    if grid_equal:
        std = torch.tensor(vp.image_std).view(1, 3, 1) * 255.0
        d = ((ref[1] - fast[1]).reshape(ref[1].shape[0], 3, -1) * std).abs()
        mean_d, max_d = float(d.mean()), float(d.max())
        agree = float((ref[3] == fast[3]).float().mean())
    else:
        mean_d = max_d = agree = float("nan")
    grid_t, grid_h, grid_w = (int(x) for x in ref[2].tolist())
    return LoaderComparison(
        clip=Path(path).name,
        fps=fps,
        frames=len(ref[0]["frames_indices"]),
        indices_equal=ref[0]["frames_indices"] == fast[0]["frames_indices"],
        grid_equal=grid_equal,
        grid=(grid_t, grid_h, grid_w),
        mean_abs_diff=mean_d,
        max_abs_diff=max_d,
        mask_agreement=agree,
        kept_vllm=int(ref[3].sum()),
        kept_fast=int(fast[3].sum()),
        tokens=int(ref[3].numel()),
        decode_s_vllm=ref[4][0],
        decode_s_fast=fast[4][0],
        processor_s_vllm=ref[4][1],
        processor_s_fast=fast[4][1],
        decision_s_vllm=ref[4][2],
        decision_s_fast=fast[4][2],
        planned=fast[0].get("video_backend") in (video_loader.NATIVE_TAG, video_loader.SCALED_TAG),
    )
