"""The accuracy harness end to end: ``python -m analysis.eval_stream`` against a REAL vLLM server
(tiny checkpoint: answers are random, the mechanics are what is tested) on the hand-written
StreamingBench and OVO-Bench fixtures."""

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, renders_offline

FIXTURES = REPO / "tests" / "fixtures" / "eval"
SB_MODES = [
    "full",
    "dtd/pixel/l1/0.05",
    "dtd/pixel/l1/0.5",
    "dtd/feature/cosine/0.05",
    "dtd/feature/cosine/0.5",
    "uniform/pixel/l1/0.05",
    "uniform/pixel/l1/0.5",
    "uniform/feature/cosine/0.05",
    "uniform/feature/cosine/0.5",
]
LAST_LINE = re.compile(r"^questions=\d+ accuracy=\d\.\d{4} drop_ratio=\d\.\d{4}$")


@pytest.fixture(scope="module")
def eval_videos(tmp_path_factory, synthetic_mp4, real_clip_mp4):
    """The fixtures' videos: StreamingBench paths under videos/, OVO-Bench ones found by base name."""
    d = tmp_path_factory.mktemp("eval_videos")
    (d / "videos").mkdir()
    shutil.copy(synthetic_mp4, d / "videos" / "sample_1_real.mp4")
    shutil.copy(synthetic_mp4, d / "videos" / "sample_1_proactive.mp4")
    shutil.copy(real_clip_mp4, d / "videos" / "sample_2_real.mp4")
    shutil.copy(synthetic_mp4, d / "synthetic-walk.mp4")
    shutil.copy(real_clip_mp4, d / "airplane.mp4")
    return d


def eval_stream(*args, timeout=900, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "analysis.eval_stream", "--quiet", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0 or not check, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sb_run(dtd_server, eval_videos, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("eval_sb")
    args = [
        "--format",
        "streamingbench",
        "--data",
        FIXTURES / "streamingbench.json",
        "--videos",
        eval_videos,
        "--url",
        dtd_server.base_url,
        "--criterion",
        "pixel,feature",
        "--thresholds",
        "0.05,0.5",
        "--out",
        out_dir,
    ]
    return args, out_dir, eval_stream(*args)


def test_streamingbench_runs_every_mode_on_the_same_questions(sb_run):
    _, out_dir, run = sb_run
    last = run.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last), last
    assert last.startswith("questions=5 ")  # 6 well-formed questions, 1 on a missing video
    assert "video './videos/sample_404_real.mp4' not found" in run.stderr and "1 videos missing" in run.stdout
    assert run.stderr.count("skipped malformed entry") == 3 and "'5 seconds' is not HH:MM:SS" in run.stderr
    df = pd.read_parquet(out_dir / "results.parquet")
    assert sorted(df["mode_key"].unique()) == sorted(SB_MODES)
    qids = {m: set(g["qid"]) for m, g in df.groupby("mode_key")}
    assert all(q == qids["full"] for q in qids.values()) and qids["full"] == {
        "sb/0/0",
        "sb/1/0",
        "sb/1/1",
        "sb/2/0",
        "sb/3/0",
    }
    assert len(df) == len(SB_MODES) * 5 and (df["errors"] == 0).all()
    for r in df.to_dict("records"):  # only frames at or before each ask's time were ever in the stream
        assert r["last_frame_time"] <= r["last_ask_time"] + 1e-6, r
        if r["kind"] == "mc":
            assert (
                r["last_ask_time"] == r["question_time"] and r["asks"] == 1 and r["prompt_tokens"] > r["video_tokens"]
            )
            assert r["full_video_tokens"] > 0 and (
                r["video_tokens"] > 0 or r["mode"] == "uniform"
            )  # uniform may not have a step yet
    full = df[df["mode"] == "full"].set_index("qid")
    assert (full["drop_ratio"] == 0).all() and (full["video_tokens"] == full["full_video_tokens"]).all()
    for key in SB_MODES[1:]:
        d = df[df["mode_key"] == key].set_index("qid")
        assert (d["video_tokens"] <= full.loc[d.index, "video_tokens"]).all(), key
    assert (
        df[df["mode_key"] == "dtd/pixel/l1/0.5"]["drop_ratio"].mean()
        > df[df["mode_key"] == "dtd/pixel/l1/0.05"]["drop_ratio"].mean()
    )
    for name in ("results.csv", "summary.csv", "results.jsonl", "passes.jsonl"):
        assert (out_dir / name).is_file()
    summary = pd.read_csv(out_dir / "summary.csv")
    assert set(summary["task"]) == {"Object Perception", "Clips Summarize", "Object Recognition", "Proactive Output"}


def test_proactive_polling_runs_every_second_until_gt_plus_4_or_the_first_yes(sb_run):
    _, out_dir, _ = sb_run
    df = pd.read_parquet(out_dir / "results.parquet")
    p = df[df["kind"] == "proactive"]
    assert len(p) == len(SB_MODES)
    for r in p.to_dict("records"):
        # time_stamp 8 s, ground truth 12 s: polls at 9..16 s; a "yes" stops them and asks the question at that time
        if r["response_time"] is None or r["response_time"] != r["response_time"]:
            assert r["asks"] == 8 and r["last_ask_time"] == 16.0 and not r["correct"]
        else:
            assert r["asks"] == int(r["response_time"]) - 8 + 1 and r["last_ask_time"] == r["response_time"]
        assert r["last_frame_time"] <= r["last_ask_time"]


def test_uniform_sends_about_dtds_budget_at_a_lower_frame_rate(sb_run):
    _, out_dir, _ = sb_run
    passes = {(p["video"], p["mode"]): p for p in map(json.loads, (out_dir / "passes.jsonl").read_text().splitlines())}
    for video in ("./videos/sample_1_real.mp4", "./videos/sample_2_real.mp4"):
        full = passes[(video, "full")]
        for setting in ("pixel/l1/0.05", "pixel/l1/0.5", "feature/cosine/0.5"):
            dtd, uni = passes[(video, f"dtd/{setting}")], passes[(video, f"uniform/{setting}")]
            assert uni["frames"] <= full["frames"] and (
                uni["frames"] < full["frames"] or dtd["kept_tokens"] == full["kept_tokens"]
            )
            # whole steps: within one step (+ the odd frame's) of DTD's tokens
            assert abs(uni["kept_tokens"] - dtd["kept_tokens"]) <= 2 * full["tokens_per_step"], (video, setting)


def test_the_report_renders_offline(sb_run, request):
    _, out_dir, _ = sb_run
    renders_offline(request, out_dir / "report.html", expected_plots=2)


def test_a_rerun_skips_what_is_done_and_runs_what_is_missing(sb_run):
    args, out_dir, first = sb_run
    again = eval_stream(*args)
    assert "0 passes run, 27 already" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    rows = (out_dir / "results.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["mode_key"] != "dtd/pixel/l1/0.5"]
    (out_dir / "results.jsonl").write_text("\n".join(kept) + "\n")
    # a pass whose totals are missing (a torn write; a uniform pass's budget) runs again
    passes = (out_dir / "passes.jsonl").read_text().splitlines()
    gone = [
        p for p in passes if json.loads(p)["mode"] == "dtd/feature/cosine/0.05" and "sample_2" in json.loads(p)["video"]
    ]
    (out_dir / "passes.jsonl").write_text("\n".join(p for p in passes if p not in gone) + "\n")
    third = eval_stream(*args)
    assert "4 passes run, 23 already" in third.stdout  # one mode × three videos, and the pass without its totals
    assert len(pd.read_parquet(out_dir / "results.parquet")) == len(SB_MODES) * 5
    other = eval_stream(*args, "--fps", "2", check=False)
    assert other.returncode == 2 and "holds a run with other settings (fps: 1.0 there, 2.0 now)" in other.stderr
    # another file reusing the ids: a question whose time changed is not taken as done
    data = json.loads((FIXTURES / "streamingbench.json").read_text())
    data[0]["questions"][0]["time_stamp"] = "00:00:09"
    changed = out_dir / "changed.json"
    changed.write_text(json.dumps(data))
    fourth = eval_stream(*[changed if a == FIXTURES / "streamingbench.json" else a for a in args])
    assert "9 passes run, 18 already" in fourth.stdout  # that video's passes, every mode
    df = pd.read_parquet(out_dir / "results.parquet")
    assert set(df[df["qid"] == "sb/0/0"]["last_ask_time"]) == {9.0} and len(df) == len(SB_MODES) * 5
    back = eval_stream(*args)  # and back: the original question is asked again (the later tests read its rows)
    assert "9 passes run, 18 already" in back.stdout


def test_the_question_view_shows_what_the_stream_served(sb_run, dtd_server, eval_videos):
    from analysis.eval.formats import load_questions
    from analysis.eval.inspect import question_view
    from analysis.eval.runner import Mode

    _, out_dir, _ = sb_run
    df = pd.read_parquet(out_dir / "results.parquet")
    qs, _ = load_questions(FIXTURES / "streamingbench.json", "streamingbench")
    mode = Mode("dtd", "pixel", "l1", 0.05)
    for q in qs:
        if q.kind != "mc" or q.qid == "sb/4/0":
            continue
        view = question_view(q, eval_videos, dtd_server.base_url, mode)
        served = df[(df["qid"] == q.qid) & (df["mode_key"] == mode.key)].iloc[0]
        assert view.kept == served["video_tokens"], q.qid
        assert view.step_times[-1] <= q.time and len(view.frames) == 2 * len(view.step_times)


def test_ovobench_forward_probes_are_asked_at_their_times_and_scored_per_probe(dtd_server, eval_videos, tmp_path):
    run = eval_stream(
        "--format",
        "ovobench",
        "--data",
        FIXTURES / "ovo_bench.json",
        "--videos",
        eval_videos,
        "--url",
        dtd_server.base_url,
        "--modes",
        "full,dtd",
        "--criterion",
        "pixel",
        "--out",
        tmp_path,
    )
    assert LAST_LINE.match(run.stdout.strip().splitlines()[-1])
    assert "YouTube_Games/missing.mp4' not found" in run.stderr and run.stderr.count("skipped malformed entry") == 2
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(df["mode_key"].unique()) == ["dtd/pixel/l1/0.05", "full"]
    fwd = df[df["kind"] == "forward"]
    probes = {"ovo/REC/3": (3, 15.5), "ovo/SSR/4": (3, 15.0), "ovo/CRR/5": (3, 13.0)}
    assert set(fwd["qid"]) == set(probes)
    for r in fwd.to_dict("records"):
        n, last = probes[r["qid"]]
        assert r["asks"] == n and r["out_of"] == n and r["last_ask_time"] == last and r["last_frame_time"] <= last
        assert 0 <= r["points"] <= n and len(r["prediction"].split(",")) == n
    mc = df[df["kind"] == "mc"]
    assert (
        set(mc["qid"]) == {"ovo/EPM/0", "ovo/HLD/1", "ovo/OCR/2"}
        and (mc["last_frame_time"] <= mc["question_time"]).all()
    )
