"""The capacity benchmark without a server: the ramp finds the exact capacity in few steps, the SLO
verdict fails for each of its reasons, the last line parses back, the report renders offline, and
the stream drivers count failures instead of crashing (fake clients)."""

import json
import math
import time

import pytest

from analysis.lib import capacity as lib
from analysis.lib.soak import Soak, play_stream
from vllm_plugin.client import StreamHTTPError

# ------------------------------------------------------------------------------------------------- the ramp


def _ramp(cap, max_n):
    calls = []

    def holds(n):
        calls.append(n)
        return n <= cap

    return lib.ramp(holds, max_n), calls


@pytest.mark.parametrize("max_n", [1, 2, 3, 7, 8, 32, 100])
def test_the_ramp_finds_the_true_capacity_exactly_in_few_steps(max_n):
    budget = 2 * math.ceil(math.log2(max_n)) + 2 if max_n > 1 else 1
    for cap in range(0, max_n + 3):
        r, calls = _ramp(cap, max_n)
        assert r.capacity == min(cap, max_n), (cap, max_n, r)
        assert r.bounded == (cap >= max_n)
        assert len(calls) == len(set(calls)) <= budget, (cap, max_n, calls)  # each N once, few steps
        assert [n for n, _ in r.tried] == calls and all(ok == (n <= cap) for n, ok in r.tried)
        assert max(calls) <= max_n


def test_the_ramp_doubles_then_bisects():
    assert _ramp(5, 32)[1] == [1, 2, 4, 8, 6, 5]
    assert _ramp(0, 32)[1] == [1]
    assert _ramp(40, 20)[1] == [1, 2, 4, 8, 16, 20]  # the last doubling is cut to the bound
    assert _ramp(17, 20)[1] == [1, 2, 4, 8, 16, 20, 18, 17]
    with pytest.raises(ValueError):
        lib.ramp(lambda n: True, 0)


@pytest.mark.parametrize("seed", range(20))
def test_the_capacity_read_back_from_the_rows_is_the_ramps_even_when_noisy(seed):
    import random

    rng = random.Random(seed)
    verdicts = {n: rng.random() < 0.7 for n in range(1, 65)}  # not monotone: a noisy server
    rows = []

    def holds(n):
        rows.append({"clip": "c", "mode": "dtd-eager", "streams": n, "passed": verdicts[n]})
        return verdicts[n]

    r = lib.ramp(holds, 64)
    assert lib.capacity_of(rows) == r.capacity and len(rows) == len(r.tried)


def test_question_schedule_and_windows():
    phases = lib.question_phases(8, 10.0, 1.0, seed=3, step=8)
    assert phases == lib.question_phases(8, 10.0, 1.0, seed=3, step=8)  # seeded: the same for every mode
    assert phases != lib.question_phases(8, 10.0, 1.0, seed=4, step=8)
    assert all(1.0 <= p <= 11.0 for p in phases) and len(set(phases)) == 8
    assert lib.question_times(2.5, 10.0, 30.0) == [2.5, 12.5, 22.5]
    assert lib.frame_at(2.5, 1.0) == 3 and lib.frame_at(3.0, 1.0) == 3 and lib.frame_at(0.2, 1.0) == 1
    # a full, even window of the looped clip whatever the end; it depends on the end modulo the clip's length
    assert lib.window_frames(1, 5, 10) == (8, 9, 0, 1)
    assert lib.window_frames(13, 4, 10) == lib.window_frames(3, 4, 10) == (0, 1, 2, 3)
    assert lib.window_frames(4, 1, 10) == (3, 4)
    assert {len(lib.window_frames(e, 30, 7)) for e in range(50)} == {30}
    assert len({lib.window_frames(e, 30, 7) for e in range(50)}) == 7


# ---------------------------------------------------------------------------------------------- the verdict


def _good(**kw):
    base = dict(
        streams=4,
        wall_s=30.0,
        ttft_s=[0.1 + i / 1000 for i in range(40)],
        e2e_s=[0.2] * 40,
        lag_s=[0.0, 0.5, 1.2],
        append_status=[200] * 120,
        opened=4,
        frames=120,
    )
    return lib.StepSamples(**{**base, **kw})


def test_the_verdict_holds_on_good_samples_and_at_its_limits():
    assert lib.verdict(_good(), 500, 10.0) == lib.Verdict(True, [])
    # exactly at the SLO and exactly one ask interval late: held
    assert lib.verdict(_good(ttft_s=[0.5] * 10, lag_s=[10.0]), 500, 10.0).passed
    # p95, not the max: one slow question of 20 is allowed, two are not
    assert lib.verdict(_good(ttft_s=[0.1] * 19 + [2.0]), 500, 10.0).passed
    assert not lib.verdict(_good(ttft_s=[0.1] * 18 + [2.0] * 2), 500, 10.0).passed


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(ttft_s=[0.6] * 10), "TTFT p95 600 ms > 500 ms"),
        (dict(ttft_s=[]), "no question answered"),
        (dict(lag_s=[0.0, 10.5]), "fell 10.5 s behind real time"),
        (dict(append_status=[200] * 10 + [429, 429]), "2 appends refused with 429"),
        (dict(append_status=[200, 503]), "1 appends failed with 5xx"),
        (dict(append_status=[200, "ConnectionError", 409]), "2 appends failed otherwise"),
        (dict(failed_questions=3), "3 questions failed"),
        (dict(opened=3), "1 of 4 streams did not open"),
    ],
)
def test_each_reason_fails_the_verdict_and_is_named(change, reason):
    v = lib.verdict(_good(**change), 500, 10.0)
    assert not v.passed
    assert len(v.reasons) == 1 and v.reasons[0].startswith(reason), v.reasons


def test_every_reason_is_reported_together():
    v = lib.verdict(_good(ttft_s=[], lag_s=[30.0], append_status=[429, 500], failed_questions=1, opened=0), 500, 10)
    assert len(v.reasons) == 6 and not v.passed


def test_a_row_aggregates_the_samples_and_the_server_side():
    s = _good(append_status=[200] * 10 + [429], frames=60, errors=["e1", "e2", "e3", "e4"])
    v = lib.verdict(s, 500, 10.0)
    server = {"prompt_tokens": 3000.0, "cached_tokens": 1200.0, "kv_usage_peak": 0.4, "api_cpu_percent": 55.0}
    row = lib.aggregate("clip", "dtd-eager", s, v, server)
    assert row["ttft_p50_ms"] == pytest.approx(119.5) and row["ttft_p95_ms"] == pytest.approx(137.0)
    assert row["frames_per_s"] == 2.0 and row["prompt_tokens_per_s"] == 100.0 and row["prefill_tokens_per_s"] == 60.0
    assert (row["http_429"], row["http_5xx"], row["appends"], row["errors"]) == (1, 0, 11, 4)
    assert row["error_samples"] == ["e1", "e2", "e3"] and row["ttft_source"] == "server"
    assert row["passed"] is False and row["reasons"] == ["1 appends refused with 429"]
    assert lib.aggregate("clip", "resend", _good(), v, {})["ttft_source"] == "client"


def test_api_server_processes_and_their_cpu():
    procs = [(2, "VLLM::EngineCore"), (3, "VLLM::Worker_0"), (4, "VLLM::ApiServer_0 python"), (5, "APIServer_DPRank_1")]
    assert lib.api_server_pids(1, procs) == [1, 4, 5]
    assert lib.cpu_percent({1: 10.0, 4: 5.0}, {1: 13.0, 4: 6.0, 9: 1.0}, 10.0) == pytest.approx(50.0)
    assert lib.cpu_percent({}, {}, 10.0) is None


# ------------------------------------------------------------------------------------- summary and last line


def _rows(clip, caps, max_n=32, p95=120.0):
    rows = []
    for mode, cap in caps.items():
        for n, ok in lib.ramp(lambda n, cap=cap: n <= cap, max_n).tried:
            rows.append({"clip": clip, "mode": mode, "streams": n, "passed": ok, "ttft_p95_ms": p95 + n, "reasons": []})
    return rows


@pytest.mark.parametrize(
    "clip, caps, expected, met",
    [
        ("videollava_ui_screenrec", {"dtd-eager": 9, "resend": 2}, (9, 2, 4.5, 129), True),
        ("videollava_ui_screenrec", {"dtd-eager": 6, "resend": 2}, (6, 2, 3.0, 126), False),
        ("moviepy_airplane", {"dtd-eager": 6, "resend": 3}, (6, 3, 2.0, 126), True),
        ("moviepy_airplane", {"dtd-eager": 3, "resend": 0}, (3, 0, math.inf, 123), True),
        ("moviepy_airplane", {"dtd-eager": 0, "resend": 0}, (0, 0, math.nan, math.nan), False),
        ("moviepy_airplane", {"dtd-eager": 4}, (4, math.nan, math.nan, 124), None),
    ],
)
def test_the_last_line_parses_back(clip, caps, expected, met):
    s = lib.clip_summary(clip, _rows(clip, caps), 32)
    assert s["met"] is met
    line = lib.last_line(s)
    got = lib.parse_last_line(line)
    assert list(got) == ["capacity_dtd", "capacity_resend", "capacity_ratio", "ttft_p95_ms_at_capacity"]
    for g, e in zip(got.values(), expected):
        assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e), (line, expected)
    assert lib.clip_line(s).startswith(f"{clip}: {line} goal capacity_ratio >= {lib.goal_for(clip):g}: ")
    if caps.get("resend") == 0 and caps["dtd-eager"]:
        assert "capacity_ratio=inf" in line and "re-send holds 0 streams" in lib.clip_line(s)


def test_the_last_line_reports_the_clip_furthest_below_its_goal():
    rows = _rows("videollava_ui_screenrec", {"dtd-eager": 8, "resend": 2}) + _rows(
        "sam2_02_cups", {"dtd-eager": 3, "resend": 2}
    )
    summaries = [lib.clip_summary(c, rows, 32) for c in ("videollava_ui_screenrec", "sam2_02_cups")]
    assert [s["met"] for s in summaries] == [True, False]
    assert lib.headline(summaries)["clip"] == "sam2_02_cups"
    assert lib.parse_last_line(lib.last_line(lib.headline(summaries)))["capacity_ratio"] == 1.5
    for bad in ("capacity_dtd=3", "capacity_dtd=1 capacity_resend=1 capacity_ratio=x ttft_p95_ms_at_capacity=1"):
        with pytest.raises(ValueError):
            lib.parse_last_line(bad)
    bounded = lib.clip_summary("c", _rows("c", {"dtd-eager": 50, "resend": 1}, max_n=8), 8)
    assert bounded["capacity_dtd"] == 8 and any("--max-streams 8" in n for n in bounded["notes"])


# ---------------------------------------------------------------------------------------------- the report


def test_the_report_renders_offline_with_strict_json_and_a_csv_row_per_step(tmp_path):
    import csv
    import re

    from analysis.harness.browser import assert_offline_source

    rows = _rows("videollava_ui_screenrec", {"dtd-eager": 5, "resend": 0, "resend-dtd": 1})
    summaries = [lib.clip_summary("videollava_ui_screenrec", rows, 32)]
    paths = lib.write_results(tmp_path, {"rows": rows, "summaries": summaries}, 500.0)
    page = paths["html"].read_text()
    assert_offline_source(page)
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "<script src" not in page  # plotly.js inline: one self-contained file
    assert "dtd-eager" in page and "resend-dtd" in page and "SLO 500 ms" in page
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["summaries"][0]["capacity_ratio"] == "inf"
    csv_rows = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert [(r["mode"], int(r["streams"])) for r in csv_rows] == [(r["mode"], r["streams"]) for r in rows]


# ------------------------------------------------------------------------------- the drivers, fake clients


class _FakeStream:
    """A stream client: every third append is refused with a 429, answers come with a server TTFT."""

    def __init__(self):
        self.pushed, self.attrs, self.asked = 0, {}, []

    def __setattr__(self, name, value):
        if name in ("retries", "timeout"):
            self.attrs[name] = value
        object.__setattr__(self, name, value)

    def push_encoded(self, images, stamps):
        self.pushed += 1
        if self.pushed % 3 == 0:
            raise StreamHTTPError(429, "the vision tower is behind")
        return {}

    def ask(self, question, max_tokens):
        self.asked.append(question)
        return {"usage": {"prompt_tokens": 10}, "stream_state": {"ttft_s": 0.02}}

    def events(self):
        return []

    def close(self):
        pass


def test_play_stream_phase_deadline_client_settings_and_append_records(monkeypatch):
    import vllm_plugin.client

    opened: list[_FakeStream] = []
    monkeypatch.setattr(vllm_plugin.client, "open_stream", lambda *a, **k: opened.append(_FakeStream()) or opened[-1])
    soak, appends = Soak(), []
    t0 = time.monotonic()
    play_stream(
        "http://127.0.0.1:1",
        0,
        ["x"],
        1.0,
        40,
        1e6,
        t0,
        10,
        1,
        {},
        soak,
        "q",
        4,
        first_question=3.5,
        client={"retries": 0, "timeout": 7.0},
        appends=appends,
    )
    assert opened[0].attrs == {"retries": 0, "timeout": 7.0}
    assert [a["status"] for a in appends] == [200, 200, 429] * 13 + [200]
    assert all(a["frames"] == 1 and a["lag_s"] >= 0 for a in appends)
    # questions after the first append at or past 3.5 s of stream time, then every 10 s (a refused append skips)
    assert [q["time"] for q in soak.questions] == [4.0, 15.0, 24.0, 34.0]
    assert len(soak.errors) == 13 and "HTTP 429" in soak.errors[0]
    # a deadline already passed: nothing is sent
    soak2, appends2 = Soak(), []
    play_stream("u", 1, ["x"], 1.0, 40, 1.0, t0, 10, 1, {}, soak2, "q", 4, deadline=t0, appends=appends2)
    assert appends2 == [] and soak2.questions == []
    # without the new arguments: as before (first question at ask_every, the client's own retries)
    soak3 = Soak()
    play_stream("u", 2, ["x"], 1.0, 25, 1e6, t0, 10, 1, {}, soak3, "q", 4)
    assert [q["time"] for q in soak3.questions] == [10.0, 21.0] and opened[-1].attrs == {}


def _args(**kw):
    from analysis.cli.capacity import build_parser

    args = build_parser().parse_args([])
    args.step_seconds, args.max_streams = 2.0, 2
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_a_resend_step_counts_failed_questions_and_lateness(monkeypatch, tmp_path):
    import analysis.cli.bench
    from analysis.cli import capacity as cli

    calls = []

    def fake_request(url, model, video, max_tokens, question, timeout):
        calls.append(video)
        if len(calls) % 4 == 0:
            raise ConnectionError("refused")
        if len(calls) % 4 == 1:
            return {"status": 500, "error": "engine"}
        return {"status": 200, "ttft_s": 0.05, "e2e_s": 0.06, "prompt_tokens": 100}

    monkeypatch.setattr(analysis.cli.bench, "one_request", fake_request)
    clip = cli.Clip("c", ["a"] * 5)
    clip.windows = {lib.window_frames(e, 4, 5): tmp_path / f"w{e}.mp4" for e in range(5)}
    args = _args(speed=10.0, ask_every=2.0, window=4.0)
    samples, server = cli.resend_step("http://127.0.0.1:1", None, "m", clip, "resend", 2, args)
    # 2 streams x 20 s of stream time at 10x: a question every 2 s from each stream's phase
    asked = sum(len(lib.question_times(p, 2.0, 20.0)) for p in lib.question_phases(2, 2.0, 1.0, 0, 2))
    failed = sum(i % 4 in (0, 1) for i in range(1, asked + 1))  # every 4th raised, every 4th + 1 a 500
    assert len(calls) == asked >= 18 and set(calls) <= set(clip.windows.values())
    assert samples.failed_questions == len(samples.errors) == failed and len(samples.ttft_s) == asked - failed
    assert samples.frames == (asked - failed) * 4 and len(samples.lag_s) == asked and samples.opened is None
    v = lib.verdict(samples, 500, 10.0)
    assert v.reasons == [f"{failed} questions failed"]
    assert server["api_cpu_percent"] is None and server["kv_usage_peak"] is None  # no server here: unknown


def test_a_live_step_records_appends_and_counts_429s(monkeypatch):
    import vllm_plugin.client
    from analysis.cli import capacity as cli

    monkeypatch.setattr(vllm_plugin.client, "open_stream", lambda *a, **k: _FakeStream())
    args = _args(speed=20.0, ask_every=5.0)
    samples, _ = cli.live_step("http://127.0.0.1:1", None, cli.Clip("c", ["a"] * 3), "dtd-eager", 2, args)
    assert samples.opened == 2 and len(samples.append_status) == 80
    assert samples.append_status.count(429) == 26 and samples.frames == 54
    assert samples.ttft_s and set(samples.ttft_s) == {0.02}
    v = lib.verdict(samples, 500, args.ask_every / args.speed)
    assert not v.passed and "26 appends refused with 429" in v.reasons


def test_the_cli_refuses_bad_arguments_before_starting_anything():
    from analysis.cli.capacity import build_parser, main

    for bad in (["--speed", "0"], ["--max-streams", "0"], ["--modes", "nope"], ["--video", "/no/such.mp4"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    assert build_parser().parse_args(["--quick"]).quick


class _FakeServer:
    """Stands in for VLLMServer: records how it was started, serves nothing."""

    started: list[tuple[str, list[str], dict]] = []

    def __init__(self, model, extra_args=(), module="", env=None, log_path=None, **kw):
        self.model, self.base_url, self.proc = str(model), "http://127.0.0.1:1", None
        _FakeServer.started.append((module, list(extra_args), dict(env or {})))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("resend_cap, code", [(1, 0), (2, 1), (0, 0)])
def test_the_cli_runs_each_server_once_and_exits_with_the_goal(monkeypatch, tmp_path, capsys, resend_cap, code):
    """The whole CLI with the servers and the steps faked: DTD holds 5 streams, re-send ``resend_cap``."""
    import numpy as np

    import analysis.harness.server
    from analysis.cli import capacity as cli
    from analysis.lib.video import write_video

    clip = write_video(tmp_path / "videollava_ui_screenrec.mp4", np.zeros((4, 64, 64, 3), np.uint8), 1.0)
    _FakeServer.started = []
    monkeypatch.setattr(analysis.harness.server, "VLLMServer", _FakeServer)
    monkeypatch.setattr(cli, "model_from_arguments", lambda ap, args: tmp_path / "model")
    monkeypatch.setattr(cli, "warm_up", lambda *a: None)
    monkeypatch.setattr(cli, "wait_idle", lambda url: None)

    def step(cap):
        def run(*a):
            n = a[-2]
            ttft = [0.1] * 10 if n <= cap else [0.9] * 10
            return lib.StepSamples(streams=n, wall_s=8.0, ttft_s=ttft, e2e_s=ttft, frames=8 * n), {}

        return run

    monkeypatch.setattr(cli, "live_step", step(5))
    monkeypatch.setattr(cli, "resend_step", step(resend_cap))
    argv = ["--video", str(clip), "--modes", "dtd-eager", "resend", "dtd-lazy", "--max-streams", "8"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == code
    out = capsys.readouterr().out.strip().splitlines()
    assert [(m, "--dtd-streams" in a, "--enable-prefix-caching" in a) for m, a, _ in _FakeServer.started] == [
        ("vllm_plugin.serve", True, True),  # dtd-eager and dtd-lazy on one DTD server start
        ("vllm.entrypoints.openai.api_server", False, True),  # resend: stock vLLM
    ]
    assert _FakeServer.started[0][2] == {"DTD_STREAM_MAX_STREAMS": "10"}
    expected_ratio = math.inf if resend_cap == 0 else 5 / resend_cap
    assert lib.parse_last_line(out[-1]) == {
        "capacity_dtd": 5.0,
        "capacity_resend": float(resend_cap),
        "capacity_ratio": pytest.approx(round(expected_ratio, 2)),
        "ttft_p95_ms_at_capacity": 100.0,
    }
    assert ("NOT met" in "\n".join(out)) == (code == 1)
    if resend_cap == 0:
        assert "capacity_ratio is printed as inf" in out[-2]
    data = json.loads((tmp_path / "out" / "capacity.json").read_text())
    assert {(r["mode"], r["streams"]) for r in data["rows"]} == {
        (m, n) for m, ramp in data["ramps"]["videollava_ui_screenrec"].items() for n, _ in ramp["tried"]
    }
    assert data["summaries"][0]["capacity"] == {"dtd-eager": 5, "dtd-lazy": 5, "resend": resend_cap}
