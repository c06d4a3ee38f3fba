"""Engine glue: one module per model family, named after vLLM's model module.

:data:`FAMILIES` maps a stock architecture to its DTD architecture and the class that implements
it (registered with vLLM's ``ModelRegistry`` by name, so nothing is imported until vLLM needs it).
Adding a family: a module here binding :mod:`vllm_plugin.models.base`'s mixins to the family's vLLM
classes, one entry below, and a tiny checkpoint recipe in ``analysis/harness/tiny_model.py``.
"""

from __future__ import annotations

# stock architecture -> (DTD architecture, "module:Class")
FAMILIES: dict[str, tuple[str, str]] = {
    "Qwen2_5_VLForConditionalGeneration": (
        "Qwen2_5_VLDTDForConditionalGeneration",
        "vllm_plugin.models.qwen2_5_vl:Qwen2_5_VLDTDForConditionalGeneration",
    ),
    "Qwen3VLForConditionalGeneration": (
        "Qwen3VLDTDForConditionalGeneration",
        "vllm_plugin.models.qwen3_vl:Qwen3VLDTDForConditionalGeneration",
    ),
    "Qwen3VLMoeForConditionalGeneration": (
        "Qwen3VLMoeDTDForConditionalGeneration",
        "vllm_plugin.models.qwen3_vl_moe:Qwen3VLMoeDTDForConditionalGeneration",
    ),
    "Qwen2VLForConditionalGeneration": (
        "Qwen2VLDTDForConditionalGeneration",
        "vllm_plugin.models.qwen2_vl:Qwen2VLDTDForConditionalGeneration",
    ),
}

# stock architecture -> DTD architecture
DTD_ARCHITECTURES: dict[str, str] = {stock: dtd for stock, (dtd, _) in FAMILIES.items()}
