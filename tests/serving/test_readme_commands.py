"""The README's CPU serving commands, run as printed (a new user's first try): build the tiny checkpoint,
start the launcher with NO ``VLLM_CPU_KVCACHE_SPACE`` (it sizes the KV cache from the free memory and
says so), and send the README's ``curl``. Only the port differs (the README's 8000 may be taken)."""

import os
import re
import signal
import subprocess
import time

import requests

from analysis.harness.server import free_port
from conftest import REPO


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out, current = [], ""
    for line in joined.splitlines():
        current += line + "\n"
        if current.count("'") % 2 == 0:  # a quoted JSON body may span lines
            if current.strip():
                out.append(current.strip())
            current = ""
    return out


def test_the_readme_cpu_serving_commands_work_as_printed(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = next(b for b in _blocks(readme, "bash") if "vllm_plugin.serve --model .cache/tiny" in b)
    build, serve, curl = _commands(block)
    assert "analysis.harness.tiny_model" in build and "vllm_plugin.serve" in serve and curl.startswith("curl")
    assert "VLLM_CPU_KVCACHE_SPACE" not in block and "--gpu-memory-utilization" not in serve

    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    subprocess.run(["bash", "-c", build], cwd=REPO, env=env, check=True, timeout=300)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"{serve} --port {port}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, f"the README's command exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            raise AssertionError(f"not up in 400 s:\n{log.read_text()[-3000:]}")
        text = log.read_text()
        chosen = re.search(r"KV cache (\d+) GiB \(half of the ([\d.]+) GiB free", text)
        assert chosen, "the launcher did not say which KV cache it chose"
        assert 1 <= int(chosen.group(1)) <= float(chosen.group(2)) / 2 + 1
        assert f"Explicitly set ({int(chosen.group(1))}.0/" in text  # vLLM's CPU worker took that size
        res = subprocess.run(
            ["bash", "-c", curl.replace("localhost:8000", f"localhost:{port}")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0 and res.stdout.startswith("HTTP/1.1 200"), res.stdout[:500] + res.stderr[-500:]
        assert "x-dtd-stats:" in res.stdout and '"kept"' in res.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
