"""Start vLLM's OpenAI-compatible server with DTD on.

    python -m vllm_plugin.serve --model PATH [--dtd-streams] [any vllm serve argument]

Adds, unless given: ``--hf-overrides`` selecting the DTD architecture of the checkpoint (read from
its config.json), and ``--middleware vllm_plugin.entrypoints.middleware.DTDStatsMiddleware`` (the
``x-dtd-stats`` response header); on vLLM's CPU platform, a KV cache that fits the free memory when
none is given (:func:`cpu_kv_cache`). Everything else goes to vLLM unchanged. Server-wide DTD
defaults: ``--mm-processor-kwargs '{"dtd_threshold": 0.05, "dtd_metric": "l1"}'``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from vllm_plugin import DTD_ARCHITECTURES, settings

MIDDLEWARE = "vllm_plugin.entrypoints.middleware.DTDStatsMiddleware"
logger = logging.getLogger("vllm.dtd_plugin")


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def dtd_architecture(model: str) -> str | None:
    """The DTD architecture for a checkpoint (from its config.json), or None when its family has none."""
    cfg_path = Path(model) / "config.json"
    archs: list[str] = []
    if cfg_path.is_file():
        archs = json.loads(cfg_path.read_text()).get("architectures", []) or []
    else:  # a hub id or remote path: let transformers resolve it (may use its local cache)
        from transformers import AutoConfig

        archs = getattr(AutoConfig.from_pretrained(model), "architectures", []) or []
    for a in archs:
        if a in DTD_ARCHITECTURES:
            return DTD_ARCHITECTURES[a]
        if a in DTD_ARCHITECTURES.values():
            return a
    logger.warning(
        "vllm_plugin.serve: %s has architectures %s, which have no DTD class (DTD serves %s): "
        "serving it stock, without DTD",
        model,
        archs,
        sorted(DTD_ARCHITECTURES),
    )
    return None


STREAMS_FLAG = "--dtd-streams"


def enable_streams(argv: list[str], env) -> list[str]:
    """``--dtd-streams``: allow-list the stream routes (endpoint plugins are opt-in through
    ``VLLM_PLUGINS``, which then also lists the general plugin) and let a prompt hold a stream's
    video chunks."""
    argv = [a for a in argv if a != STREAMS_FLAG]
    names = [n for n in (env.get("VLLM_PLUGINS") or "").split(",") if n]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*names, "dtd", "dtd_streams"]))
    if _arg(argv, "--limit-mm-per-prompt") is None:
        chunks = settings.get("DTD_STREAM_MAX_CHUNKS", env)
        argv += ["--limit-mm-per-prompt", json.dumps({"video": chunks, "image": 1})]
    return argv


def build_argv(argv: list[str], streams: bool = False) -> list[str]:
    model = _arg(argv, "--model")
    if model is None:
        raise SystemExit("usage: python -m vllm_plugin.serve --model PATH [vllm serve arguments]")
    out = list(argv)
    if _arg(out, "--hf-overrides") is None:
        arch = dtd_architecture(model)
        if arch is None and streams:
            raise SystemExit(
                f"vllm_plugin.serve: --dtd-streams needs a model family with DTD; {model} has none "
                f"(DTD serves {sorted(DTD_ARCHITECTURES)})"
            )
        raw = _arg(out, "--mm-processor-kwargs")
        if arch is None and raw and any(k.startswith("dtd_") for k in json.loads(raw)):
            raise SystemExit(
                f"vllm_plugin.serve: --mm-processor-kwargs sets DTD options, but {model} has no DTD class "
                f"(DTD serves {sorted(DTD_ARCHITECTURES)}): it would be served without DTD"
            )
        if arch is not None:
            out += ["--hf-overrides", json.dumps({"architectures": [arch]})]
    if MIDDLEWARE not in out:
        out += ["--middleware", MIDDLEWARE]
    return out


KV_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
KV_FRACTION = 0.5  # of the memory free at start, less the checkpoint's weights


def checkpoint_bytes(model: str) -> int:
    """Bytes of a local checkpoint's weight files (0 for a hub id: nothing to measure here)."""
    path = Path(model)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for f in path.glob(pattern))


def cpu_kv_cache(argv: list[str], env, available_bytes: int, on_cpu: bool) -> tuple[list[str], str | None]:
    """On vLLM's CPU platform, where neither ``VLLM_CPU_KVCACHE_SPACE`` nor ``--gpu-memory-utilization``
    (nor ``--kv-cache-memory-bytes``) is given: a KV cache that fits the machine as it is, instead of
    vLLM's default (92% of ALL memory reserved, refused at start when other processes hold more than
    8%): half of the memory free now less the checkpoint's weights, in whole GiB, at least 1 GiB, as
    ``--kv-cache-memory-bytes``. Returns the arguments and the line to log (None: nothing chosen)."""
    if not on_cpu or (env.get("VLLM_CPU_KVCACHE_SPACE") or "").strip():
        return argv, None
    if any(_arg(argv, flag) is not None for flag in KV_FLAGS):
        return argv, None
    model = _arg(argv, "--model") or ""
    weights = checkpoint_bytes(model)
    gib = max(1, int((available_bytes - weights) * KV_FRACTION) >> 30)
    message = (
        f"vllm_plugin.serve: vLLM's CPU platform, and neither VLLM_CPU_KVCACHE_SPACE nor "
        f"--gpu-memory-utilization given: KV cache {gib} GiB (half of the {available_bytes / 2**30:.1f} GiB "
        f"free less {weights / 2**30:.1f} GiB of weights); set VLLM_CPU_KVCACHE_SPACE=<GiB> to choose"
    )
    return [*argv, "--kv-cache-memory-bytes", str(gib << 30)], message


def main(argv: list[str] | None = None) -> None:
    """Run ``vllm serve`` with these arguments, through vLLM's own ``serve`` subcommand, so that
    ``--api-server-count`` / ``--data-parallel-size`` start several API-server processes exactly as
    ``vllm serve`` does. (The ``vllm`` console script itself cannot start where vLLM is installed
    as ``vllm-cpu``: it asks for the version of a distribution named ``vllm``.)"""
    import os

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    streams = STREAMS_FLAG in argv
    if streams:
        argv = enable_streams(argv, os.environ)
    argv = build_argv(argv, streams=streams)
    import psutil
    from vllm.platforms import current_platform

    argv, kv_message = cpu_kv_cache(argv, os.environ, psutil.virtual_memory().available, current_platform.is_cpu())
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="python -m vllm_plugin.serve", description=__doc__)
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    if kv_message:
        logger.info(kv_message)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
