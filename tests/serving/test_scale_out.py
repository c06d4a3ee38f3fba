"""Past one machine (issue 29, item 3): vLLM's data parallelism across nodes, on loopback.

Two processes started the way a user starts two nodes, both through the plugin's launcher:

* the head, ``python -m vllm_plugin.serve --dtd-streams --data-parallel-size 2
  --data-parallel-size-local 1 --data-parallel-address 127.0.0.1 --data-parallel-rpc-port P``:
  the API server, vLLM's DP coordinator and engine rank 0;
* an engine node, the same with ``--headless --data-parallel-start-rank 1``: engine rank 1, no HTTP.
  vLLM loads the plugin there through its ``vllm.general_plugins`` entry point (the DTD model
  classes) and the launcher selects the DTD architecture, as on the head.

Streams are pinned to ranks (``data_parallel_rank`` in their status) and both ranks answer, the
headless one with the head's model. Then the headless process is killed (SIGKILL of its process
group: a lost node) in the middle of an answer, and every wait after that is bounded: the answer in
flight and the next question on that rank end with a clear error (or the server reports itself
unhealthy), never a hang; what does not touch the dead rank keeps answering.

vLLM 0.32 itself never notices a remote engine that vanished: nothing beats on its ZMQ sockets, a
message to a gone engine is dropped (a ROUTER socket without ROUTER_MANDATORY), and ``/health`` looks
at the local engines only. The bound comes from the plugin: :data:`ENGINE_TIMEOUT_ENV`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import requests
import urllib3

from analysis.harness.server import ServerError, VLLMServer, answers, free_port
from conftest import BLOCK_SIZE
from vllm_plugin.client import StreamClient, StreamHTTPError, open_stream

DP = 2
# The plugin's bound on an engine that stops answering (seconds without any output for a request it
# sent), after which the request is aborted and the stream's caller gets a 503 naming the rank. The
# name follows Limits.from_env (DTD_STREAM_<FIELD>): the field is the plugin's to add (issue 29, item 3).
ENGINE_TIMEOUT_ENV = "DTD_STREAM_ENGINE_TIMEOUT_S"
ENGINE_TIMEOUT_S = 15
# Every wait after the kill: an error (or an unhealthy server) within this, never longer. A question on
# the dead rank may first wait for the request ahead of it on its stream (an answer or an eager prefill
# stuck on that rank) to time out: two engine bounds, plus the tiny model's work on 2 shared cores.
ERROR_WITHIN_S = 120.0
# one view, repeated: DTD keeps the first step and drops most of the next ones (a prompt of a few blocks)
STATIC = np.random.default_rng(7).integers(0, 255, (112, 168, 3), dtype=np.uint8)


class HeadlessRank(VLLMServer):
    """An engine node (``--headless``): it serves no HTTP, so it is "healthy" while its process runs.
    Whether it joined shows at the head: the head answers ``/health`` only once every rank's engine,
    remote ones included, has said READY."""

    def healthy(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _cpu_bind(node: int) -> dict[str, str]:
    """Half of this process's CPUs for each node's worker, as two machines would have. vLLM's "auto"
    binding would give both workers the same cores: each process holds one engine, local rank 0."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    if half == 0:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus[node * half : (node + 1) * half])}


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory):
    """(head, headless): the head's API server reaches engine rank 0 (its own) and rank 1 (the other
    process), over TCP on 127.0.0.1."""
    logs = tmp_path_factory.mktemp("scale_out")
    rpc_port = free_port()
    # one set of engine flags for both nodes: vLLM checks no flag across the ranks of a dense model
    node_args = [
        "--dtd-streams",
        "--block-size",
        str(BLOCK_SIZE),
        "--seed",
        "0",
        "--data-parallel-size",
        str(DP),
        "--data-parallel-size-local",
        "1",
        "--data-parallel-address",
        "127.0.0.1",
        "--data-parallel-rpc-port",
        str(rpc_port),
    ]
    headless = HeadlessRank(
        tiny_model_path,
        node_args + ["--headless", "--data-parallel-start-rank", "1"],
        module="vllm_plugin.serve",
        log_path=logs / "rank1_headless.log",
        env=_cpu_bind(1),
    )
    # one API server (vLLM's default is one per DP rank): half the API-server memory on this machine
    head = VLLMServer(
        tiny_model_path,
        node_args + ["--api-server-count", "1"],
        module="vllm_plugin.serve",
        log_path=logs / "head.log",
        env={ENGINE_TIMEOUT_ENV: str(ENGINE_TIMEOUT_S), **_cpu_bind(0)},
    )
    try:
        headless.start()  # returns at once; its engine waits (up to 5 min) for the head's handshake
        try:
            head.start()  # bounded: startup_timeout
        except ServerError as e:
            raise ServerError(
                f"{e}\n--- the headless rank 1 ({headless.log_path}) ---\n{headless.log_tail()}"
            ) from None
        assert headless.healthy(), f"the headless rank exited:\n{headless.log_tail()}"
        yield head, headless
    finally:
        head.stop()
        headless.stop()


def _open_on_every_rank(base: str, **settings) -> dict[int, StreamClient]:
    """Open streams until each rank holds one (a stream's rank comes from its id); close the others."""
    pinned: dict[int, StreamClient] = {}
    spare: list[StreamClient] = []
    for _ in range(24):  # all on one rank: probability 2 ** -23
        s = open_stream(base, fps=2.0, **settings)
        s.timeout = ERROR_WITHIN_S
        rank = s.status()["data_parallel_rank"]
        assert rank in range(DP), f"a stream of a {DP}-rank server is pinned to {rank!r}"
        if rank in pinned:
            spare.append(s)
        else:
            pinned[rank] = s
        if len(pinned) == DP:
            break
    for s in spare:
        s.close()
    assert sorted(pinned) == list(range(DP)), f"24 streams, ranks {sorted(pinned)} only"
    return pinned


def _close(streams) -> None:
    for s in streams:
        try:
            s.close()
        except (requests.RequestException, RuntimeError):
            pass  # after the kill: the server may have gone (that outcome is the test's to judge)


def _engine_prompt_tokens(srv) -> list[float]:
    """vLLM's prompt-token counter of each engine (label ``engine``: the DP rank), at the head."""
    text = requests.get(srv.base_url + "/metrics", timeout=30).text
    out = [0.0] * DP
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_total{"):
            engine = int(line.split('engine="', 1)[1].split('"', 1)[0])
            out[engine] += float(line.rsplit(" ", 1)[1])
    return out


def test_streams_are_pinned_to_ranks_and_the_headless_rank_answers_with_the_heads_model(cluster):
    """Both ranks answer every question of their streams, each question only on its stream's rank
    (the counters of each engine, read at the head) with its past from that engine's prefix cache;
    and the headless rank answers exactly as the head's rank does (greedy, the same frames and
    question): it serves the DTD class and weights the head serves, loaded through the entry point."""
    head, _ = cluster
    streams = _open_on_every_rank(head.base_url, prefill="lazy")  # lazy: each question prefills its frames
    try:
        first = {}
        for rank, s in streams.items():
            added = s.push(np.stack([STATIC] * 4))  # 2 temporal steps, the second identical to the first
            full = s.status()["tokens_per_step"]
            assert added["kept_per_step"][1] < full, (added, full)  # DTD dropped tokens: the engine gets fewer
            before = _engine_prompt_tokens(head)
            a = s.ask("What is shown?", max_tokens=4, return_token_ids=True)
            b = s.ask("And now?", max_tokens=4)
            moved = [x - y for x, y in zip(_engine_prompt_tokens(head), before)]
            asked = a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"]
            # on the stream's rank only (at least the two questions: a prefill of the same stream counts there too)
            assert moved[1 - rank] == 0 and moved[rank] >= asked, (rank, moved, asked)
            assert b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, b["usage"]  # the past was on that rank
            assert s.status()["data_parallel_rank"] == rank and s.status()["questions"] == 2
            first[rank] = a["stream_state"]
        assert first[0]["prompt_token_ids"] == first[1]["prompt_token_ids"]  # the same request to both ranks
        assert first[1]["completion_token_ids"] == first[0]["completion_token_ids"], (
            "the headless rank answered otherwise than the head's rank: it does not serve the same model "
            f"(rank 0 {first[0]['completion_token_ids']}, rank 1 {first[1]['completion_token_ids']})"
        )
    finally:
        _close(streams.values())


def _sse(resp: requests.Response):
    for raw in resp.iter_lines():
        if raw.startswith(b"data: "):
            if raw[6:] == b"[DONE]":
                return
            yield json.loads(raw[6:])


def _ask(s: StreamClient, question: str) -> requests.Response:
    return requests.post(
        s.url + "/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "max_tokens": 4},
        timeout=(10, ERROR_WITHIN_S),
    )


def _hung(e: BaseException) -> bool:
    """A read that timed out (requests raises a ConnectionError for one inside a streamed body)."""
    return isinstance(e, requests.exceptions.ReadTimeout) or any(
        isinstance(a, urllib3.exceptions.ReadTimeoutError) for a in e.args
    )


def _kill_node(node: VLLMServer) -> None:
    """SIGKILL the node's process group (its launcher, EngineCore_DP1 and its worker): a lost machine.
    Nothing is sent to the head, as when a machine's power goes."""
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=30)


def test_a_killed_headless_rank_ends_its_requests_with_clear_errors_not_a_hang(cluster):
    """Rank 1's node is lost in the middle of an answer. The answer in flight ends with an error event,
    and the next question on that rank (after more frames, whose eager prefill meets the dead rank
    too) with a 4xx/5xx naming the problem, each within :data:`ERROR_WITHIN_S`; or the server reports
    itself unhealthy. While it reports healthy, rank 0's stream keeps answering. Runs last: it kills
    the module's headless rank."""
    head, headless = cluster
    base = head.base_url
    streams = _open_on_every_rank(base, prefill="eager")
    lost, kept = streams[1], streams[0]
    try:
        for s in streams.values():
            s.push(np.stack([STATIC] * 4))
            assert not s.wait_prefilled(timeout=ERROR_WITHIN_S)["prefill_pending"], "eager prefill did not catch up"

        # an answer in flight on rank 1, killed after its first chunk. Long (ignore_eos, most of the test
        # servers' 16384-token context): the engine decodes far ahead of what the client has read (4000 tokens
        # were all decoded before the kill in one CI run), so the answer must outlast the kill by far
        body = {
            "messages": [{"role": "user", "content": "Describe everything."}],
            "max_tokens": 16000,
            "stream": True,
            "ignore_eos": True,
        }
        with requests.post(lost.url + "/chat/completions", json=body, stream=True, timeout=(10, ERROR_WITHIN_S)) as r:
            assert r.status_code == 200, r.text
            events = _sse(r)
            started = next(events, {})
            assert "choices" in started, started  # generating on rank 1
            _kill_node(headless)
            killed = time.monotonic()
            rest = []
            try:
                for e in events:
                    rest.append(e)
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                if _hung(e):
                    pytest.fail(
                        f"the answer in flight on the killed rank hung: nothing for {ERROR_WITHIN_S:.0f} s\n"
                        + head.log_tail(30)
                    )
                assert not answers(base), f"the answer was torn off while the server still reports healthy: {e}"
        done = [e for e in rest if e.get("usage")]
        assert not (done and done[-1]["usage"]["completion_tokens"] == body["max_tokens"]), (
            "the answer was complete before the kill: the test killed nothing in flight (raise max_tokens)"
        )
        errors = [e["error"] for e in rest if "error" in e]
        clear = bool(errors) and bool(str(errors[0].get("message", "")).strip())
        assert clear or not answers(base), (
            "the answer in flight on the dead rank ended without an error, the server still healthy: "
            f"{rest[-2:] if rest else 'no event after the kill'}"
        )
        assert time.monotonic() - killed <= ERROR_WITHIN_S

        # frames keep arriving on the dead rank's stream (an append does not touch the engine; its
        # eager prefill, started in the background, does): the next question errs within the bound
        try:
            lost.push(np.stack([STATIC] * 2))
        except StreamHTTPError:  # a clear 4xx/5xx is as good: the question below decides
            pass
        except requests.exceptions.ReadTimeout:
            pytest.fail(f"an append to the dead rank's stream hung past {ERROR_WITHIN_S:.0f} s\n{head.log_tail(30)}")
        except requests.exceptions.ConnectionError:
            assert not answers(base), "an append's connection failed while the server reports healthy"
        t0 = time.monotonic()
        try:
            r = _ask(lost, "Still there?")
        except requests.exceptions.ReadTimeout:
            pytest.fail(
                f"a question on the dead rank hung past {ERROR_WITHIN_S:.0f} s (no error, no answer)\n"
                + head.log_tail(30)
            )
        except requests.exceptions.ConnectionError:
            assert not answers(base), "the connection failed while the server reports healthy"
        else:
            assert r.status_code >= 400, f"a question on the dead rank got {r.status_code}: {r.text[:300]}"
            try:
                message = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                pytest.fail(f"a question on the dead rank got {r.status_code} without an error message: {r.text[:300]}")
            assert message.strip(), r.text
            print(f"the dead rank's question: {r.status_code} after {time.monotonic() - t0:.1f} s: {message}")

        # what does not touch the dead rank keeps answering (unless the server declared itself down)
        if answers(base):
            assert requests.get(lost.url, timeout=30).status_code == 200  # the stream's state, no engine
            kept.push(np.stack([STATIC] * 2))
            assert not kept.wait_prefilled(timeout=ERROR_WITHIN_S)["prefill_pending"]
            r = _ask(kept, "Still there?")
            assert r.status_code == 200, f"rank 0 stopped answering after rank 1 died: {r.status_code} {r.text[:300]}"
    finally:
        _close(streams.values())
