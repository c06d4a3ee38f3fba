"""What one question saw: its frames up to its time with the tokens DTD dropped shaded (notebook 04)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.eval.conventions import stream_start
from analysis.eval.evaluate import resolve_video, stream_geometry
from analysis.eval.formats import Question
from analysis.eval.runner import Mode
from analysis.lib.figures import overlay_figure
from analysis.lib.video import load_video
from analysis.lib.workbench import tokens_from_frames
from vllm_plugin.core import dtd_keep_mask
from vllm_plugin.media import resize_frame


@dataclass
class QuestionView:
    """``frames``: uint8 (2T, h, w, 3) the stream held at the question's time (whole temporal steps,
    at the stream's size); ``mask``: bool (T, H, W) kept tokens (all True without DTD);
    ``step_times``: seconds into the video of each step's first frame."""

    question: Question
    mode: Mode
    frames: np.ndarray
    mask: torch.Tensor
    step_times: list[float]

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    def figure(self, step: int | None = None):
        title = (
            f"{self.question.qid} at {self.question.time:g} s, {self.mode.key}: "
            "kept (clear) and dropped (shaded) tokens"
        )
        return overlay_figure(self.frames, self.mask.numpy(), step=step, step_times=self.step_times, title=title)


def question_view(
    question: Question,
    videos_dir: Path,
    base_url: str,
    mode: Mode,
    fps: float = 1.0,
    model_path: str | Path | None = None,
    reference: str = "previous",
) -> QuestionView:
    """The frames a ``full`` or ``dtd`` pass of :func:`analysis.eval.runner.run_pass` sent before
    ``question`` (decoded and resized as the harness does), with the keep mask recomputed by
    :func:`vllm_plugin.core.dtd_keep_mask` on the same frames (feature level: the vision tower of
    ``model_path``, default the tiny test checkpoint: pass the served checkpoint for a real one)."""
    if mode.name == "uniform":
        raise ValueError("a uniform pass keeps whole frames: view its dtd pass, or the full one")
    path = resolve_video(Path(videos_dir), question.video)
    if path is None:
        raise FileNotFoundError(f"{question.video} is not under {videos_dir}")
    first = load_video(path, fps=fps, max_frames=1)
    geo = stream_geometry(base_url, first.frames[0])
    v = load_video(path, fps=fps, end=question.time + 1e-3, size=geo.decode_size)
    keep = v.timestamps >= stream_start(question) - 1e-6
    frames, times = v.frames[keep], v.timestamps[keep]
    n = len(frames) // geo.temporal_patch_size * geo.temporal_patch_size  # whole steps: a lone last frame waits
    if n == 0:
        raise ValueError(f"{question.qid}: no whole temporal step before {question.time:g} s")
    h, w = geo.size
    if frames.shape[1:3] != (h, w):  # resized on arrival, as the stream does
        frames = np.stack([resize_frame(f, h, w) for f in frames[:n]])
    tokens = tokens_from_frames(frames[:n], fps, times[:n], max_pixels=h * w)
    if mode.name == "full":
        mask = torch.ones(tokens.grid, dtype=torch.bool)
    else:
        assert mode.criterion is not None and mode.metric is not None, f"{mode.key}: a DTD setting"
        mask = dtd_keep_mask(
            tokens.tokens(mode.criterion, model_path), mode.threshold, metric=mode.metric, reference=reference
        )
    return QuestionView(question, mode, frames[:n], mask, [float(t) for t in times[: n : geo.temporal_patch_size]])


def question_browser(questions, results, modes, videos_dir: Path, base_url: str, fps: float = 1.0):
    """An ipywidgets app: pick a multiple-choice question that was asked and a full or DTD mode, see
    the frames it saw with the dropped tokens shaded, the kept count against what the server sent, and
    the reply (notebook 04)."""
    import ipywidgets as W

    asked = [q for q in questions if q.kind == "mc" and q.qid in set(results["qid"])]
    shown = [m for m in modes if m.name != "uniform"]
    if not asked or not shown:
        return W.HTML("no multiple-choice question was asked in a full or DTD mode")
    pick = W.Dropdown(
        options=[(f"{q.qid} @ {q.time:g}s: {q.question[:50]}", q.qid) for q in asked], description="question"
    )
    mode = W.Dropdown(
        options=[m.key for m in shown],
        value=next((m.key for m in shown if m.name == "dtd"), shown[0].key),
        description="mode",
    )
    out = W.Output()

    def show(_=None):
        q = next(q for q in asked if q.qid == pick.value)
        m = next(m for m in shown if m.key == mode.value)
        view = question_view(q, videos_dir, base_url, m, fps=fps)
        row = results[(results["qid"] == q.qid) & (results["mode_key"] == m.key)].iloc[0]
        out.clear_output(wait=True)
        with out:
            print(
                f"{q.qid}: kept {view.kept} of {view.mask.numel()} video tokens (served: {row['video_tokens']}); "
                f"answer {q.answer}, reply {row['reply']!r}"
            )
            view.figure().show()

    pick.observe(show, names="value")
    mode.observe(show, names="value")
    show()
    return W.VBox([W.HBox([pick, mode]), out])
