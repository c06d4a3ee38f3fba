"""The benchmarks' question files, read into :class:`Question` s (pydantic checks every entry).

* StreamingBench (``src/data/*.json``): a list of videos ``{video_path, questions: [{task_type,
  question, time_stamp "HH:MM:SS", options, answer}]}``; proactive-output items carry
  ``ground_truth_time_stamp`` and ``ground_truth_output`` instead of options and answer.
* OVO-Bench (``ovo_bench_new.json``): a list of items ``{id, task, video, ...}``: backward and
  real-time tasks with ``question``, ``options``, ``gt`` (index of the right option) and ``realtime``
  (seconds); forward-active tasks (REC, SSR, CRR) with ``test_info``: the probes, each at a
  ``realtime``.

A malformed entry does not stop the others: :func:`load_questions` returns it as a
:class:`FormatIssue` naming the file, the entry and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMATS = ("streamingbench", "ovobench")
LETTERS = "ABCDEFGHIJ"
KINDS = ("mc", "proactive", "forward")

# OVO-Bench's task groups (its paper: backward tracing, real-time perception, forward active responding)
OVO_BACKWARD = ("EPM", "ASI", "HLD")
OVO_REALTIME = ("STU", "OJR", "ATR", "ACR", "OCR", "FPD")
OVO_FORWARD = ("REC", "SSR", "CRR")


@dataclass(frozen=True)
class Probe:
    """One forward-active probe of OVO-Bench: asked at ``time``; ``expected``: the answer that scores
    (``"Yes"``/``"No"`` for SSR and CRR, the count as text for REC); ``text``: what the probe asks about
    (SSR's step)."""

    time: float
    expected: str
    text: str = ""


@dataclass(frozen=True)
class Question:
    """One benchmark question. ``time``: seconds into the video at which it is asked (the last frame
    it may see); ``kind``: ``mc`` (multiple choice), ``proactive`` (StreamingBench proactive output:
    polled from ``time`` to ``gt_time`` + the tolerance) or ``forward`` (OVO-Bench probes)."""

    qid: str
    benchmark: str
    video: str
    task: str
    kind: str
    time: float
    question: str
    options: tuple[str, ...] = ()
    answer: str = ""  # mc: the right letter; proactive: the ground-truth output
    gt_time: float | None = None  # proactive: when the answer is due
    probes: tuple[Probe, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)  # what a convention needs besides (OVO: the activity)

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def end_time(self) -> float:
        """The latest frame time any of its asks needs."""
        from analysis.eval.conventions import last_ask_time

        return last_ask_time(self)


@dataclass(frozen=True)
class FormatIssue:
    """A malformed entry: ``where`` names it (file, entry index, video, question index)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


_TIME = re.compile(r"^(?:(\d{1,3}):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")
MAX_TIME_S = 24 * 3600.0  # a question or probe time beyond a day is an error in the file, not a video
MAX_PROACTIVE_WINDOW_S = 600.0  # StreamingBench's windows span 0-44 s: polls once a second up to this


def parse_clock(value: str) -> float:
    """``"HH:MM:SS"`` (or ``"MM:SS"``, seconds may have decimals) → seconds."""
    m = _TIME.match(str(value).strip())
    if not m:
        raise ValueError(f"time {value!r} is not HH:MM:SS")
    h, mnt, s = int(m.group(1) or 0), int(m.group(2)), float(m.group(3))
    if mnt >= 60 or s >= 60:
        raise ValueError(f"time {value!r} is not HH:MM:SS")
    return check_time(h * 3600 + mnt * 60 + s, repr(value))


def check_time(t: float, what: str = "time") -> float:
    """A time in seconds a question may be asked at: finite, ≥ 0, within :data:`MAX_TIME_S`."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= MAX_TIME_S:
        raise ValueError(f"{what} must be a time in seconds within [0, {MAX_TIME_S:.0f}], got {t!r}")
    return float(t)


def option_texts(options: list[str]) -> tuple[str, ...]:
    """Options without their own letters: option i loses a leading ``"<letter i>."``, ``"<letter i>)"``
    or ``"(<letter i>)"`` (``["A. red", "B.blue"]`` → ``("red", "blue")``); anything else stays as
    written (the benchmarks' files hold a few options lettered out of place: they are shown as
    the benchmark's own prompt shows them, lettered again)."""
    out = []
    for i, o in enumerate(options):
        m = re.match(rf"^\s*(?:\({LETTERS[i]}\)|{LETTERS[i]}[.)])\s*", o) if i < len(LETTERS) else None
        out.append(o[m.end() :].strip() if m else o.strip())
    return tuple(out)


SB_SHOWN_OPTIONS = 4  # StreamingBench's prompt has four option slots: later options are never shown


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)


class SBQuestion(_Entry):
    task_type: str = Field(min_length=1)
    question: str = Field(min_length=1)
    time_stamp: str
    options: list[str] | None = None
    answer: str | None = None
    ground_truth_time_stamp: str | None = None
    ground_truth_output: str | None = None

    @field_validator("time_stamp", "ground_truth_time_stamp")
    @classmethod
    def _clock(cls, v):
        if v is not None:
            parse_clock(v)
        return v

    @property
    def proactive(self) -> bool:
        return self.ground_truth_time_stamp is not None or "proactive" in self.task_type.lower()

    @model_validator(mode="after")
    def _kind(self):
        if self.proactive:
            if self.ground_truth_time_stamp is None or not self.ground_truth_output:
                raise ValueError("a proactive-output item needs ground_truth_time_stamp and ground_truth_output")
            window = parse_clock(self.ground_truth_time_stamp) - parse_clock(self.time_stamp)
            if window < 0:
                raise ValueError("ground_truth_time_stamp is before time_stamp")
            if window > MAX_PROACTIVE_WINDOW_S:
                raise ValueError(
                    f"ground_truth_time_stamp is {window:.0f} s after time_stamp: more than the "
                    f"{MAX_PROACTIVE_WINDOW_S:.0f} s of polls allowed"
                )
        else:
            if not self.options or len(self.options) < 2:
                raise ValueError("a multiple-choice item needs at least two options")
            shown = min(len(self.options), SB_SHOWN_OPTIONS)
            letter = (self.answer or "").strip().strip("().").upper()
            if len(letter) != 1 or letter not in LETTERS[:shown]:
                raise ValueError(
                    f"answer {self.answer!r} is not one of the option letters {LETTERS[:shown]}"
                    + (
                        f" (StreamingBench's prompt shows the first {SB_SHOWN_OPTIONS} options)"
                        if len(self.options) > SB_SHOWN_OPTIONS
                        else ""
                    )
                )
        return self


class SBVideo(_Entry):
    video_path: str = Field(min_length=1)
    questions: list[Any]


class OVOItem(_Entry):
    id: int | str
    task: str = Field(min_length=1)
    video: str = Field(min_length=1)
    question: str | None = None
    options: list[str] | None = None
    gt: int | None = None
    realtime: float | None = Field(None, ge=0, allow_inf_nan=False)
    test_info: list[dict[str, Any]] | None = None
    activity: str | None = None
    answer: str | None = None

    @model_validator(mode="after")
    def _kind(self):
        if self.task in OVO_FORWARD:
            if not self.test_info:
                raise ValueError(f"a forward task ({self.task}) needs test_info probes")
            for i, p in enumerate(self.test_info):
                check_time(p.get("realtime"), f"test_info[{i}].realtime")
                for need in {"REC": ("count",), "SSR": ("type", "step"), "CRR": ("type",)}[self.task]:
                    if need not in p:
                        raise ValueError(f"test_info[{i}] of {self.task} needs {need!r}")
                if "type" in p and p["type"] not in (0, 1):
                    raise ValueError(f"test_info[{i}]: type must be 0 or 1, got {p['type']!r}")
            if self.task == "REC" and not self.activity:
                raise ValueError("REC needs the activity it counts")
            if self.task == "CRR" and not self.question:
                raise ValueError("CRR needs its question")
        else:
            if (
                self.question is None
                or not self.options
                or len(self.options) < 2
                or self.gt is None
                or self.realtime is None
            ):
                raise ValueError(f"a {self.task} item needs question, options (≥ 2), gt and realtime")
            check_time(self.realtime, "realtime")
            if len(self.options) > len(LETTERS):
                raise ValueError(f"at most {len(LETTERS)} options")
            if not 0 <= self.gt < len(self.options):
                raise ValueError(f"gt {self.gt} is not an index of the {len(self.options)} options")
        return self


def _issue(where: str, e: Exception) -> FormatIssue:
    if isinstance(e, ValidationError):
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'entry'}: {err['msg']}" for err in e.errors())
    else:
        msg = str(e)
    return FormatIssue(where, msg)


def _streamingbench(data: Any, name: str) -> tuple[list[Question], list[FormatIssue]]:
    if not isinstance(data, list):
        return [], [FormatIssue(name, "a StreamingBench file is a JSON list of videos")]
    out, issues = [], []
    for vi, raw in enumerate(data):
        if isinstance(raw, list):
            issues.append(
                FormatIssue(
                    f"{name}: entry {vi}",
                    "a list of videos inside the list (StreamingBench's "
                    "sequential-QA file) is not supported: its questions build on earlier answers",
                )
            )
            continue
        try:
            v = SBVideo.model_validate(raw)
        except ValidationError as e:
            issues.append(_issue(f"{name}: entry {vi}", e))
            continue
        for qi, rq in enumerate(v.questions):
            where = f"{name}: entry {vi} ({v.video_path}), question {qi}"
            try:
                q = SBQuestion.model_validate(rq)
            except (ValidationError, ValueError) as e:
                issues.append(_issue(where, e))
                continue
            qid = f"sb/{vi}/{qi}"  # entry and question index: the same video recurs over entries
            time = parse_clock(q.time_stamp)
            by_kind: dict[str, Any]  # the fields of a proactive item, or of a multiple-choice one
            if q.proactive:
                # SBQuestion._kind let no proactive item through without its ground truth
                assert q.ground_truth_output is not None and q.ground_truth_time_stamp is not None
                by_kind = dict(
                    kind="proactive", answer=q.ground_truth_output, gt_time=parse_clock(q.ground_truth_time_stamp)
                )
            else:
                assert q.options is not None and q.answer is not None  # SBQuestion._kind: an MC item has both
                options = option_texts(q.options[:SB_SHOWN_OPTIONS])
                by_kind = dict(kind="mc", options=options, answer=q.answer.strip().strip("().").upper())
            out.append(
                Question(qid, "streamingbench", v.video_path, q.task_type, time=time, question=q.question, **by_kind)
            )
    return out, issues


def _ovobench(data: Any, name: str) -> tuple[list[Question], list[FormatIssue]]:
    if not isinstance(data, list):
        return [], [FormatIssue(name, "an OVO-Bench file is a JSON list of items")]
    out, issues = [], []
    for i, raw in enumerate(data):
        where = f"{name}: entry {i}" + (
            f" (id {raw.get('id')!r}, task {raw.get('task')!r})" if isinstance(raw, dict) else ""
        )
        try:
            it = OVOItem.model_validate(raw)
        except (ValidationError, ValueError) as e:
            issues.append(_issue(where, e))
            continue
        try:
            out.append(_ovo_question(it))
        except (ValueError, TypeError, KeyError) as e:
            issues.append(FormatIssue(where, str(e)))
    return out, issues


def _ovo_question(it: OVOItem) -> Question:
    qid = f"ovo/{it.task}/{it.id}"
    if it.task not in OVO_FORWARD:
        # OVOItem._kind let no backward/real-time item through without these
        assert it.realtime is not None and it.question is not None and it.options is not None and it.gt is not None
        # options as given: OVO-Bench letters them all again (its build_prompt), even one written lettered
        return Question(
            qid,
            "ovobench",
            it.video,
            it.task,
            "mc",
            float(it.realtime),
            it.question,
            options=tuple(o.strip() for o in it.options),
            answer=LETTERS[it.gt],
        )
    assert it.test_info is not None  # OVOItem._kind: a forward item has its probes
    if it.task == "REC":
        probes = [Probe(float(p["realtime"]), str(p["count"])) for p in it.test_info]
    else:
        probes = [
            Probe(float(p["realtime"]), "Yes" if p["type"] == 1 else "No", str(p.get("step", ""))) for p in it.test_info
        ]
    probes.sort(key=lambda p: p.time)
    return Question(
        qid,
        "ovobench",
        it.video,
        it.task,
        "forward",
        probes[0].time,
        it.question or "",
        probes=tuple(probes),
        extra={"activity": it.activity or ""},
    )


def load_questions(
    path: str | Path, fmt: Literal["streamingbench", "ovobench"]
) -> tuple[list[Question], list[FormatIssue]]:
    """Read a benchmark file. Returns (questions, issues): every well-formed entry is a question,
    every malformed one an issue naming it; a file that is not JSON raises ``ValueError``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file: {e}") from e
    parse = _streamingbench if fmt == "streamingbench" else _ovobench
    questions, issues = parse(data, path.name)
    seen: set[str] = set()
    unique = []
    for q in questions:
        if q.qid in seen:
            issues.append(FormatIssue(f"{path.name}: {q.qid}", "duplicate id; the first one is kept"))
            continue
        seen.add(q.qid)
        unique.append(q)
    return unique, issues
