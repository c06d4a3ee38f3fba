"""A small StreamingBench-format question set on the two bundled clips (``assets/``), written by hand
from what the clips show: the first run of notebook 04 and of ``python -m analysis.eval_stream``
without benchmark data. The tiny test checkpoint answers at random; a real checkpoint should get
them right."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.lib.paths import ASSETS

DEMO_SET = [
    {
        "video_path": "./moviepy_airplane.mp4",
        "video_categories": "aviation",
        "questions": [
            {
                "task_type": "Object Perception",
                "question": "What is flying in the sky?",
                "time_stamp": "00:00:02",
                "options": ["A. A bird.", "B. An airplane.", "C. A kite.", "D. A balloon."],
                "answer": "B",
            },
            {
                "task_type": "Spatial Understanding",
                "question": "Where are the people standing?",
                "time_stamp": "00:00:08",
                "options": ["A. On a beach.", "B. In a street.", "C. On a grass field.", "D. Indoors."],
                "answer": "C",
            },
        ],
    },
    {
        "video_path": "./moviepy_airplane.mp4",
        "video_categories": "aviation",
        "questions": [
            {
                "task_type": "Proactive Output",
                "question": 'When people on a field come into view, output "field".',
                "time_stamp": "00:00:01",
                "ground_truth_time_stamp": "00:00:04",
                "ground_truth_output": "field",
            },
        ],
    },
    {
        "video_path": "./screen_recording.mp4",
        "video_categories": "screen",
        "questions": [
            {
                "task_type": "Object Recognition",
                "question": "What is shown on the screen?",
                "time_stamp": "00:00:10",
                "options": [
                    "A. A video game.",
                    "B. A chat conversation with pictures.",
                    "C. A spreadsheet.",
                    "D. A terminal.",
                ],
                "answer": "B",
            },
        ],
    },
]


def write_demo_set(out: Path) -> tuple[Path, Path]:
    """Write the demo question file into ``out``; returns (the file, the videos folder: ``assets/``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_streamingbench.json"
    path.write_text(json.dumps(DEMO_SET, indent=2), encoding="utf-8")
    return path, ASSETS
