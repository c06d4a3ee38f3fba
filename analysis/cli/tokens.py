"""Prompt tokens of the same clips under each model family, served with DTD (real servers, one at a time).

    python -m analysis.cli.tokens [--family qwen2_5_vl,qwen3_vl] [--model PATH ...] [--video PATH ...]
        [--fps 2] [--criterion pixel,feature] [--out DIR]

Per checkpoint (the tiny ones of ``--family``, built here, or ``--model`` paths: any family DTD serves)
a server is started with ``python -m vllm_plugin.serve`` and every clip is sent through the
OpenAI-compatible API with DTD off, then with DTD at its default threshold for each criterion; the
served prompt tokens and the kept / total video tokens (``x-dtd-stats``) are recorded. Frames are
sampled at ``--fps`` by vLLM's loader of the family (``--media-io-kwargs``), sized by the family's own
processor (Qwen2.5-VL / Qwen2-VL tiny checkpoints: ≤ 448×448 per frame; Qwen3-VL: its processor's
budget over all frames, capped per frame). Writes ``tokens.csv`` and ``tokens.md``; last line
``checkpoints=N clips=M`` then ``video_tokens_kept_<label>=<kept/total over all clips>`` per
checkpoint and criterion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from analysis.harness.tiny_model import FAMILIES
from analysis.lib.paths import check_videos, default_videos, results_dir

Q = "What happens in this video?"


def measure_clips(srv, clips: dict[str, Path], criteria: list[str]) -> list[dict]:
    """One row per clip and mode (``off`` and each criterion): prompt tokens, kept and total video tokens."""
    from analysis.lib.workbench import served_video_request

    rows = []
    client = srv.client()
    for name, path in clips.items():
        for mode in ["off", *criteria]:
            mm = {"dtd_enabled": False} if mode == "off" else {"dtd_criterion": mode}
            resp, s, _ = served_video_request(client, srv.model, f"file://{path}", mm, Q)
            rows.append(
                {
                    "clip": name,
                    "mode": mode,
                    "prompt_tokens": resp.usage.prompt_tokens,
                    "kept": s["kept"],
                    "total": s["total"],
                    "steps": len(s["kept_per_step"]),
                    "tokens_per_step": s["tokens_per_step"],
                }
            )
    return rows


def table(rows: list[dict], labels: list[str], criteria: list[str]) -> str:
    """Markdown: per clip, each checkpoint's video tokens without DTD and kept with each criterion."""
    head = (
        "| clip | " + " | ".join(f"{lab}: steps × tokens/step, off → " + ", ".join(criteria) for lab in labels) + " |"
    )
    out = [head, "|---" * (1 + len(labels)) + "|"]
    for clip in dict.fromkeys(r["clip"] for r in rows):
        cells = []
        for lab in labels:
            mine = {r["mode"]: r for r in rows if r["clip"] == clip and r["label"] == lab}
            off = mine["off"]
            kept = ", ".join(f"{mine[c]['kept']} ({mine[c]['kept'] / mine[c]['total']:.0%})" for c in criteria)
            cells.append(f"{off['steps']} × {off['tokens_per_step']}, {off['total']} → {kept}")
        out.append(f"| {clip} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.tokens", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--family", default="qwen2_5_vl,qwen3_vl", help=f"tiny checkpoints of these families ({', '.join(FAMILIES)})"
    )
    ap.add_argument(
        "--model", type=Path, nargs="*", default=[], help="checkpoint directories (instead of / besides tiny ones)"
    )
    ap.add_argument(
        "--video", type=Path, nargs="+", help="clips (default: ../shared/videos/*.mp4, else the bundled clip)"
    )
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--criterion", default="pixel,feature")
    ap.add_argument("--out", type=Path, default=results_dir("tokens"))
    args = ap.parse_args(argv)
    families = [f for f in (x.strip() for x in args.family.split(",")) if f]
    criteria = [c for c in (x.strip() for x in args.criterion.split(",")) if c]
    if any(f not in FAMILIES for f in families):
        ap.error(f"--family: choose from {list(FAMILIES)}")
    if any(c not in ("pixel", "feature") for c in criteria):
        ap.error("--criterion: pixel and/or feature")
    videos = args.video or default_videos()
    check_videos(ap, videos)
    for m in args.model:
        if not (m / "config.json").is_file():
            ap.error(f"--model {m}: no config.json there")

    import pandas as pd

    from analysis.harness.server import VLLMServer, context_args
    from analysis.harness.tiny_model import ensure_tiny_model

    checkpoints = [(f, ensure_tiny_model("test", family=f)) for f in families]
    for m in args.model:  # labelled by directory name, made unique (two ".../model" paths)
        label = m.name
        while label in [lab for lab, _ in checkpoints]:
            label = f"{label}_{len(checkpoints)}"
        checkpoints.append((label, m))
    args.out.mkdir(parents=True, exist_ok=True)
    media = Path(tempfile.mkdtemp(prefix="dtd-tokens-"))
    rows: list[dict] = []
    try:
        clips = {v.name: Path(shutil.copy(v, media / v.name)) for v in videos}
        server_args = [
            "--allowed-local-media-path",
            str(media),
            *context_args(32768),
            "--media-io-kwargs",
            json.dumps({"video": {"fps": args.fps, "num_frames": -1}}),
        ]
        for label, path in checkpoints:
            print(f"{label}: serving {path} (python -m vllm_plugin.serve) ...", flush=True)
            with VLLMServer(path, server_args, module="vllm_plugin.serve", log_path=args.out / f"{label}.log") as srv:
                for r in measure_clips(srv, clips, criteria):
                    rows.append({"label": label, **r})
                    print(
                        f"  {r['clip']:32s} {r['mode']:8s} prompt {r['prompt_tokens']:6d}  "
                        f"video {r['kept']:6d}/{r['total']}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(media, ignore_errors=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "tokens.csv", index=False)
    labels = [lab for lab, _ in checkpoints]
    md = table(rows, labels, criteria)
    (args.out / "tokens.md").write_text(md + "\n")
    print(md)

    def kept_share(lab: str, c: str) -> float:
        sel = df[(df.label == lab) & (df["mode"] == c)]
        return sel.kept.sum() / sel.total.sum()

    ratios = " ".join(f"video_tokens_kept_{lab}_{c}={kept_share(lab, c):.3f}" for lab in labels for c in criteria)
    print(f"checkpoints={len(labels)} clips={len(clips)} {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
