"""Engine glue: one module per model family, named after vLLM's model module, each declaring and
registering the family's :class:`~vllm_plugin.models.families.FamilySpec` (the registry:
:mod:`vllm_plugin.models.families`); :mod:`vllm_plugin.models.base` holds the mixins every family's
DTD classes are built from, :mod:`vllm_plugin.models.vision` the API server's vision tower.

Adding a family: its module here (the spec, and any rule where it differs from Qwen2.5-VL); nothing
else lists families. Nothing imported here imports vLLM.
"""

from __future__ import annotations


def register_with_vllm(model_registry) -> None:
    """Register every family's DTD architecture with vLLM's ``ModelRegistry``, by ``"module:Class"``:
    vLLM imports the class (and so builds it) only where it needs the model."""
    from vllm_plugin.models.families import families

    supported = set(model_registry.get_supported_archs())
    for spec in families():
        if spec.dtd_architecture not in supported:
            model_registry.register_model(spec.dtd_architecture, spec.model_class)


def dtd_architectures() -> dict[str, str]:
    """Stock architecture -> the DTD architecture serving it, of every family."""
    from vllm_plugin.models.families import families

    return {stock: spec.dtd_architecture for spec in families() for stock in spec.hf_architectures}


def __getattr__(name: str):
    if name == "DTD_ARCHITECTURES":  # stock -> DTD architecture (the registry's, read on use)
        return dtd_architectures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
