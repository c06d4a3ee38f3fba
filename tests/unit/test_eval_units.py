"""The accuracy harness without a server: formats, prompts, reading replies, scoring, the play loop's
rules (with a recording stand-in for the stream client; the real server runs in test_eval_serving)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.eval import conventions as cv
from analysis.eval import runner
from analysis.eval.conventions import Reply, asks_for, follow_up, parse_letter, score, stream_start
from analysis.eval.evaluate import resolve_video
from analysis.eval.formats import Probe, Question, load_questions, option_texts, parse_clock
from analysis.eval.results import Store, headline, summarize
from analysis.eval.runner import Mode, Pass, TimeTravel, modes_grid, uniform_indices
from conftest import REPO
from vllm_plugin.client import StreamHTTPError

FIXTURES = REPO / "tests" / "fixtures" / "eval"


def test_streamingbench_fixture_is_read_and_malformed_entries_are_named():
    qs, issues = load_questions(FIXTURES / "streamingbench.json", "streamingbench")
    assert [q.qid for q in qs] == ["sb/0/0", "sb/1/0", "sb/1/1", "sb/2/0", "sb/3/0", "sb/4/0"]
    q = qs[1]
    assert (q.kind, q.time, q.answer, q.video) == ("mc", 17.0, "C", "./videos/sample_1_real.mp4")
    assert q.options[2] == "The background was replaced by a new scene."  # unlettered options kept as they are
    assert qs[0].options == ("Red.", "Blue.", "Green.", "White.")  # "A. Red." -> "Red."
    p = qs[4]
    assert (p.kind, p.time, p.gt_time, p.answer) == ("proactive", 8.0, 12.0, "changed")
    text = "\n".join(map(str, issues))
    assert "entry 5 (./videos/sample_1_real.mp4), question 0" in text and "'5 seconds' is not HH:MM:SS" in text
    assert "question 1" in text and "answer 'E' is not one of the option letters ABCD" in text
    assert "entry 6: video_path: Field required" in text
    assert len(issues) == 3


def test_ovobench_fixture_is_read_and_malformed_entries_are_named():
    qs, issues = load_questions(FIXTURES / "ovo_bench.json", "ovobench")
    by = {q.qid: q for q in qs}
    assert by["ovo/EPM/0"].answer == "C" and by["ovo/OCR/2"].time == 6.5
    rec = by["ovo/REC/3"]
    assert rec.kind == "forward" and [p.time for p in rec.probes] == [8.0, 11.0, 15.5] and rec.probes[1].expected == "5"
    assert rec.extra["activity"] == "move the red square one cell"
    ssr = by["ovo/SSR/4"]
    assert [(p.expected, p.text) for p in ssr.probes] == [
        ("Yes", "show the first scene"),
        ("No", "show the first scene"),
        ("Yes", "show the second scene"),
    ]
    assert [p.expected for p in by["ovo/CRR/5"].probes] == ["No", "No", "Yes"]
    text = "\n".join(map(str, issues))
    assert "entry 7 (id 7, task 'ATR')" in text and "gt 7 is not an index of the 4 options" in text
    assert "entry 8 (id 8, task 'REC')" in text and "needs test_info probes" in text
    assert len(issues) == 2


def test_a_file_that_is_not_json_or_not_a_list_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable JSON file"):
        load_questions(bad, "ovobench")
    bad.write_text(json.dumps({"video_path": "x"}))
    qs, issues = load_questions(bad, "streamingbench")
    assert qs == [] and "a JSON list of videos" in str(issues[0])


def test_clock_and_option_letters():
    assert parse_clock("00:03:10") == 190 and parse_clock("1:02:03") == 3723 and parse_clock("02:05.5") == 125.5
    for bad in ("3:75", "abc", "", "00:00:60"):
        with pytest.raises(ValueError):
            parse_clock(bad)
    assert option_texts(["A. x", "B. y"]) == ("x", "y") and option_texts(["(A) x", "(B) y"]) == ("x", "y")
    assert option_texts(["A.x", "B.y"]) == ("x", "y")  # StreamingBench's omni file writes some so
    # a letter out of place is text (the benchmark's prompt shows it lettered again), as are articles
    assert option_texts(["x", "y", "z", "A. w"]) == ("x", "y", "z", "A. w")
    assert option_texts(["A piece of rock.", "B"]) == ("A piece of rock.", "B")


@pytest.mark.parametrize(
    "reply,letter",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("**A**", "A"),
        ("D.", "D"),
        ("B) blue", "B"),
        ("C. Green.", "C"),
        ("A: red", "A"),
        ("The best option is B.", "B"),
        ("Answer: (D)", "D"),
        ("I think option B is right", "B"),
        ("answer is c", None),
        ("Blue.", "B"),
        ("blue", "B"),
        ("A man walks", None),
        ("", None),
        ("E", None),
        ("None of them", None),
        ("b", None),
        ("Because A", None),
        ("B\nThe airplane is flying.", "B"),
        ("B is the correct answer.", "B"),
        ("B - An airplane", "B"),
        ("Answer: **C**", "C"),
        ("The answer is **C**.", "C"),
        ("B：blue", "B"),
        ("The answer is A man walking", None),
        ("The option A is wrong; the answer is B.", "B"),
    ],
)
def test_letters_are_read_robustly_and_anything_else_is_unparsed(reply, letter):
    assert parse_letter(reply, ("Red.", "Blue.", "Green.", "White.")) == letter


def test_prompts_follow_each_benchmarks_convention():
    sb = Question("q", "streamingbench", "v", "t", "mc", 5.0, "What?", options=("x", "y", "z", "w"), answer="A")
    p = asks_for(sb)[0].prompt
    assert "Respond with only the letter (A, B, C, or D)" in p and p.endswith(
        "Options:\nA. x\nB. y\nC. z\nD. w\n\nThe best option is:"
    )
    ovo = Question("q", "ovobench", "v", "EPM", "mc", 5.0, "What?", options=("x", "y"), answer="A")
    assert "Options:\nA. x; B. y;\n\nRespond only with the letter" in asks_for(ovo)[0].prompt
    rec = Question(
        "r",
        "ovobench",
        "v",
        "REC",
        "forward",
        1.0,
        "",
        probes=(Probe(1.0, "1"), Probe(4.0, "2")),
        extra={"activity": "jump"},
    )
    asks = asks_for(rec)
    assert [a.time for a in asks] == [1.0, 4.0] and "How many times did they jump?" in asks[0].prompt
    assert [a.index for a in asks] == [0, 1]


def test_proactive_polls_every_second_until_gt_plus_4_and_a_yes_brings_the_question():
    q = Question(
        "p",
        "streamingbench",
        "v",
        "Proactive Output",
        "proactive",
        8.0,
        'When X, output "go".',
        answer="go",
        gt_time=12.0,
    )
    polls = asks_for(q)
    assert [a.time for a in polls] == [9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    assert polls[0].prompt.endswith(
        'Question: When X, output "go". Is it the right time to output "go"? You can only answer yes or no.'
        "\n\nThe answer is:\n"
    )
    assert stream_start(q) == 8.0 and cv.last_ask_time(q) == 16.0
    assert follow_up(q, Reply(10.0, "no", role="poll")) is None
    nxt = follow_up(q, Reply(11.0, "Yes.", role="poll"))
    assert (
        nxt.role == "content" and nxt.time == 11.0 and 'Question: When X, output "go".\n\nThe answer is:' in nxt.prompt
    )


def test_scoring_of_each_kind():
    mc = Question("m", "streamingbench", "v", "t", "mc", 1.0, "?", options=("a", "b", "c", "d"), answer="B")
    assert score(mc, [Reply(1.0, "B")]).score == 1.0
    v = score(mc, [Reply(1.0, "I do not know")])
    assert v.score == 0.0 and not v.parsed
    assert score(mc, [Reply(1.0, "", error="HTTP 400: too long")]).parsed is False
    pq = Question("p", "streamingbench", "v", "Proactive Output", "proactive", 8.0, "?", answer="go", gt_time=12.0)
    on_time = [Reply(9.0, "no", role="poll"), Reply(10.0, "yes", role="poll"), Reply(10.0, "go now", role="content")]
    assert score(pq, on_time).score == 1.0 and score(pq, on_time).response_time == 10.0  # within ±2 s
    early = [Reply(9.0, "yes", role="poll"), Reply(9.0, "go", role="content")]
    assert score(pq, early).score == 0.0  # 3 s early
    wrong = [Reply(12.0, "yes", role="poll"), Reply(12.0, "stop", role="content")]
    assert score(pq, wrong).score == 0.0  # on time, not the output
    silent = [Reply(t, "no", role="poll") for t in range(9, 17)]
    assert score(pq, silent).score == 0.0 and score(pq, silent).parsed
    rec = Question("r", "ovobench", "v", "REC", "forward", 1.0, "", probes=(Probe(1.0, "1"), Probe(4.0, "12")))
    v = score(rec, [Reply(1.0, "1", role="probe", index=0), Reply(4.0, "1 and 2", role="probe", index=1)])
    assert v.score == 1.0 and v.out_of == 2  # OVO-Bench joins all digits: "1 and 2" -> "12"
    ssr = Question(
        "s", "ovobench", "v", "SSR", "forward", 1.0, "", probes=(Probe(1.0, "Yes", "x"), Probe(2.0, "No", "x"))
    )
    v = score(ssr, [Reply(1.0, "Yes.", role="probe", index=0), Reply(2.0, "Maybe", role="probe", index=1)])
    assert (v.score, v.points, v.parsed, v.prediction) == (0.5, 1.0, False, "Yes,?")
    assert [cv.yes_no(r) for r in ("Y", "N", "Not yet", "yes", "Yes and No")] == [
        "Yes",
        "No",
        "No",
        None,
        None,
    ]  # OVO's reading


def test_uniform_sampling_and_the_modes_of_a_run():
    times = np.arange(20.0)
    assert uniform_indices(times, 1.0).tolist() == list(range(20))
    assert uniform_indices(times, 0.25).tolist() == [0, 4, 8, 12, 16]
    assert uniform_indices(times, 0.0).tolist() == [0]
    ms = modes_grid(["uniform"], ["pixel"], {"pixel": "l1"}, {"pixel": [0.05, 0.1]})
    assert [m.key for m in ms] == [
        "dtd/pixel/l1/0.05",
        "dtd/pixel/l1/0.1",
        "uniform/pixel/l1/0.05",
        "uniform/pixel/l1/0.1",
    ]
    assert [m.key for m in modes_grid(["full"], ["pixel"], {"pixel": "l1"}, {"pixel": [0.05]})] == ["full"]
    with pytest.raises(ValueError, match="modes must be among"):
        modes_grid(["fast"], ["pixel"], {"pixel": "l1"}, {"pixel": [0.05]})


def test_videos_are_found_under_the_folder_and_never_outside_it(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    (tmp_path.parent / "outside.mp4").write_bytes(b"x")
    assert resolve_video(tmp_path, "./videos/a.mp4") == tmp_path / "videos" / "a.mp4"
    assert resolve_video(tmp_path, "COIN/b.mp4") == tmp_path / "b.mp4"  # by base name
    assert resolve_video(tmp_path, "../outside.mp4") is None
    assert resolve_video(tmp_path, str(tmp_path.parent / "outside.mp4")) is None
    assert resolve_video(tmp_path, "missing.mp4") is None
    assert resolve_video(tmp_path, "x" * 300 + ".mp4") is None  # too long for the file system: not found


class RecordingStream:
    """Stands in for :class:`vllm_plugin.client.StreamClient` to test the play loop's rules (what is
    sent before each ask, when polling stops); it answers ``answer(prompt, time)``."""

    def __init__(self, answer, lie_about_time: float = 0.0):
        self.times: list[float] = []
        self.asked: list[tuple[float, str]] = []
        self.answer, self.lie = answer, lie_about_time
        self.full_after = float("inf")

    def push(self, frames, timestamps):
        if self.times and timestamps[-1] > self.full_after:
            raise StreamHTTPError(409, "stream is full")
        assert len(frames) == len(timestamps) and all(b > a for a, b in zip([-1.0, *self.times], timestamps))
        self.times += list(timestamps)

    def wait_prefilled(self):
        return {"temporal_patch_size": 2, "tokens_per_step": 4}

    def ask(self, prompt, max_tokens, remember):
        assert remember is False  # questions never see each other
        now = self.times[-1] if self.times else None
        self.asked.append((now, prompt))
        steps = len(self.times) // 2
        return {
            "choices": [{"message": {"content": self.answer(prompt, now)}}],
            "usage": {"prompt_tokens": 10 + 4 * steps},
            "stream_state": {
                "time": None if now is None else now + self.lie,
                "video_tokens_per_chunk": [4 * steps],
                "ttft_s": 0.01,
            },
        }

    def status(self):
        steps = len(self.times) // 2
        return {"frames": len(self.times), "kept_per_step": [4] * steps, "tokens_per_step": 4}

    def close(self):
        pass


FULL = Mode("full")


def _run(monkeypatch, questions, answer, mode=FULL, lie=0.0, n=30, full_after=float("inf")):
    made = []

    def fake_open(base_url, model=None, fps=None, **settings):
        made.append(RecordingStream(answer, lie))
        made[-1].full_after = full_after
        made[-1].fps, made[-1].settings = fps, settings
        return made[-1]

    monkeypatch.setattr(runner, "open_stream", fake_open)
    frames = np.zeros((n, 4, 4, 3), np.uint8)
    rows, totals = runner.run_pass(
        "http://x",
        "v.mp4",
        frames,
        np.arange(float(n)),
        1.0,
        questions,
        mode,
        4,
        2,
        budget=Pass("v.mp4", "dtd", n, n // 2, 4, n // 2),
    )
    return rows, totals, made


def test_only_frames_up_to_each_asks_time_are_sent_and_polling_stops_at_yes(monkeypatch):
    mc = [
        Question(f"m{t}", "streamingbench", "v.mp4", "t", "mc", float(t), "?", options=("a", "b"), answer="A")
        for t in (12, 3, 7)
    ]
    pq = Question(
        "p", "streamingbench", "v.mp4", "Proactive Output", "proactive", 10.0, "when?", answer="go", gt_time=15.0
    )
    fwd = Question("f", "ovobench", "v.mp4", "CRR", "forward", 2.0, "?", probes=(Probe(2.0, "No"), Probe(9.5, "Yes")))

    def answer(prompt, now):
        if "Is it the right time" in prompt:
            return "Yes" if now >= 4.0 else "No"  # stream-relative: 14 s into the video
        return "go" if "The answer is" in prompt else "A" if "best option" in prompt else "No"

    rows, _, made = _run(monkeypatch, mc + [pq, fwd], answer)
    from_zero, proactive = made
    # every ask saw exactly the frames at or before its time, in time order
    assert [t for t, _ in from_zero.asked] == [2.0, 3.0, 7.0, 9.0, 12.0]
    assert [t for t, _ in proactive.asked] == [1.0, 2.0, 3.0, 4.0, 4.0]  # 11..14 s, then the question at 14 s
    by = {r["qid"]: r for r in rows}
    assert [r["qid"] for r in rows] == ["m12", "m3", "m7", "p", "f"]  # the order given
    assert by["m3"]["last_frame_time"] == 3.0 and by["m3"]["correct"] and by["m3"]["mode_key"] == "full"
    assert by["p"]["asks"] == 5 and by["p"]["response_time"] == 14.0 and by["p"]["correct"]  # stopped at the yes
    assert by["p"]["last_frame_time"] == 14.0 and by["p"]["last_ask_time"] == 14.0
    assert by["f"]["asks"] == 2 and by["f"]["score"] == 0.5 and by["f"]["out_of"] == 2


def test_a_server_holding_later_frames_fails_the_run(monkeypatch):
    mc = [Question("m", "streamingbench", "v.mp4", "t", "mc", 5.0, "?", options=("a", "b"), answer="A")]
    with pytest.raises(TimeTravel, match="held a frame at 5.500 s of the video when asked at 5.000 s"):
        _run(monkeypatch, mc, lambda p, now: "A", lie=0.5)


def test_frames_the_server_refuses_make_that_streams_later_asks_errors_not_a_crash(monkeypatch):
    mc = [
        Question(f"m{t}", "streamingbench", "v.mp4", "t", "mc", float(t), "?", options=("a", "b"), answer="A")
        for t in (5, 20, 25)
    ]
    rows, _, _ = _run(monkeypatch, mc, lambda p, now: "A", full_after=10.0)
    by = {r["qid"]: r for r in rows}
    assert by["m5"]["correct"] and by["m5"]["errors"] == 0
    for q in ("m20", "m25"):
        assert (
            by[q]["errors"] == 1
            and not by[q]["correct"]
            and "frames refused: HTTP 409: stream is full" in by[q]["error"]
        )


def test_a_uniform_pass_sends_its_budgets_frames_at_the_lower_rate(monkeypatch):
    mc = [Question("m", "streamingbench", "v.mp4", "t", "mc", 29.0, "?", options=("a", "b"), answer="A")]
    rows, totals, made = _run(monkeypatch, mc, lambda p, now: "B", mode=Mode("uniform", "pixel", "l1", 0.05))
    s = made[0]
    assert s.settings == {"dtd_enabled": False} and s.times == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0]
    assert s.fps == pytest.approx(8 / 30)
    assert rows[0]["full_video_tokens"] == 15 * 4 and rows[0]["video_tokens"] == 4 * 4
    assert rows[0]["drop_ratio"] == pytest.approx(1 - 16 / 60) and not rows[0]["correct"] and rows[0]["parsed"]


def test_the_store_resumes_ignores_a_torn_line_and_summarizes_as_the_benchmarks_count(tmp_path):
    store = Store(tmp_path)
    base = {
        "benchmark": "ovobench",
        "video": "v",
        "kind": "mc",
        "criterion": None,
        "metric": None,
        "threshold": None,
        "errors": 0,
        "drop_ratio": 0.0,
        "prompt_tokens": 10,
        "video_tokens": 5,
        "ttft_s": 0.1,
        "parsed": True,
    }
    rows = [
        dict(base, qid="a", task="EPM", mode="full", mode_key="full", score=1.0, points=1.0, out_of=1, correct=True),
        dict(
            base,
            qid="b",
            task="REC",
            kind="forward",
            mode="full",
            mode_key="full",
            score=0.25,
            points=1.0,
            out_of=4,
            correct=False,
            parsed=False,
        ),
    ]
    store.add(rows, Pass("v", "full", 4, 2, 4, 8))
    with open(store.rows_path, "a") as f:
        f.write('{"qid": "torn')
    assert store.done() == {("a", "full"), ("b", "full")} and store.passes()[("v", "full")].kept_fraction == 1.0
    df = pd.DataFrame(store.rows())
    s = summarize(df, by=("task",)).set_index("task")
    assert s.loc["EPM", "accuracy"] == 1.0 and s.loc["REC", "accuracy"] == 0.25 and s.loc["REC", "unparsed"] == 1
    assert headline(df) == "questions=2 accuracy=0.4000 drop_ratio=0.0000"  # 2 points of 5 (1 question + 4 probes)
    assert math.isclose(summarize(df, by=()).iloc[0]["accuracy"], 0.4)


def test_why_frames_are_not_always_resized_ahead():
    """With min_pixels = max_pixels (TimeChat-Online's 448²), the processor's resize of an already
    resized frame can round to another size: the harness then sends frames as decoded
    (``StreamGeometry.resize_ahead``, measured per video from the server)."""
    from analysis.eval.evaluate import StreamGeometry
    from vllm_plugin.streams.session import Geometry

    g = Geometry(min_pixels=448 * 448, max_pixels=448 * 448)
    once = g.target_size(360, 640)
    assert once == (336, 588) and g.target_size(*once) != once
    assert Geometry().target_size(*Geometry().target_size(360, 640)) == Geometry().target_size(360, 640)
    assert (
        StreamGeometry(once, 252, 2, False).decode_size is None
        and StreamGeometry(once, 252, 2, True).decode_size == once
    )


def test_a_results_folder_refuses_a_run_with_other_settings(tmp_path):
    store = Store(tmp_path)
    store.check_settings({"benchmarks": ["ovobench"], "fps": 1.0, "model": "m"})
    store.check_settings({"benchmarks": ["ovobench"], "fps": 1.0, "model": "m"})  # the same run resumes
    with pytest.raises(ValueError, match=r"other settings \(fps: 1.0 there, 2.0 now\)"):
        Store(tmp_path).check_settings({"benchmarks": ["ovobench"], "fps": 2.0, "model": "m"})


def test_the_command_line_says_what_is_wrong_before_asking_anything(tmp_path, capsys):
    from analysis.cli.eval_stream import main
    from analysis.harness.server import free_port

    base = [
        "--format",
        "ovobench",
        "--data",
        str(FIXTURES / "ovo_bench.json"),
        "--videos",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(base + ["--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "no vLLM server answers at" in capsys.readouterr().err
    for bad, says in (
        (["--modes", "fast"], "modes must be among"),
        (["--criterion", "pixel", "--thresholds", "2"], "must be in [0.0, 1.0]"),
        (["--metric", "l2"], "--metric"),
        (["--fps", "0"], "--fps must be in (0, 60]"),
    ):
        with pytest.raises(SystemExit):
            main(base + ["--url", "http://x"] + bad)
        assert says in capsys.readouterr().err
    (tmp_path / "notjson.json").write_text("[")
    assert (
        main(
            [
                "--format",
                "streamingbench",
                "--data",
                str(tmp_path / "notjson.json"),
                "--videos",
                str(tmp_path),
                "--url",
                "http://x",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not a readable JSON file" in capsys.readouterr().err


def test_ovobench_aggregate_is_the_mean_of_its_category_means():
    from analysis.eval.results import ovo_scores

    def r(qid, task, points, out_of):
        return {
            "qid": qid,
            "benchmark": "ovobench",
            "task": task,
            "mode_key": "full",
            "mode": "full",
            "criterion": None,
            "metric": None,
            "threshold": None,
            "points": points,
            "out_of": out_of,
            "parsed": True,
            "errors": 0,
            "drop_ratio": 0.0,
            "prompt_tokens": 1,
            "video_tokens": 1,
            "ttft_s": 0.0,
        }

    df = pd.DataFrame(
        [
            r("a", "EPM", 1, 1),
            r("b", "EPM", 0, 1),
            r("c", "ASI", 1, 1),
            r("d", "OCR", 0, 1),
            r("e", "REC", 3, 4),
            r("f", "SSR", 1, 4),
        ]
    )
    s = ovo_scores(df).iloc[0]
    assert (s["backward"], s["realtime"], s["forward"]) == (0.75, 0.0, 0.5)  # (0.5 + 1) / 2; 0; (0.75 + 0.25) / 2
    assert s["total"] == pytest.approx(1.25 / 3)
