"""``make gpu-check`` (analysis/cli/gpu_check.py) without a GPU: it says so and exits 0, its arguments,
its verdict line, its memory and runner checks on synthetic probes, and ``compare_to_reference``
(analysis/harness/checks.py, what it and tests/serving/test_qwen2_vl_serving.py hold a served answer to)."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as N

import pytest
import torch

from analysis.cli import gpu_check
from analysis.cli.gpu_check import CaseResult, check_memory, check_runner, parse_compute_apps, summary_line, verdict
from analysis.harness.checks import GpuCheckProbe, compare_to_reference
from analysis.harness.tiny_model import FAMILIES
from conftest import REPO

LINE = re.compile(r"^gpu_check=(pass|fail|skip) cases=(\d+) failed=(\d+)$")
GIB, MIB = 1 << 30, 1 << 20


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "analysis.cli.gpu_check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    r = _run("--quick", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "gpu_check: no CUDA device here; nothing run"
    m = LINE.match(lines[-1])
    assert m and m.groups() == ("skip", "0", "0")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


@pytest.mark.parametrize(
    "args, env, word",
    [
        (["--families", "qwen9_vl"], None, "--families"),
        (["--families", ""], None, "--families"),
        (["--runners", "v3"], None, "--runners"),
        (["--gpu-memory-utilization", "1.5"], None, "--gpu-memory-utilization"),
        (["--api-gpu-gib", "0"], None, "--api-gpu-gib"),
        (["--quick", "--bogus"], None, "--bogus"),
        ([], {"DTD_TEST_DTYPE": "fp16"}, "DTD_TEST_DTYPE"),
    ],
)
def test_bad_arguments_exit_2(args, env, word):
    r = _run(*args, env=env)
    assert r.returncode == 2 and word in r.stderr, (r.returncode, r.stderr)


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _run("--out", str(f))
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_arguments():
    a = gpu_check.parse_args([])
    assert a.families == list(FAMILIES) and a.runners == ["v1", "v2"] and not a.quick and a.out is None
    assert gpu_check.parse_args(["--quick"]).families == list(gpu_check.QUICK_FAMILIES)
    a = gpu_check.parse_args(["--families", "qwen3_vl,qwen2_vl", "qwen3_vl", "--runners", "v2", "--quick"])
    assert a.families == ["qwen3_vl", "qwen2_vl"] and a.runners == ["v2"]
    assert gpu_check.RUNNERS == {"v1": "0", "v2": "1"}  # VLLM_USE_V2_MODEL_RUNNER


def test_main_in_process_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--families", "qwen2_5_vl"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == gpu_check.SKIP_LINE


def test_verdict_and_summary_line():
    ok = [CaseResult("qwen2_5_vl", "v1", "video/pixel", True), CaseResult("qwen2_5_vl", "v2", "video/pixel", True)]
    assert verdict(ok) == "pass" and summary_line(ok) == "gpu_check=pass cases=2 failed=0"
    bad = ok + [CaseResult("qwen3_vl", "v2", "engine/memory", False, "over")]
    assert verdict(bad) == "fail" and summary_line(bad) == "gpu_check=fail cases=3 failed=1"
    assert summary_line([]) == "gpu_check=fail cases=0 failed=0"  # nothing ran on a GPU: not a pass
    for s in (summary_line(ok), summary_line(bad), summary_line([]), gpu_check.SKIP_LINE):
        assert LINE.match(s)
    assert bad[-1].line().startswith("[FAIL] qwen3_vl v2 engine/memory: over")


def test_cases_per_server():
    fam = lambda name: gpu_check.Family(name, Path("/m"), None, Path("/m.mp4"), None)  # noqa: E731
    quick = [n for n, _ in gpu_check.server_cases(fam("qwen2_5_vl"), quick=True)]
    assert quick == ["video/pixel", "video/feature", "stream/pixel-eager", "stream/feature-eager", "positions/refused"]
    full = [n for n, _ in gpu_check.server_cases(fam("qwen3_vl_moe"), quick=False)]
    assert {"video/off", "video/feature-last_kept", "stream/one-append", "positions/sparse-stream"} <= set(full)


def test_nvidia_smi_rows():
    assert parse_compute_apps("123, 512\n456, 1024\n123, 8\n[N/A], 3\n789, [N/A]\n") == {123: 520, 456: 1024}
    assert parse_compute_apps("") == {}


def _probe(pid=10, peak_gib=20.0, v2=True, free_gib=40.0):
    return {
        "pid": pid,
        "model_runner": "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
        if v2
        else "vllm.v1.worker.gpu_model_runner.GPUModelRunner",
        "use_v2_model_runner": v2,
        "max_memory_allocated": int(peak_gib * GIB),
        "max_memory_reserved": int(peak_gib * GIB),
        "free": int(free_gib * GIB),
        "total": 80 * GIB,
        "gpu_memory_utilization": 0.5,
    }


def test_runner_check():
    assert "gpu.model_runner" in check_runner([_probe(v2=True)], "v2")
    check_runner([_probe(v2=False)], "v1")
    with pytest.raises(AssertionError, match="asked for v2"):
        check_runner([_probe(v2=False)], "v2")
    with pytest.raises(AssertionError):
        check_runner([], "v1")


def test_memory_bounds():
    # budget 0.5 x 80 GiB = 40 GiB, less a 2 GiB carve-out for the engine
    note = check_memory([_probe(peak_gib=37.9)], [1, 10], {10: 39000, 1: 1500, 99: 70000}, 2.0)
    assert "engine" in note and "api 1500/2048 MiB (1 processes)" in note
    with pytest.raises(AssertionError, match="max_memory_allocated"):
        check_memory([_probe(peak_gib=38.5)], [1, 10], {10: 39000, 1: 1500}, 2.0)
    with pytest.raises(AssertionError, match="API-server"):  # two API servers together past the carve-out
        check_memory([_probe()], [1, 2, 10], {10: 39000, 1: 1500, 2: 1000}, 2.0)
    # nvidia-smi sees none of the server's processes (a PID namespace): the device's use within the budget
    assert "device" in check_memory([_probe(free_gib=45.0)], [1, 10], {77: 5}, 2.0)
    with pytest.raises(AssertionError, match="device holds"):
        check_memory([_probe(free_gib=30.0)], [1, 10], None, 2.0)


def test_the_worker_probe_reads_the_workers_runner_and_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 6 * GIB)

    class Runner:
        pass

    worker = N(
        model_runner=Runner(), use_v2_model_runner=True, vllm_config=N(cache_config=N(gpu_memory_utilization=0.5))
    )
    p = GpuCheckProbe.dtd_gpu_check_probe(worker)
    assert p["pid"] == os.getpid() and p["use_v2_model_runner"] and p["model_runner"].endswith("Runner")
    assert (p["max_memory_allocated"], p["free"], p["total"], p["gpu_memory_utilization"]) == (
        5 * GIB,
        3 * GIB,
        80 * GIB,
        0.5,
    )
    # vLLM mixes the extension into the worker class: no attribute of its own may clash with a worker's
    assert [a for a in dir(GpuCheckProbe) if not a.startswith("__")] == [gpu_check.PROBE_METHOD]
    assert f"{GpuCheckProbe.__module__}.{GpuCheckProbe.__qualname__}" == gpu_check.PROBE


def test_group_pids_finds_this_process():
    assert os.getpid() in gpu_check.group_pids(os.getpgid(0))


# --- compare_to_reference on a served answer made from the reference itself --------------------------


def _response(ids, tops, prompt_tokens):
    """The openai-client shape of a chat answer with top-5 logprobs and token ids."""
    tok = lambda t: f"token_id:{t}"  # noqa: E731
    content = [
        N(token=tok(i), top_logprobs=[N(token=tok(k), logprob=v) for k, v in top.items()]) for i, top in zip(ids, tops)
    ]
    return N(usage=N(prompt_tokens=prompt_tokens), choices=[N(logprobs=N(content=content))])


def test_compare_to_reference_on_the_tiny_checkpoint(reference, synthetic_clip, monkeypatch):
    from vllm_plugin.core import DTDConfig, mask_digest

    monkeypatch.delenv("DTD_TEST_DTYPE", raising=False)
    cfg = DTDConfig()
    prepared = reference.prepare("what happens", synthetic_clip.frames, synthetic_clip.fps, cfg)
    gen = reference.generate(prepared, max_new_tokens=4, stop_at_eos=False)
    stats = {"mask_sha256": mask_digest(prepared.mask), "kept_per_step": prepared.mask.flatten(1).sum(1).tolist()}
    same = compare_to_reference(
        _response(gen.token_ids, gen.top_logprobs, prepared.num_prompt_tokens), stats, reference, prepared, cfg
    )
    assert same.mask_equal and same.steps == 4 and same.diverged_at is None and "4 greedy steps" in same.describe()

    moved = [{k: v + 3e-4 for k, v in t.items()} for t in gen.top_logprobs]  # float32: 1e-4
    with pytest.raises(AssertionError):
        compare_to_reference(
            _response(gen.token_ids, moved, prepared.num_prompt_tokens), stats, reference, prepared, cfg
        )
    with pytest.raises(AssertionError):  # another prompt length
        compare_to_reference(
            _response(gen.token_ids, gen.top_logprobs, prepared.num_prompt_tokens + 1), stats, reference, prepared, cfg
        )
    with pytest.raises(AssertionError):  # another mask
        compare_to_reference(
            _response(gen.token_ids, gen.top_logprobs, prepared.num_prompt_tokens),
            {**stats, "mask_sha256": "0" * 64},
            reference,
            prepared,
            cfg,
        )
    monkeypatch.setenv("DTD_TEST_DTYPE", "bfloat16")  # the same answer, at bf16's tolerance
    assert (
        compare_to_reference(
            _response(gen.token_ids, moved, prepared.num_prompt_tokens), stats, reference, prepared, cfg
        ).steps
        == 4
    )


# --- the gpu check's cases, against a fake server that answers as the reference does ----------------


class _FakeStream:
    """What ``open_stream`` returns, answering from the reference (as a correct server would)."""

    def __init__(self, fam, dtd_criterion="pixel", **_):
        from analysis.harness.checks import dtd_config

        self.whole = fam.prepare(dtd_config({"dtd_criterion": dtd_criterion}), whole_stream=True)
        self.fam, self.frames = fam, 0

    def push(self, frames):
        self.frames += len(frames)
        return {}

    def wait_prefilled(self, timeout=0):
        return {"prefill_pending": False}

    def status(self):
        return {"kept_per_step": self.whole.mask.flatten(1).sum(1).tolist(), "prefill_pending": False}

    def ask(self, question, max_tokens=4, return_token_ids=False):
        kept = self.status()["kept_per_step"]
        gen = self.fam.reference.generate(self.whole, max_new_tokens=max_tokens, stop_at_eos=False)
        ids = self.whole.input_ids.tolist()
        return {
            "stream_state": {
                "video_tokens_per_chunk": [sum(kept[a : a + 8]) for a in range(0, len(kept), 8)],
                "prompt_token_ids": ids,
                "completion_token_ids": gen.token_ids,
            },
            "usage": {"prompt_tokens": len(ids), "prompt_tokens_details": {"cached_tokens": len(ids) - 12}},
        }

    def close(self):
        pass


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    media = tmp_path_factory.mktemp("gpu-check-media")
    return {name: gpu_check.load_family(name, media) for name in ("qwen2_5_vl", "qwen3_vl")}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_the_cases_pass_on_answers_equal_to_the_reference(families, name, monkeypatch):
    import vllm_plugin.client
    from analysis.harness import checks

    fam = families[name]
    assert fam.mp4.is_file() and next(fam.reference.model.parameters()).dtype is torch.float32  # the served dtype here

    def chat(srv, video, question, media_io=None, max_tokens=6, **mm):
        assert Path(video) == fam.mp4
        prepared = fam.prepare(checks.dtd_config(mm))
        gen = fam.reference.generate(prepared, max_new_tokens=max_tokens, stop_at_eos=False)
        stats = {
            "mask_sha256": checks.mask_digest(prepared.mask),
            "kept_per_step": prepared.mask.flatten(1).sum(1).tolist(),
            "kept": int(prepared.mask.sum()),
            "total": prepared.mask.numel(),
        }
        return _response(gen.token_ids, gen.top_logprobs, prepared.num_prompt_tokens), [stats]

    monkeypatch.setattr(checks, "chat_with_stats", chat)
    monkeypatch.setattr(vllm_plugin.client, "open_stream", lambda url, fps=None, **kw: _FakeStream(fam, **kw))
    srv = N(base_url="http://fake")
    assert "6 greedy steps compared" in gpu_check.case_video(srv, fam, {"dtd_criterion": "feature"})
    assert "6 greedy steps compared" in gpu_check.case_video(
        srv, fam, {"dtd_threshold": 0.1, "dtd_reference": "last_kept"}
    )
    for criterion in ("pixel", "feature"):
        assert "= reference" in gpu_check.case_eager_stream(srv, fam, criterion)
    if fam.qwen3:
        assert gpu_check.case_one_chunk_stream(srv, fam) == "prompt = reference, answer = reference"


def test_the_position_case_wants_a_400_naming_the_rotary_table(monkeypatch):
    import vllm_plugin.client
    from vllm_plugin.client import StreamHTTPError

    def refuse(url, fps=None, **kw):
        raise StreamHTTPError(400, "fps: positions would pass the model's rotary table")

    from analysis.harness import checks

    monkeypatch.setattr(checks, "assert_server_healthy", lambda srv: None)
    monkeypatch.setattr(vllm_plugin.client, "open_stream", refuse)
    assert "refused (400)" in gpu_check.case_position_refused(N(base_url="http://fake"), None)
    monkeypatch.setattr(vllm_plugin.client, "open_stream", lambda url, fps=None, **kw: N(close=lambda: None))
    with pytest.raises(AssertionError, match="was opened"):
        gpu_check.case_position_refused(N(base_url="http://fake"), None)
