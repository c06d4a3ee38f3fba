"""Where things are: the bundled clips, the shared real clips beside a clone, and where results go."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from vllm_plugin import settings

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
SAMPLE_VIDEO = ASSETS / "moviepy_airplane.mp4"  # handheld footage: DTD drops ~30%
SCREEN_VIDEO = ASSETS / "screen_recording.mp4"  # a fixed view (screen): DTD drops ~80-90% (assets/NOTICE.md)
SHARED_VIDEOS = REPO.parent / "shared" / "videos"  # real clips provided beside the clone (CI, our machines)
RESULTS_ENV = "DTD_RESULTS_DIR"


def shared_videos() -> list[Path]:
    """The real clips of ``../shared/videos`` (sorted), or none."""
    return sorted(SHARED_VIDEOS.glob("*.mp4")) if SHARED_VIDEOS.is_dir() else []


def default_videos() -> list[Path]:
    """The clips a benchmark runs when given none: the shared real clips, else the bundled one."""
    return shared_videos() or [SAMPLE_VIDEO]


def check_videos(ap: argparse.ArgumentParser, videos: Iterable[Path]) -> None:
    """A command line's clips: argparse's error (exit status 2) at the first that is not a file."""
    for v in videos:
        if not v.is_file():
            ap.error(f"no such video: {v}")


def results_dir(name: str, root: Path | None = None) -> Path:
    """``$DTD_RESULTS_DIR/<name>`` when that is set (tests point it at a temporary directory: nothing
    is written into the repository tree), else ``results/<name>`` under ``root`` (default: the
    working directory)."""
    given = settings.get(RESULTS_ENV)
    if given:
        return Path(given) / name
    return (Path(root) if root is not None else Path()) / "results" / name
