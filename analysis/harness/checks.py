"""What "served = reference" means, at the served dtype: shared by the serving tests and ``make gpu-check``.

A served answer is held to the transformers reference pipeline (``analysis/lib/reference.py``) run at
the dtype the server serves (:func:`analysis.harness.server.served_dtype`), with the tolerances of that
dtype (:func:`tolerances`):

* **float32** (vLLM's CPU platform, the CPU suite): the keep mask is the reference's bit for bit
  (digest), the greedy tokens are equal, every top-5 log-probability is within 1e-4 (a token may
  leave one top-5 only when it ties with the 5th within 1e-4).
* **bfloat16** (a CUDA server): log-probabilities within 5e-2. Measured on the tiny checkpoints of
  every family (transformers on the CPU, 8 greedy steps, pixel and feature DTD): bf16 against
  float32 moves a top-5 log-probability by at most 0.018, so two bf16 implementations (vLLM's kernels
  on the GPU, transformers' on the CPU) can differ by up to ~0.036. Greedy tokens are equal up to
  the first step where they differ, and that step must be a near tie: a top-2 log-probability gap
  of at most 2 x 5e-2 on either side (when each side is within 5e-2 of the exact value, only such
  a gap can change the order); steps after it are not compared (their contexts differ). Pixel-level
  masks stay exact (the decision runs in float32 on processed pixels, whatever the model's dtype);
  a feature-level mask may differ from the reference's only in tokens whose score lies within 1e-2
  of the threshold (bf16 against float32 moves a cosine score by at most 0.004 on those
  checkpoints); the answer is then not compared (the prompts differ).

Every comparison raises ``AssertionError`` (pytest reports it as a test failure; ``gpu_check``
records it as a failed case).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis.harness.server import served_dtype, video_question
from vllm_plugin.core import DTDConfig, mask_digest

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class Tolerances:
    """How close served and reference outputs must be at one dtype."""

    dtype: str
    logprob_atol: float  # |served - reference| of a top-5 log-probability
    tie_gap: float  # greedy tokens may differ first at a step whose top-2 gap is at most this (0: never)
    rows_rtol: float  # embedding rows (0, 0: bit for bit)
    rows_atol: float
    score_atol: float  # a feature-level DTD score this close to the threshold may decide either way (0: none)

    @property
    def exact_tokens(self) -> bool:
        """Greedy tokens must be equal at every step."""
        return self.tie_gap <= 0


TOLERANCES = {
    "float32": Tolerances("float32", logprob_atol=1e-4, tie_gap=0.0, rows_rtol=0.0, rows_atol=0.0, score_atol=0.0),
    "bfloat16": Tolerances(
        "bfloat16", logprob_atol=5e-2, tie_gap=2 * 5e-2, rows_rtol=1.6e-2, rows_atol=1e-2, score_atol=1e-2
    ),
}


def tolerances(dtype: str | torch.dtype | None = None) -> Tolerances:
    """The tolerances of ``dtype`` (a name or a ``torch.dtype``; default: :func:`served_dtype`)."""
    if dtype is None:
        dtype = served_dtype()
    name = str(dtype).replace("torch.", "")
    if name not in TOLERANCES:
        raise ValueError(f"no serving tolerances for dtype {dtype!r} (known: {', '.join(TOLERANCES)})")
    return TOLERANCES[name]


def _tol(tol: Tolerances | None) -> Tolerances:
    return tol if tol is not None else tolerances()


# --- log-probabilities and greedy tokens -----------------------------------------------------------


def served_top_logprobs(resp) -> tuple[list[int], list[dict[int, float]]]:
    """(generated token ids, per step {token id: logprob}) from a chat response (openai client shape;
    the request asked ``return_tokens_as_token_ids``)."""
    ids, tops = [], []
    for item in resp.choices[0].logprobs.content:
        ids.append(int(item.token.split(":", 1)[1]))
        tops.append({int(t.token.split(":", 1)[1]): t.logprob for t in item.top_logprobs})
    return ids, tops


def assert_same_top_logprobs(a: list[dict[int, float]], b: list[dict[int, float]], atol: float | None = None):
    """Same top-5 token sets (up to near-ties) and log-probabilities within ``atol`` (default: the
    served dtype's :attr:`Tolerances.logprob_atol`)."""
    if atol is None:
        atol = tolerances().logprob_atol
    assert len(a) == len(b), (len(a), len(b))
    for step, (x, y) in enumerate(zip(a, b)):
        for tok in set(x) & set(y):
            assert abs(x[tok] - y[tok]) <= atol, (step, tok, x[tok], y[tok])
        # a token may fall out of one top-5 only if it ties with the 5th
        for tok in set(x) ^ set(y):
            lp = x[tok] if tok in x else y[tok]  # in exactly one of them
            fifth = min(min(x.values()), min(y.values()))
            assert abs(lp - fifth) <= atol, (step, tok, lp, fifth)


def top2_gap(top: dict[int, float]) -> float:
    """Log-probability gap between the best and the second token of one step (inf with one token)."""
    v = sorted(top.values(), reverse=True)
    return v[0] - v[1] if len(v) > 1 else float("inf")


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first step where two token sequences differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _check_divergence(step: int, tops: Sequence[Sequence[dict[int, float]]], tol: Tolerances, what: str) -> None:
    gaps = [top2_gap(t[step]) for t in tops if step < len(t)]
    assert gaps and min(gaps) <= tol.tie_gap, (
        f"{what}: greedy tokens differ at step {step}, where the top-2 log-probability gap is "
        f"{min(gaps) if gaps else 'unknown'} (a {tol.dtype} near tie is at most {tol.tie_gap})"
    )


def assert_same_greedy(
    ids_a: Sequence[int],
    tops_a: list[dict[int, float]],
    ids_b: Sequence[int],
    tops_b: list[dict[int, float]],
    tol: Tolerances | None = None,
) -> int | None:
    """Two greedy answers with their top-5 log-probabilities agree at ``tol`` (default: the served
    dtype's). float32: ``ids_a == ids_b`` and every step's log-probabilities within the tolerance.
    bfloat16: equal up to the first differing step, which must be a near tie; log-probabilities are
    compared up to and including it. Returns that step (None: the same tokens throughout)."""
    tol = _tol(tol)
    if tol.exact_tokens:
        assert list(ids_a) == list(ids_b), (list(ids_a), list(ids_b))
        assert_same_top_logprobs(tops_a, tops_b, tol.logprob_atol)
        return None
    d = first_divergence(ids_a, ids_b)
    if d is None:
        assert_same_top_logprobs(tops_a, tops_b, tol.logprob_atol)
        return None
    assert d < len(ids_a) and d < len(ids_b), (
        f"one answer stopped at step {d}, the other went on: {list(ids_a)} vs {list(ids_b)}"
    )
    _check_divergence(d, (tops_a, tops_b), tol, "served vs reference")
    assert_same_top_logprobs(tops_a[: d + 1], tops_b[: d + 1], tol.logprob_atol)
    return d


def assert_same_tokens(
    served: Sequence[int],
    reference_ids: Sequence[int],
    reference_tops: list[dict[int, float]],
    tol: Tolerances | None = None,
) -> int | None:
    """A greedy answer served without log-probabilities (stream answers) against the reference's:
    float32 equal; bfloat16 equal up to a first difference at a step the reference calls a near tie.
    Returns that step (None: equal)."""
    tol = _tol(tol)
    if tol.exact_tokens:
        assert list(served) == list(reference_ids), (list(served), list(reference_ids))
        return None
    d = first_divergence(served, reference_ids)
    if d is None:
        return None
    assert d < len(served) and d < len(reference_ids), (list(served), list(reference_ids))
    _check_divergence(d, (reference_tops,), tol, "served stream answer vs reference")
    return d


def assert_rows_close(a: torch.Tensor, b: torch.Tensor, tol: Tolerances | None = None) -> None:
    """Embedding rows: float32 bit for bit (``torch.equal``), bfloat16 within the dtype's rtol / atol."""
    tol = _tol(tol)
    if tol.rows_rtol == 0 and tol.rows_atol == 0:
        assert torch.equal(a, b), "rows differ"
        return
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), rtol=tol.rows_rtol, atol=tol.rows_atol)


# --- keep masks --------------------------------------------------------------------------------------


def near_threshold_per_step(tokens: torch.Tensor, dtd: DTDConfig, tol: Tolerances | None = None) -> list[int]:
    """Per temporal step, the tokens whose DTD score lies within ``tol.score_atol`` of the threshold
    (along the reference's own decisions, ``last_kept`` included): those a served model at that dtype
    may decide the other way. ``tokens``: (T, H, W, C) as DTD compares them."""
    from vllm_plugin.core import decide_steps

    tol = _tol(tol)
    counts = [0] * int(tokens.shape[0])
    threshold = dtd.threshold
    assert threshold is not None  # DTDConfig resolves it on construction

    def observe(t: int, scores: torch.Tensor) -> None:
        counts[t] = int(((scores.double() - threshold).abs() <= tol.score_atol).sum())

    decide_steps(tokens, dtd, observe=observe)
    return counts


def reference_tokens(reference, prepared) -> torch.Tensor:
    """The tokens feature-level DTD compared in the reference: its vision tower's (main) output as (T, H, W, C)."""
    T, H, W = prepared.video.llm_grid
    return reference.video_embeddings(prepared.video).reshape(T, H, W, -1)


def assert_same_kept(
    served_kept_per_step: Sequence[int], reference, prepared, dtd: DTDConfig | None, tol: Tolerances | None = None
) -> bool:
    """The served kept tokens per temporal step are the reference mask's; at a dtype with a score
    tolerance, feature-level counts may differ by the step's near-threshold tokens. Returns whether
    they are equal."""
    tol = _tol(tol)
    want = prepared.mask.flatten(1).sum(1).tolist()
    served = [int(k) for k in served_kept_per_step]
    if served == want:
        return True
    near_ok = tol.score_atol > 0 and dtd is not None and dtd.enabled and dtd.criterion == "feature"
    assert near_ok and dtd is not None and len(served) == len(want), (served, want)
    near = near_threshold_per_step(reference_tokens(reference, prepared), dtd, tol)
    off = [(t, s, w, n) for t, (s, w, n) in enumerate(zip(served, want, near)) if abs(s - w) > n]
    assert not off, (
        f"kept per step differ by more than the near-threshold tokens (step, served, reference, near): {off}"
    )
    return False


def assert_same_mask(
    stats: dict, reference, prepared, dtd: DTDConfig | None = None, tol: Tolerances | None = None
) -> bool:
    """The served keep mask (``x-dtd-stats`` of one video) is the reference's: the same digest;
    a bf16 feature-level mask may differ in near-threshold tokens only (:func:`assert_same_kept`).
    Returns whether the digests are equal (False: a near tie, the prompts differ)."""
    tol = _tol(tol)
    if tol.score_atol <= 0 or dtd is None or dtd.criterion != "feature":
        assert stats["mask_sha256"] == mask_digest(prepared.mask)
        return True
    if stats["mask_sha256"] == mask_digest(prepared.mask):
        return True
    assert_same_kept(stats["kept_per_step"], reference, prepared, dtd, tol)
    return False


# --- one served answer against the reference ---------------------------------------------------------


@dataclass
class Comparison:
    """What :func:`compare_to_reference` compared."""

    mask_equal: bool = True  # False: a near-tie feature mask (nothing else compared)
    steps: int = 0  # greedy steps whose log-probabilities were compared
    diverged_at: int | None = None  # bf16: the near-tie step where the tokens first differ
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.mask_equal:
            return "feature mask differs in near-threshold tokens only (answer not compared)"
        s = f"{self.steps} greedy steps compared"
        return s + (
            f", tokens differ from step {self.diverged_at} (a near tie)" if self.diverged_at is not None else ""
        )


def compare_to_reference(
    resp, stats: dict, reference, prepared, dtd: DTDConfig | None = None, tol: Tolerances | None = None
) -> Comparison:
    """A served chat answer (greedy, top-5 log-probabilities with token ids, ``x-dtd-stats`` of its
    one video in ``stats``) equals the reference pipeline's on ``prepared``: the same keep mask
    (digest), the same prompt length, the same greedy tokens and top-5 log-probabilities within the
    tolerance of the dtype. ``dtd``: the setting served (feature-level near ties at bf16)."""
    tol = _tol(tol)
    out = Comparison()
    if not assert_same_mask(stats, reference, prepared, dtd, tol):
        out.mask_equal = False
        return out
    assert resp.usage.prompt_tokens == prepared.num_prompt_tokens, (
        resp.usage.prompt_tokens,
        prepared.num_prompt_tokens,
    )
    ids, tops = served_top_logprobs(resp)
    gen = reference.generate(prepared, max_new_tokens=len(ids), stop_at_eos=False)
    out.diverged_at = assert_same_greedy(ids, tops, gen.token_ids, gen.top_logprobs, tol)
    out.steps = len(ids) if out.diverged_at is None else out.diverged_at + 1
    return out


# --- serving ------------------------------------------------------------------------------------------


def serve_args(media_dir: str | Path) -> list[str]:
    """vLLM flags of the servers held to the reference (tests/conftest.py ``serve_args``, the gpu check):
    every decoded frame reaches the processor (the reference sees the same pixels), local files
    allowed from ``media_dir``, logprobs for the comparisons."""
    return [
        "--media-io-kwargs",
        json.dumps({"video": {"num_frames": -1}}),
        "--allowed-local-media-path",
        str(media_dir),
        "--max-logprobs",
        "20",
        "--enable-prompt-tokens-details",
        "--seed",
        "0",
    ]


def chat_with_stats(
    srv, video: str | Path, question: str = "what happens", media_io: dict | None = None, max_tokens: int = 6, **mm
):
    """One greedy chat request with a local video (top-5 logprobs with token ids) and the
    ``x-dtd-stats`` header's per-video stats (``[]`` without the header)."""
    extra: dict[str, Any] = {"return_tokens_as_token_ids": True}
    if mm:
        extra["mm_processor_kwargs"] = mm
    if media_io:
        extra["media_io_kwargs"] = media_io
    raw = srv.client().chat.completions.with_raw_response.create(
        model=srv.model,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        top_logprobs=5,
        extra_body=extra,
        messages=video_question(f"file://{video}", question),
    )
    stats = json.loads(raw.headers["x-dtd-stats"])["videos"] if "x-dtd-stats" in raw.headers else []
    return raw.parse(), stats


def dtd_config(mm: dict) -> DTDConfig:
    """The :class:`DTDConfig` of a request's ``dtd_*`` options (server defaults for the others)."""
    return DTDConfig.from_kwargs(mm)


# --- the engine's GPU memory, over HTTP ------------------------------------------------------------------


class GpuCheckProbe:
    """A vLLM worker extension (``--worker-extension-cls analysis.harness.checks.GpuCheckProbe``): its
    method runs in every worker through ``collective_rpc``, which a server started with
    ``VLLM_SERVER_DEV_MODE=1`` exposes as ``POST /collective_rpc {"method": "dtd_gpu_check_probe"}``
    (vLLM 0.32: ``vllm/entrypoints/serve/dev/rpc/api_router.py``; dict results come back as JSON)."""

    vllm_config: VllmConfig  # the worker's: vLLM adds this class to its worker class's bases

    def dtd_gpu_check_probe(self) -> dict:
        """This worker's process id, model runner and CUDA memory (bytes)."""
        import os

        import torch

        free, total = torch.cuda.mem_get_info()
        runner = getattr(self, "model_runner", None)
        return {
            "pid": os.getpid(),
            "model_runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
            "use_v2_model_runner": bool(getattr(self, "use_v2_model_runner", False)),
            "max_memory_allocated": int(torch.cuda.max_memory_allocated()),
            "max_memory_reserved": int(torch.cuda.max_memory_reserved()),
            "free": int(free),
            "total": int(total),
            "gpu_memory_utilization": float(self.vllm_config.cache_config.gpu_memory_utilization),
        }


# -- never down: the checks the CPU tests (tests/serving/test_never_down.py) and make gpu-check share ----------------


def assert_server_healthy(srv) -> None:
    """``/health`` answers and the engine generates (a one-token completion)."""
    import requests

    assert requests.get(srv.base_url + "/health", timeout=60).status_code == 200, "/health"
    r = srv.client().completions.create(model=srv.model, prompt="hello", max_tokens=1)
    assert r.choices[0].text is not None


def check_fps_past_the_table_is_refused(srv) -> str:
    """A stream whose fps would take its M-RoPE positions past the rotary table (1e-5) is refused at
    open with a 400 naming the table; the server stays up."""
    from vllm_plugin.client import StreamHTTPError, open_stream

    try:
        s = open_stream(srv.base_url, fps=1e-5)
    except StreamHTTPError as e:
        assert e.status == 400 and "fps" in str(e) and "rotary table" in str(e), (e.status, str(e)[:300])
    else:
        s.close()
        raise AssertionError("a stream at fps 1e-5 (positions past the rotary table) was opened")
    assert_server_healthy(srv)
    return "fps 1e-5 refused (400), server healthy"


def check_sparse_stream_is_answered(srv, side: int = 224) -> str:
    """fps 0.002 (frames 500 s apart): 128 temporal steps of a static scene would span 256,000 temporal
    M-RoPE positions; the chunk is bounded (oldest steps dropped, a ``dropped`` event says why) and the
    question answered; the server stays up."""
    import numpy as np

    from vllm_plugin.client import open_stream

    s = open_stream(srv.base_url, fps=0.002, prefill="lazy", dtd_threshold=0.05)
    try:
        frame = np.full((side, side, 3), 90, np.uint8)
        for _ in range(2):
            s.push([frame] * 128)
        a = s.ask("what happens?", max_tokens=3)
        assert a["choices"][0]["message"]["content"] is not None
        dropped = [e for e in s.events() if e["type"] == "dropped"]
        assert dropped and "rotary table" in dropped[0]["message"], s.events()
    finally:
        s.close()
    assert_server_healthy(srv)
    return "fps 0.002 answered, chunk bounded, server healthy"
