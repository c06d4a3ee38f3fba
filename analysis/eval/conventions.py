"""Each benchmark's own way of asking and scoring, as its evaluation code does it.

StreamingBench (THUNLP-MT/StreamingBench, ``src/benchmark/StreamingBench*.py``, ``src/data/count.py``):

* multiple choice: its prompt with options lettered ``A.`` ... and ``"The best option is:"``
  appended; the video from 0 to the question's ``time_stamp``. Its scorer compares the reply's first
  character with the letter; here :func:`parse_letter` reads the letter more robustly and a reply
  without one is wrong and counted as unparsed.
* proactive output: from ``time_stamp`` + 1 s, every second until ``ground_truth_time_stamp`` + 4 s, it
  asks whether it is the right time to output the ground truth (the clip runs from ``time_stamp``, so
  these questions get their own stream starting there: :func:`stream_start`); at the first reply
  containing "yes" it asks the question itself and stops. Scored right when that time is within
  ±2 s of the ground-truth time AND the ground-truth output is in the answer (its ``count.py``:
  time then answer accuracy).

OVO-Bench (JoeLeelyf/OVO-Bench, ``constant.py``, ``utils/OVOBench.py``, ``utils/OVOBenchScore.py``):

* backward and real-time tasks: its prompt with options ``A. x; B. y;``; the video up to ``realtime``;
  its scorer checks the right letter is in the reply (here :func:`parse_letter`, as above);
* forward active responding: one ask per ``test_info`` probe at its ``realtime``: REC "How many times
  did they <activity>?" (right when the digits of the reply are the count), SSR "is this step being
  performed?" and CRR "is there enough to answer?" (right when the expected Yes/No is in the reply).
  A question's score is the share of its probes answered right; OVO-Bench averages probes per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from analysis.eval.formats import LETTERS, Question

# --- StreamingBench (src/benchmark/StreamingBench.py, StreamingBenchProactive.py) ---------------
SB_PROMPT = (
    "You are an advanced video question-answering AI assistant. You have been provided with some frames from the "
    "video and a multiple-choice question related to the video. Your task is to carefully analyze the video and "
    "provide the best answer to question, choosing from the four options provided. Respond with only the letter "
    "(A, B, C, or D) of the correct option.\n\nQuestion: {question}\n\nOptions:\n{options}\n\nThe best option is:"
)
SB_PROACTIVE_PROMPT = (
    "You are an advanced image question-answering AI assistant. You have been provided with images and a question "
    "related to the images. Your task is to carefully analyze the images and provide the answer to the question. You "
    "need to carefully confirm whether the images content meet the conditions of the question, and then output the "
    "correct content.\n\nQuestion: {question}\n\nThe answer is:\n"
)
SB_PROACTIVE_POLL = '{question} Is it the right time to output "{output}"? You can only answer yes or no.'
SB_POLL_INTERVAL_S = 1.0
SB_POLL_AFTER_GT_S = 4.0  # polling goes on until the ground-truth time + this
SB_TIME_TOLERANCE_S = 2.0  # an answer within ± this of the ground-truth time is on time

# --- OVO-Bench (constant.py, utils/OVOBench.py) ---------------------------------------------------
OVO_PROMPT = (
    "\nQuestion: {question}\nOptions:\n{options}\n\nRespond only with the letter corresponding to your chosen option "
    "(e.g., A, B, C). \nDo not include any additional text or explanation in your response.\n"
)
OVO_REC_PROMPT = (
    "\nYou're watching a video in which people may perform a certain type of action repetively. \nThe person "
    "performing this kind of action are referred to as 'they' in the following statement.\nYou're task is to count how "
    "many times have different people in the video perform this kind of action in total.\nOne complete motion counts "
    "as one. \nNow, answer the following question: {question}\nProvide your answer as a single number (e.g., 0, 1, 2, "
    "3…) indicating the total count.\nDo not include any additional text or explanation in your response.\n"
)
OVO_SSR_PROMPT = (
    "\nYou're watching a tutorial video which contain a sequential of steps. \nThe following is one step from the "
    "whole procedures: \n{step}\nYour task is to determine if the man or woman in the video is currently performing "
    "this step.\nAnswer only with “Yes” or “No”.\nDo not include any additional text or explanation in your response.\n"
)
OVO_CRR_PROMPT = (
    "\nYou're responsible of answering questions based on the video content. \nThe following question are relevant to "
    "the latest frames, i.e. the end of the video.\n{question}\nDecide whether existing visual content, especially "
    "latest frames, i.e. frames that near the end of the video, provide enough information for answering the "
    "question.\nAnswer only with “Yes” or “No”.\nDo not include any additional text or explanation in your response.\n"
)

MC_MAX_TOKENS = 16  # a letter, with room for "The best option is (B)."
OPEN_MAX_TOKENS = 64  # proactive answers and counts


@dataclass(frozen=True)
class Ask:
    """One request of a question: at ``time`` (the last frame it may see), ``prompt``; ``role``:
    ``answer`` (mc), ``poll`` / ``content`` (proactive), ``probe`` (forward, ``index`` into probes)."""

    time: float
    prompt: str
    role: str
    max_tokens: int = MC_MAX_TOKENS
    index: int = 0


@dataclass(frozen=True)
class Reply:
    """What one ask got back (``error``: the server refused it; the reply then scores wrong)."""

    time: float
    text: str
    role: str = "answer"
    index: int = 0  # forward: the probe
    error: str | None = None
    prompt_tokens: int = 0
    video_tokens: int = 0
    full_video_tokens: int = 0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    last_frame_time: float | None = None


@dataclass(frozen=True)
class Verdict:
    """``score`` in [0, 1] (1 = right; forward questions: the share of probes right); ``parsed``:
    every reply could be read (a letter, yes/no, a number); ``response_time``: proactive only."""

    score: float
    parsed: bool
    prediction: str = ""
    response_time: float | None = None
    out_of: int = 1  # what the benchmark counts: 1 per question, 1 per probe for forward questions

    @property
    def points(self) -> float:
        return self.score * self.out_of


# --- reading replies ---------------------------------------------------------------------------------
_ANSWER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*\(?\s*([A-J])\s*\)?(?!\w)", re.I)
_ARTICLE_USE = re.compile(r"\s+(?!(?:is|was|because|since|as|and|or)\b)[a-z]")  # "A man", not "A is"
_LEADING = re.compile(r"^\s*[\(\[]?\s*([A-J])\s*(?:[\)\].:,：\-–]|\n|$|\s+(?:is|was)\b)")


def parse_letter(reply: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The option letter a reply chose, or None. Read, in order (markdown ``*`` aside): a reply that
    starts with a letter standing alone (``"B"``, ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"``, ``"B - x"``,
    ``"B\nwhy"``, ``"B is right"``); else the LAST "answer/option is B" (``"option A is wrong; the
    answer is B"`` → B); else the reply being one option's text (case and end punctuation aside).
    Letters outside the question's options do not count; a capital starting a phrase is no letter
    (``"A man walks"``, ``"the answer is A man"``)."""
    valid = LETTERS[: len(options)]
    text = (reply or "").replace("*", "").strip()
    m = _LEADING.match(text)
    if m and m.group(1) in valid:
        return m.group(1)
    hits = [
        m.group(1)
        for m in _ANSWER_IS.finditer(text)
        if m.group(1).isupper()
        and m.group(1) in valid
        and not (m.group(1) in "AI" and _ARTICLE_USE.match(text, m.end()))
    ]
    if hits:
        return hits[-1]
    norm = lambda s: re.sub(r"[\s.!]+$", "", s.strip().lower())
    same = [LETTERS[i] for i, o in enumerate(options) if norm(o) and norm(o) == norm(text)]
    return same[0] if len(same) == 1 else None


def says_yes(reply: str) -> bool:
    """StreamingBench's proactive rule: "yes" anywhere in the reply, any case."""
    return "yes" in (reply or "").strip().lower()


def yes_no(reply: str) -> str | None:
    """OVO-Bench's SSR/CRR reading: ``"Yes"``/``"No"`` when that word (case as written) is in the
    reply, or the reply is exactly ``"Y"``/``"N"``; None when neither or both are."""
    text = (reply or "").strip()
    if text in ("Y", "N"):
        return "Yes" if text == "Y" else "No"
    has_yes, has_no = "Yes" in text, "No" in text
    return "Yes" if has_yes and not has_no else "No" if has_no and not has_yes else None


def count_of(reply: str) -> str | None:
    """OVO-Bench's REC reading: every digit of the reply, joined (``"3 times"`` → ``"3"``)."""
    digits = "".join(re.findall(r"\d+", reply or ""))
    return digits or None


# --- asking -----------------------------------------------------------------------------------------
def lettered(options, sep: str) -> str:
    return sep.join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def asks_for(q: Question) -> list[Ask]:
    """Every planned ask of a question, in time order (a proactive question's polls stop at its
    first "yes": :func:`follow_up`, :func:`finished`)."""
    if q.kind == "mc":
        if q.benchmark == "streamingbench":
            prompt = SB_PROMPT.format(question=q.question, options=lettered(q.options, "\n"))
        else:
            prompt = OVO_PROMPT.format(question=q.question, options=lettered(q.options, "; ") + ";")
        return [Ask(q.time, prompt, "answer")]
    if q.kind == "proactive":
        assert q.gt_time is not None, f"{q.qid}: a proactive question has its gt_time"
        poll = SB_PROACTIVE_PROMPT.format(question=SB_PROACTIVE_POLL.format(question=q.question, output=q.answer))
        out, t = [], q.time + SB_POLL_INTERVAL_S
        while t <= q.gt_time + SB_POLL_AFTER_GT_S + 1e-9:
            out.append(Ask(t, poll, "poll", max_tokens=8))
            t += SB_POLL_INTERVAL_S
        return out
    if q.kind == "forward":
        out = []
        for i, p in enumerate(q.probes):
            if q.task == "REC":
                prompt = OVO_REC_PROMPT.format(question=f"How many times did they {q.extra.get('activity', '')}?")
            elif q.task == "SSR":
                prompt = OVO_SSR_PROMPT.format(step=p.text)
            else:
                prompt = OVO_CRR_PROMPT.format(question=q.question)
            out.append(Ask(p.time, prompt, "probe", max_tokens=8, index=i))
        return out
    raise ValueError(f"unknown question kind {q.kind!r}")


def follow_up(q: Question, reply: Reply) -> Ask | None:
    """The ask that follows a reply at the same point (StreamingBench proactive: after a "yes", the
    question itself), or None."""
    if q.kind == "proactive" and reply.role == "poll" and not reply.error and says_yes(reply.text):
        return Ask(reply.time, SB_PROACTIVE_PROMPT.format(question=q.question), "content", max_tokens=OPEN_MAX_TOKENS)
    return None


def finished(q: Question, reply: Reply) -> bool:
    """No further ask of this question after ``reply`` (proactive: its content answer came)."""
    return q.kind == "proactive" and reply.role == "content"


def stream_start(q: Question) -> float:
    """Where the video a question sees begins: 0, except StreamingBench proactive questions, whose
    clips start at their ``time_stamp``."""
    return q.time if q.kind == "proactive" else 0.0


def last_ask_time(q: Question) -> float:
    asks = asks_for(q)
    return max(a.time for a in asks) if asks else q.time


# --- scoring ----------------------------------------------------------------------------------------
def score(q: Question, replies: list[Reply]) -> Verdict:
    """A question's verdict from its replies, as its benchmark scores it (see the module docstring)."""
    if q.kind == "mc":
        text = replies[-1].text if replies else ""
        letter = parse_letter(text, q.options) if replies and not replies[-1].error else None
        return Verdict(float(letter == q.answer), letter is not None, letter or "")
    if q.kind == "proactive":
        content = [r for r in replies if r.role == "content"]
        polls = [r for r in replies if r.role == "poll"]
        if not content:  # never said yes: StreamingBench's last time is the last poll, outside the window
            return Verdict(0.0, all(not r.error and "no" in r.text.lower() for r in polls), "", None)
        c = content[-1]
        assert q.gt_time is not None, f"{q.qid}: a proactive question has its gt_time"
        on_time = abs(c.time - q.gt_time) <= SB_TIME_TOLERANCE_S
        right = on_time and not c.error and q.answer in c.text
        return Verdict(float(right), not c.error, c.text.strip()[:200], c.time)
    if q.kind == "forward":
        by_index = {r.index: r for r in replies}
        got, parsed, preds = 0, True, []
        for i, p in enumerate(q.probes):
            r = by_index.get(i)
            text = r.text if r is not None and not r.error else ""
            if q.task == "REC":
                pred = count_of(text)
                ok = pred == p.expected
            else:
                pred = yes_no(text)
                ok = pred == p.expected
            parsed &= pred is not None
            got += ok
            preds.append(pred or "?")
        return Verdict(got / len(q.probes), parsed, ",".join(preds), out_of=len(q.probes))
    raise ValueError(f"unknown question kind {q.kind!r}")
