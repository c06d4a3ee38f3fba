"""vLLM plugin applying Differential Token Drop (TimeChat-Online) to video requests.

Installed with this project, vLLM loads :func:`register` (entry point ``vllm.general_plugins``) in
every process. It only registers the DTD model classes (:mod:`vllm_plugin.models`); select one for
a stock checkpoint with ``--hf-overrides '{"architectures": ["Qwen2_5_VLDTDForConditionalGeneration"]}'``
or start the server with ``python -m vllm_plugin.serve --model PATH``, which does that for you.

Layers: :mod:`vllm_plugin.core` (the DTD math, torch only), :mod:`vllm_plugin.models` (one module
per model family), :mod:`vllm_plugin.entrypoints` (API-server side: request options, stats, the one
module of vLLM patches), :mod:`vllm_plugin.streams` (live streams). vLLM internals are patched only
in an API-server process that serves a DTD architecture or the stream routes
(:mod:`vllm_plugin.entrypoints.vllm_patches`).
"""

from __future__ import annotations

__all__ = ["DTD_ARCHITECTURES", "register"]


def __getattr__(name: str):
    if name == "DTD_ARCHITECTURES":  # stock -> DTD architecture, from the family registry (read on use)
        from vllm_plugin.models import dtd_architectures

        return dtd_architectures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Idempotent: safe in every process, any number of times.

    Refuses a vLLM release the plugin was not written for (:class:`~vllm_plugin.entrypoints.vllm_patches.VLLMMismatch`;
    ``DTD_ALLOW_ANY_VLLM=1`` overrides, with a warning)."""
    from vllm import ModelRegistry

    from vllm_plugin.entrypoints.vllm_patches import check_vllm_version

    check_vllm_version()

    from vllm_plugin.models import register_with_vllm

    register_with_vllm(ModelRegistry)  # every family's DTD class, by string: imported lazily where needed

    import os

    if "dtd_streams" in (os.environ.get("VLLM_PLUGINS") or "").split(","):
        from vllm_plugin.streams.forward import prepare_socket_dir

        prepare_socket_dir()  # before vLLM spawns its API-server processes, which inherit the path
