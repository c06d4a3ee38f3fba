"""The soak's verdict on synthetic soaks (no server): per-window re-anchor waits, failed questions
counted without crashing, each goal met / NOT met on its own, and the CLI's exit status."""

import pytest

from analysis.cli.soak_stream import build_parser, finish, table, verdict
from analysis.lib.soak import Soak, goals, last_line, play_stream, record_answer, summary, windows

PROCS = {"python[1]": 1000.0, "VLLM::EngineCore[2]": 1300.0, "VLLM::Worker[3]": 2400.0}


def _question(t, ttft=0.05, wait=0.0, during=False, **kw):
    return {
        "stream": 0,
        "time": float(t),
        "ttft_s": ttft,
        "prefilled_tokens": 40,
        "context_tokens": 500,
        "held_frames": 30,
        "evicted_frames": 0,
        "lag_s": 0.0,
        "reanchor_wait_s": wait,
        "answered_during_reanchor": during,
        **kw,
    }


def good_soak(hours=2.0):
    """``hours`` of one stream meeting every goal: a question every 10 s (TTFT 40-60 ms, none waited,
    every 7th answered during a re-anchor), a re-anchor every 5 min from 200 s, RSS that grows 20% in
    the first half (caches filling) and stays within 1% after."""
    soak = Soak()
    end = int(hours * 3600)
    for t in range(10, end + 1, 10):
        soak.questions.append(_question(t, ttft=0.04 + (t % 30) / 1500, during=t % 70 == 0))
    soak.events = [{"stream": 0, "type": "reanchor", "time": float(t), "keyframes": [0]} for t in range(200, end, 300)]
    for t in range(0, end + 1, 60):
        grow = min(t, end / 2) / (end / 2) * 0.2 + (0.005 if t % 120 else 0.0)  # then a ±0.5% wobble
        rss = {k: v * (1 + grow) for k, v in PROCS.items()}
        soak.samples.append({"time": float(t), "rss_mb": rss, "rss_total_mb": sum(rss.values()), "kv_usage": 0.0})
    return soak


def _verdict(soak, hours=2.0, window=600.0):
    lines: list[str] = []
    s = summary(soak, windows(soak, window, end_s=hours * 3600), hours)
    code = verdict(s, out=lines.append)
    met = {g["goal"].split(" ")[0]: g["met"] for g in goals(s)}  # errors / every / no / RSS
    return code, met, s, lines


def test_a_soak_meeting_every_goal_exits_0():
    code, met, s, lines = _verdict(good_soak())
    assert code == 0 and met == {"errors": True, "every": True, "no": True, "RSS": True}
    assert [ln.endswith(")") and ": met (" in ln for ln in lines if ln.startswith("goal:")] == [True] * 4
    assert s["reanchor_waits"] == 0 and s["reanchor_wait_unknown"] == 0 and s["answered_during_reanchor"] == 102
    # the whole soak's p50 over all answered questions; the goal windows start after the first re-anchor (200 s)
    assert s["ttft_p50_s"] == pytest.approx(0.04 + 10 / 1500) and s["goal_windows"] == list(range(1, 12))
    assert s["window_p95_max_ratio"] == pytest.approx((0.04 + 20 / 1500) / (0.04 + 10 / 1500))
    assert s["rss_flat_span_s"] == [3600.0, 7200.0] and s["rss_flat_max_dev"] == pytest.approx(0.005 / 1.2, rel=0.01)
    assert set(s["rss_flat_by_process"]) == set(PROCS)


def test_each_goal_violated_alone_is_not_met_and_exits_1():
    def only(met, goal):
        return {k: v for k, v in met.items() if not v} == {goal: False}

    soak = good_soak()
    soak.error("stream 0 append at t=5.0", RuntimeError("boom"))
    code, met, s, _ = _verdict(soak)
    assert code == 1 and only(met, "errors") and s["errors"] == 1

    soak = good_soak()
    soak.fail(0, 1234.0, RuntimeError("500"))  # a question that got no answer
    code, met, s, _ = _verdict(soak)
    assert code == 1 and only(met, "errors") and s["failed_questions"] == 1 and s["errors"] == 1

    soak = good_soak()  # window 5 (50-60 min): 4 of its 60 questions at 150 ms > 2 x p50
    for q in soak.questions:
        if q["time"] in (3010.0, 3020.0, 3040.0, 3050.0):
            q["ttft_s"] = 0.15
    code, met, s, lines = _verdict(soak)
    assert code == 1 and only(met, "every") and s["window_p95_max_window"] == 5
    assert s["window_p95_max_ratio"] == pytest.approx(0.15 / s["ttft_p50_s"])
    assert any("NOT met (max p95 / p50 = 3.21 (window 5: p95 150 ms" in ln for ln in lines)

    soak = good_soak()  # the same slow questions before the first re-anchor: window 0 is no goal window
    for q in soak.questions:
        if q["time"] in (10.0, 20.0, 40.0, 50.0):
            q["ttft_s"] = 0.15
    assert _verdict(soak)[0] == 0

    soak = good_soak()
    soak.questions[300]["reanchor_wait_s"] = 0.3  # one question waited 300 ms for a re-anchor's prefill
    soak.questions[400]["reanchor_wait_s"] = 0.005  # under the 10-ms floor: no wait
    code, met, s, _ = _verdict(soak)
    assert code == 1 and only(met, "no") and s["reanchor_waits"] == 1 and s["reanchor_wait_max_s"] == 0.3
    w = windows(soak, 600, end_s=7200)[5]
    assert (w["reanchor_waits"], w["reanchor_wait_sum_s"], w["reanchor_wait_max_s"]) == (1, 0.3, 0.3)
    assert "reanchor_waits=1 " in last_line(s)

    soak = good_soak()
    del soak.questions[5]["reanchor_wait_s"]  # a server that does not report it: unknown, not 0
    code, met, s, _ = _verdict(soak)
    assert code == 1 and only(met, "no") and s["reanchor_wait_unknown"] == 1

    soak = good_soak()  # the worker grows 6% in the last hour
    for x in soak.samples:
        if x["time"] > 5400:
            x["rss_mb"]["VLLM::Worker[3]"] *= 1.06
    code, met, s, _ = _verdict(soak)
    assert (
        code == 1
        and only(met, "RSS")
        and max(s["rss_flat_by_process"], key=s["rss_flat_by_process"].get) == ("VLLM::Worker[3]")
    )

    soak = good_soak(hours=1.0)  # shorter than 2 h: its second half, flat here (it grew 20% in the first)
    code, met, s, _ = _verdict(soak, hours=1.0)
    assert code == 0 and s["rss_flat_span_s"] == [1800.0, 3600.0]
    for x in soak.samples:
        if x["time"] > 2700:
            x["rss_mb"]["python[1]"] *= 1.06
    code, met, s, _ = _verdict(soak, hours=1.0)
    assert code == 1 and only(met, "RSS")


def test_rss_is_no_goal_without_samples_and_not_met_with_too_few():
    soak = good_soak()
    soak.samples = [
        {"time": float(t), "rss_mb": {}, "rss_total_mb": None, "kv_usage": None} for t in range(0, 7201, 60)
    ]
    code, met, s, lines = _verdict(soak)
    assert code == 0 and "RSS" not in met and any("RSS: not measured" in ln for ln in lines)
    soak = good_soak()
    soak.samples = [x for x in soak.samples if x["time"] < 3600 or x["time"] == 7200]  # one sample in the span
    code, met, s, _ = _verdict(soak)
    assert code == 1 and met["RSS"] is False and s["rss_flat_max_dev"] is None


def test_failed_questions_missing_fields_and_empty_windows_do_not_crash():
    soak = Soak()
    ok = {
        "usage": {"prompt_tokens": 900, "prompt_tokens_details": {"cached_tokens": 850}},
        "choices": [{"finish_reason": "length"}],
        "stream_state": {
            "ttft_s": 0.05,
            "context_tokens": 900,
            "reanchors": 1,
            "chunks": 3,
            "held_frames": 30,
            "evicted_frames": 2,
            "video_tokens_per_chunk": [100, 200],
            "reanchor_wait_s": 0.2,
            "answered_during_reanchor": False,
        },
    }
    row = record_answer(soak, 0, 10.0, ok, 0.1, 0.0)
    assert row is not None and row["prefilled_tokens"] == 50 and row["video_tokens"] == 300
    assert row["reanchor_wait_s"] == 0.2
    old = record_answer(soak, 0, 20.0, {"stream_state": {"ttft_s": 0.06}}, 0.1, 0.0)  # an older, terser server
    assert old is not None and old["reanchor_wait_s"] is None and old["answered_during_reanchor"] is False
    assert old["context_tokens"] is None and old["prefilled_tokens"] is None
    none = {"choices": [{"finish_reason": "stop"}], "stream_state": {"ttft_s": None}}
    assert record_answer(soak, 0, 30.0, none, 0.1, 0.0) is None
    assert record_answer(soak, 0, 40.0, {"error": "x"}, 0.1, 0.0) is None  # no stream_state
    assert record_answer(soak, 0, 50.0, None, 0.1, 0.0) is None
    odd = {
        "usage": {"prompt_tokens_details": None},
        "stream_state": {"ttft_s": 0.07, "video_tokens_per_chunk": [1, None]},
    }
    assert record_answer(soak, 0, 25.0, odd, 0.1, 0.0)["video_tokens"] is None  # malformed fields: None, no raise
    soak.questions.append({"stream": 0, "time": 60.0, "ttft_s": None})  # a row from elsewhere: failed
    assert len(soak.questions) == 4 and len(soak.failed) == 3 and len(soak.errors) == 3
    wins = windows(soak, 30, end_s=120)  # 0-30 s: 3 answered, 1 failed; 30-60 s: 3 failed; 60-120 s: empty
    assert [(w["questions"], w["failed"]) for w in wins] == [(3, 1), (0, 3), (0, 0), (0, 0)]
    assert "ttft_p95_ms" not in wins[1] and wins[0]["context_max"] == 900 and wins[0]["reanchor_wait_unknown"] == 2
    s = summary(soak, wins, 120 / 3600)
    assert s["questions"] == 3 and s["failed_questions"] == 4 and s["errors"] == 4
    lines = table(wins)
    assert len(lines) == 5 and lines[2].split()[1:4] == ["0", "3", "-"]
    assert verdict(s, out=lambda _: None) == 1
    fields = dict(kv.split("=") for kv in last_line(s).split())
    assert fields["reanchor_waits"] == "1" and fields["questions"] == "3"


def test_a_soak_without_questions_is_not_met_and_does_not_crash():
    soak = Soak()
    assert windows(soak, 600) == []
    wins = windows(soak, 600, end_s=3600)
    assert [w["questions"] for w in wins] == [0] * 6
    s = summary(soak, wins, 1.0)
    assert s["window_p95_max_ratio"] is None and s["ttft_p50_s"] is None
    lines: list[str] = []
    assert verdict(s, out=lines.append) == 1
    assert last_line(s) == (
        "hours=1 questions=0 errors=0 ttft_p95_first=nan ttft_p95_last=nan rss_growth_mb=nan "
        "reanchor_waits=0 window_p95_max_ratio=nan"
    )
    assert len(table(wins)) == 7


def _args(tmp_path, hours):
    return build_parser().parse_args(["--hours", str(hours), "--out", str(tmp_path), "--window", "600"])


def test_the_cli_exits_with_the_verdict_and_reports_the_waits_offline(tmp_path, capsys):
    import csv
    import json

    assert finish(good_soak(), _args(tmp_path / "good", 2), {}) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert list(dict(kv.split("=") for kv in out[-1].split())) == [
        "hours",
        "questions",
        "errors",
        "ttft_p95_first",
        "ttft_p95_last",
        "rss_growth_mb",
        "reanchor_waits",
        "window_p95_max_ratio",
    ]
    bad = good_soak()
    bad.questions[700]["reanchor_wait_s"] = 0.4
    bad.questions[701]["ttft_s"] = None  # failed, counted
    assert finish(bad, _args(tmp_path / "bad", 2), {}) == 1
    out = capsys.readouterr().out
    assert "goal: no question waits for a re-anchor's prefill: NOT met (1 waited" in out
    assert "reanchor_waits=1 " in out.strip().splitlines()[-1]
    rows = list(csv.DictReader((tmp_path / "bad" / "windows.csv").read_text().splitlines()))
    assert (rows[11]["reanchor_waits"], rows[11]["reanchor_wait_max_s"], rows[11]["failed"]) == ("1", "0.4", "1")
    assert json.loads((tmp_path / "bad" / "soak.json").read_text())["summary"]["failed_questions"] == 1
    html = (tmp_path / "bad" / "soak.html").read_text()
    assert "questions that waited for a re-anchor" in html and "waited for a re-anchor" in html
    assert '<script src="plotly.min.js">' in html and "cdn" not in html.lower()  # offline
    assert finish(Soak(), _args(tmp_path / "empty", 0.1), {}) == 1  # nothing answered: a report, exit 1


class _FakeStream:
    """A stream client whose questions fail in turn: raise, no token, no stream_state, answer."""

    def __init__(self):
        self.asked = 0

    def push_encoded(self, images, stamps):
        return {}

    def ask(self, question, max_tokens):
        self.asked += 1
        kind = self.asked % 4
        if kind == 1:
            raise RuntimeError("HTTP 500")
        if kind == 2:
            return {"choices": [{"finish_reason": "stop"}], "stream_state": {"ttft_s": None}}
        if kind == 3:
            return {"choices": []}
        return {"usage": {"prompt_tokens": 10}, "stream_state": {"ttft_s": 0.01, "reanchor_wait_s": 0.0}}

    def events(self):
        return [{"type": "reanchor", "time": 5.0}, {"type": "kept"}]

    def close(self):
        pass


def test_play_stream_counts_failed_questions_and_goes_on(monkeypatch):
    import time

    import vllm_plugin.client

    monkeypatch.setattr(vllm_plugin.client, "open_stream", lambda *a, **k: _FakeStream())
    soak = Soak()
    play_stream("http://127.0.0.1:1", 0, ["x"], 1.0, 81, 1e6, time.monotonic(), 10, 1, {}, soak, "q", 4)
    assert [f["time"] for f in soak.failed] == [10.0, 20.0, 30.0, 50.0, 60.0, 70.0] and len(soak.errors) == 6
    assert [q["time"] for q in soak.questions] == [40.0, 80.0] and soak.progress == {0: 80.0}
    assert all(q["reanchor_wait_s"] == 0.0 for q in soak.questions)
