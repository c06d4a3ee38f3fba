"""A whole accuracy run: questions × modes over a server, resumable (``python -m analysis.eval_stream``
and notebook 04 call :func:`evaluate`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.eval.formats import Question
from analysis.eval.results import Store, save, write_eval_report
from analysis.eval.runner import Mode, run_pass
from analysis.harness.server import served_model
from analysis.lib.video import load_video
from vllm_plugin.client import StreamHTTPError, open_stream
from vllm_plugin.media import VideoDecodeError, resize_frame


@dataclass
class Outcome:
    """What :func:`evaluate` did: every row in the store, passes run now and skipped (done before),
    videos it could not use (missing or undecodable: ``{video: reason}``), passes that failed."""

    results: pd.DataFrame
    ran: int = 0
    skipped: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # passes the server refused: "{video} {mode}" -> why
    report: Path | None = None


def resolve_video(videos_dir: Path, name: str) -> Path | None:
    """A question file's video under ``videos_dir``: its path relative to it (``./videos/x.mp4`` →
    ``videos_dir/videos/x.mp4``), else its base name there (StreamingBench's paths name a ``videos``
    folder, OVO-Bench's a source folder). A path climbing out of ``videos_dir`` (``..``, absolute) is
    not followed (symbolic links inside it are); None if no file is there."""
    root = Path(os.path.abspath(videos_dir))
    rel = Path(name)
    for p in (root / rel, root / rel.name):
        p = Path(os.path.normpath(p))
        try:
            if p.is_relative_to(root) and p != root and p.is_file():
                return p
        except OSError:  # a name too long for the file system, ...
            continue
    return None


@dataclass(frozen=True)
class StreamGeometry:
    """How the server's streams hold a video: frames resized to ``size`` (height, width),
    ``tokens_per_step`` LLM tokens per temporal step of ``temporal_patch_size`` frames;
    ``resize_ahead``: a frame already at ``size`` keeps it (the processor's resize is idempotent),
    so the harness may resize frames as it decodes them. It is not when ``min_pixels`` is near
    ``max_pixels`` (e.g. both 448²): ``smart_resize`` of a resized frame can round to another size."""

    size: tuple[int, int]
    tokens_per_step: int
    temporal_patch_size: int
    resize_ahead: bool

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """The size to decode frames at (None: as they are; the stream resizes them)."""
        return self.size if self.resize_ahead else None


def _held(base_url: str, frame: np.ndarray, model: str | None) -> dict:
    s = open_stream(base_url, model=model, dtd_enabled=False)
    try:
        tps = s.status()["temporal_patch_size"]
        s.push(np.repeat(frame[None], tps, axis=0))
        return s.status()
    finally:
        s.close()


def stream_geometry(base_url: str, frame: np.ndarray, model: str | None = None) -> StreamGeometry:
    """Ask the server (two throwaway streams of one temporal step) how it holds a video whose frames
    are like ``frame``, and whether a frame resized to that size stays at it."""
    st = _held(base_url, frame, model)
    h, w = st["size"]
    resized = resize_frame(frame, h, w)
    again = _held(base_url, resized, model)["size"] if (h, w) != frame.shape[:2] else [h, w]
    return StreamGeometry((h, w), int(st["tokens_per_step"]), int(st["temporal_patch_size"]), list(again) == [h, w])


def _signature(q_or_row) -> tuple:
    """What identifies a question's rows beyond its id (another file can reuse ids like ``sb/0/0``)."""
    if isinstance(q_or_row, Question):
        return (q_or_row.video, q_or_row.task, float(q_or_row.time), q_or_row.answer)
    return (q_or_row["video"], q_or_row["task"], float(q_or_row["question_time"]), q_or_row["answer"])


def evaluate(
    questions: Sequence[Question],
    videos_dir: Path,
    base_url: str,
    modes: Sequence[Mode],
    out: Path,
    fps: float = 1.0,
    model: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Outcome:
    """Run every (video, mode) pass not yet in ``out`` and write results, summary and report. ``out``
    holding a run of another model or frame rate, or of other frame sizes, is refused (``ValueError``);
    stored rows of another question file under the same ids are not taken for these questions.

    Videos are decoded once per video at ``fps`` (frames resized as the server's streams would, as they
        are decoded, where that resize is idempotent: :class:`StreamGeometry`) up to the last time any of
    its questions asks at. A missing or undecodable video is logged and its questions skipped; a pass
    the server refuses is logged and left for a rerun; the others go on."""
    from tqdm.auto import tqdm

    store = Store(out)
    store.check_settings(
        {
            "benchmarks": sorted({q.benchmark for q in questions}),
            "fps": float(fps),
            "model": served_model(base_url, model),
        }
    )
    sig = {q.qid: _signature(q) for q in questions}
    # a stored row counts for a question only if it is that question (same video, task, time, answer)
    mine = lambda r: sig.get(r["qid"]) == _signature(r)
    done, passes = {(r["qid"], r["mode_key"]) for r in store.rows() if mine(r)}, store.passes()
    by_video: dict[str, list[Question]] = {}
    for q in questions:
        by_video.setdefault(q.video, []).append(q)
    outcome = Outcome(pd.DataFrame())
    todo = [(v, m) for v in by_video for m in modes]
    bar = tqdm(total=len(todo), desc="passes (video × mode)", disable=not progress, file=sys.stderr)
    for video, qs in by_video.items():
        # a pass is done when its totals and all its rows are stored (totals are written first)
        need = [m for m in modes if (video, m.key) not in passes or any((q.qid, m.key) not in done for q in qs)]
        outcome.skipped += len(modes) - len(need)
        bar.update(len(modes) - len(need))
        if not need:
            continue
        path = resolve_video(Path(videos_dir), video)
        if path is None:
            outcome.missing[video] = f"not found under {videos_dir}"
            log(f"video {video!r} not found under {videos_dir}: its {len(qs)} question(s) skipped")
            bar.update(len(need))
            continue
        try:
            first = load_video(path, fps=fps, max_frames=1)
            geo = stream_geometry(base_url, first.frames[0], model)
            before = {p.tokens_per_step for (vid, _), p in passes.items() if vid == video}
            if before and before != {geo.tokens_per_step}:
                raise ValueError(
                    f"{out} holds passes of {video} at {sorted(before)} tokens per step; the server now gives "
                    f"{geo.tokens_per_step} (other size settings?): give another --out"
                )
            end = max(q.end_time for q in qs) + 1e-3
            if not geo.resize_ahead:
                held = min(end * fps, 1e9) * first.frames[0].nbytes
                if held > 4e9:
                    log(
                        f"{video}: the server's resize is not idempotent (min_pixels = max_pixels?), "
                        f"so its frames are held as decoded: ~{held / 1e9:.0f} GB; "
                        "lower --fps or keep min_pixels below max_pixels if that is too much"
                    )
            v = load_video(path, fps=fps, end=end, size=geo.decode_size)
        except (VideoDecodeError, StreamHTTPError) as e:  # unreadable, or frames the server refuses
            outcome.missing[video] = str(e)
            log(f"video {video!r} cannot be used ({e}): its {len(qs)} question(s) skipped")
            bar.update(len(need))
            continue
        for mode in need:
            budget = passes.get((video, mode.dtd_key)) if mode.name == "uniform" else None
            try:
                rows, totals = run_pass(
                    base_url,
                    video,
                    v.frames,
                    v.timestamps,
                    fps,
                    qs,
                    mode,
                    geo.tokens_per_step,
                    geo.temporal_patch_size,
                    budget=budget,
                    model=model,
                )
            except StreamHTTPError as e:  # e.g. 429 too many open streams: not stored, a rerun retries it
                outcome.failed[f"{video} {mode.key}"] = str(e)
                log(f"pass {mode.key} on {video!r} failed ({e}); a rerun retries it")
                bar.update(1)
                continue
            store.add(rows, totals)
            passes[(video, mode.key)] = totals
            outcome.ran += 1
            bar.update(1)
    bar.close()
    keys = {m.key for m in modes}
    df = pd.DataFrame([r for r in store.rows() if mine(r) and r["mode_key"] in keys])
    outcome.results = df
    if not df.empty:
        save(df, Path(out))
        outcome.report = write_eval_report(df, Path(out))
    return outcome
