"""vLLM plugin applying Differential Token Drop (TimeChat-Online) to video requests.

Installed with this project, vLLM loads :func:`register` (entry point ``vllm.general_plugins``) in
every process. It registers the DTD model classes; select one for a stock checkpoint with
``--hf-overrides '{"architectures": ["Qwen2_5_VLDTDForConditionalGeneration"]}'`` or start the server
with ``python -m vllm_plugin.serve --model PATH``, which does that for you.
"""

from __future__ import annotations

# stock architecture -> DTD architecture
DTD_ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLDTDForConditionalGeneration",
}
_CLASSES = {
    "Qwen2_5_VLDTDForConditionalGeneration": "vllm_plugin.qwen2_5_vl:Qwen2_5_VLDTDForConditionalGeneration",
}


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Idempotent: safe in every process, any number of times."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in _CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)  # by string: imported lazily where needed

    from vllm_plugin.entrypoints import install

    install()
    import os

    if "dtd_streams" in (os.environ.get("VLLM_PLUGINS") or "").split(","):
        from vllm_plugin.stream_forward import prepare_socket_dir

        prepare_socket_dir()  # before vLLM spawns its API-server processes, which inherit the path
