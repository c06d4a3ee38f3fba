#!/usr/bin/env python
"""Regenerate ``assets/screen_recording.mp4``: a small fixed-view clip on which DTD drops most tokens.

Source (read-only, Apache-2.0, © the Video-LLaVA authors / PKU-YuanGroup):
    ../shared/videos/videollava_ui_screenrec.mp4
    = PKU-YuanGroup/Video-LLaVA, ``assets/demo.mp4`` (screen recording of the Gradio demo,
      2048x1810, 20 fps, 32.1 s, yuvj420p H.264; its first frame is stamped 0.30 s)
    SHA-256 5a93547b... (../shared/videos/SHA256SUMS; checked below).

Why this clip and not sam2_02_cups.mp4 (the tripod footage): at 2 fps, pixel L1 tau=0.05, the
shell game keeps ~half the tokens of every step (hands, cups and the player's body move in the
middle of the frame all the time: 47% dropped over the whole clip, no calmer window), while the
screen recording is a truly fixed view with local changes. The cut (source 0.3-20.3 s, 20 s so that
the demo's 1 fps gives 10 temporal steps) shows the first example run and the second one starting:
a video example is clicked and loads, the answer is written. Measured (pixel L1, tau=0.05,
previous): 82.6% of the tokens dropped at 1 fps, 90.5% at 2 fps.

What is done (defaults below):
  * cut: source frames whose timestamp t (PyAV ``frame.time``) satisfies START <= t < START+DURATION,
    every 2nd one (20 fps -> 10 fps), re-timed from 0;
  * scale: to WIDTH px wide, height = round(WIDTH * 1810 / 2048) to an even number (448x396),
    swscale AREA (averaging) downscale, through rgb24;
  * encode: H.264 with libx264 through PyAV, yuv420p (swscale rgb24 -> yuv420p), crf CRF,
    preset "slow", x264-params "mbtree=0", one thread, MP4 with +faststart. mbtree is off because
    with it this libx264 build gave different bytes from run to run within one process (its asm
    path; asm=0 or mbtree=0 made it repeatable): without it the bytes depend only on the build.

The SHA-256 of the output is printed; it is recorded in assets/NOTICE.md. A different libx264 /
FFmpeg build (PyAV wheel) may give other bytes with the same pictures.

Usage (from the repo root):  .venv/bin/python scripts/make_screen_clip.py
"""

from __future__ import annotations

import argparse
import hashlib
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO.parent / "shared" / "videos" / "videollava_ui_screenrec.mp4"
SOURCE_SHA256 = "5a93547ba1dd1405c09219e9c9cd90d445a8c80d0737fe737c998fc4eea706ff"
OUT = REPO / "assets" / "screen_recording.mp4"

START = 0.3  # s, source timestamp of the first frame kept (the source's own clock starts at 0.30 s)
DURATION = 20.0  # s
STEP = 2  # keep every STEP-th source frame: 20 fps -> 10 fps
WIDTH = 448
CRF = 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_clip(
    source: Path = SOURCE,
    out: Path = OUT,
    start: float = START,
    duration: float = DURATION,
    step: int = STEP,
    width: int = WIDTH,
    crf: int = CRF,
    check_source: bool = True,
) -> Path:
    import av

    if check_source and sha256(source) != SOURCE_SHA256:
        raise SystemExit(f"{source}: unexpected SHA-256 (not the clip listed in ../shared/videos/SHA256SUMS)")
    out.parent.mkdir(parents=True, exist_ok=True)
    eps = 1e-6
    with av.open(str(source)) as src:
        sstream = src.streams.video[0]
        src_rate = Fraction(sstream.average_rate)
        rate = src_rate / step
        height = int(round(width * sstream.height / sstream.width / 2)) * 2
        with av.open(str(out), mode="w", options={"movflags": "+faststart"}) as dst:
            stream = dst.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(crf), "preset": "slow", "threads": "1", "x264-params": "mbtree=0"}
            n = i = 0
            for frame in src.decode(sstream):
                t = float(frame.time)
                if t < start - eps:
                    continue
                if t >= start + duration - eps:
                    break
                if i % step == 0:
                    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                    new = av.VideoFrame.from_ndarray(rgb.to_ndarray(), format="rgb24").reformat(format="yuv420p")
                    new.pts = n
                    new.time_base = 1 / rate
                    for packet in stream.encode(new):
                        dst.mux(packet)
                    n += 1
                i += 1
            for packet in stream.encode():
                dst.mux(packet)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--start", type=float, default=START)
    ap.add_argument("--duration", type=float, default=DURATION)
    ap.add_argument("--step", type=int, default=STEP)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--crf", type=int, default=CRF)
    ap.add_argument("--no-check-source", action="store_true", help="skip the source SHA-256 check")
    a = ap.parse_args()
    out = make_clip(a.source, a.out, a.start, a.duration, a.step, a.width, a.crf, check_source=not a.no_check_source)
    print(f"{out}: {out.stat().st_size} bytes")
    print(f"SHA-256 {sha256(out)}")


if __name__ == "__main__":
    main()
