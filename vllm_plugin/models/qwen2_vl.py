"""Qwen2-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen2_vl.py``).

The family's :class:`~vllm_plugin.models.families.FamilySpec`: the DTD behaviour is
:mod:`vllm_plugin.models.base`'s, bound to the family's vLLM classes when vLLM first asks for them.
What differs from Qwen2.5-VL is in the checkpoint, not in the rules: no window attention, no
``tokens_per_second`` (a video's temporal position is the step index; the mixins read that from the
config). Select it for any Qwen2-VL checkpoint with
``--hf-overrides '{"architectures": ["Qwen2VLDTDForConditionalGeneration"]}'``
(``python -m vllm_plugin.serve`` does that).
"""

from __future__ import annotations

from vllm_plugin.models.families import FamilySpec, TinyRecipe, lazy_classes, register_family
from vllm_plugin.models.qwen2_5_vl import TINY_TEXT, qwen2_tiny_config, qwen2_tiny_processor
from vllm_plugin.models.vision import VisionTowerSpec

# Qwen2-VL's vision config: no window attention, no tokens_per_second (temporal position = step index).
TINY_VISION = dict(
    depth=2, embed_dim=128, num_heads=2, mlp_ratio=2, **TinyRecipe.vision_patches(), hidden_act="quick_gelu"
)

SPEC = register_family(
    FamilySpec.named(  # patch layout and size: the defaults (Qwen2-VL's; OpenAI CLIP's mean / std)
        "qwen2_vl",
        "Qwen2VL",
        VisionTowerSpec("transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel"),
        reference_pipeline="analysis.lib.reference:Qwen2VLReferencePipeline",
        tiny=TinyRecipe(
            sizes={
                size: dict(text=TINY_TEXT[size], vision=TINY_VISION, vocab_words=1024) for size in ("test", "bench")
            },
            config=qwen2_tiny_config("Qwen2VLConfig", "hidden_size"),  # Qwen2-VL: the merger's output size
            processor=qwen2_tiny_processor("Qwen2VLProcessor"),
        ),
    )
)
# the DTD classes (SPEC.class_names), built when first asked for
__getattr__ = lazy_classes(SPEC)
