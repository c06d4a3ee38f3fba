"""Qwen3-VL MoE with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen3_vl_moe.py``).

vLLM serves the MoE checkpoints (30B-A3B, 235B-A22B) with Qwen3-VL's multimodal processor and a
``Qwen3VLForConditionalGeneration`` subclass whose LLM is a mixture of experts: the family's rules are
Qwen3-VL's (:mod:`vllm_plugin.models.qwen3_vl`), bound to the MoE classes, with the MoE vision tower
for feature-level DTD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_plugin.models import qwen3_vl
from vllm_plugin.models.families import FamilySpec, TinyContext, TinyRecipe, VLLMClasses, lazy_classes, register_family
from vllm_plugin.models.qwen2_5_vl import TINY_TEXT
from vllm_plugin.models.vision import VisionTowerSpec

# The tiny checkpoint's LLM MLPs are 4 experts (2 per token). moe_intermediate_size 48: no fused expert
# matrix is square (hidden 128, 2 x 48), because transformers 5.19 reads the released layout by
# transposing only where the shapes disagree (a square one would load untransposed; measured).
# expert_layout "released": tiny_model.py saves the experts as Qwen released them (vLLM 0.32 reads that).
TINY_MOE = dict(
    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True
)  # real configs set it; vLLM reads it


def tiny_config(shape: Mapping[str, Any], ctx: TinyContext):
    config = qwen3_vl.qwen3_tiny_config("Qwen3VLMoeConfig")(shape, ctx)
    config.text_config.tie_word_embeddings = False  # its text config ties embeddings by default; the model does not
    return config


SPEC = register_family(
    FamilySpec.named(
        "qwen3_vl_moe",
        "Qwen3VLMoe",
        VisionTowerSpec("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeVisionModel", deepstack=True),
        vllm=VLLMClasses(  # Qwen3-VL's processor and dummy inputs
            processing_info="vllm.model_executor.models.qwen3_vl_moe:Qwen3VLMoeProcessingInfo",
            processor="vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor",
            dummy_inputs="vllm.model_executor.models.qwen3_vl:Qwen3VLDummyInputsBuilder",
            model="vllm.model_executor.models.qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration",
        ),
        reference_pipeline=qwen3_vl.SPEC.reference_pipeline,
        patch_layout=qwen3_vl.SPEC.patch_layout,
        patch_size=qwen3_vl.SPEC.patch_size,
        position_span=qwen3_vl.SPEC.position_span,
        prompt_replacement=qwen3_vl.SPEC.prompt_replacement,
        model_mixins=qwen3_vl.SPEC.model_mixins,
        processor_requires=qwen3_vl.SPEC.processor_requires,
        tiny=TinyRecipe(
            sizes={
                "test": dict(
                    text={**TINY_TEXT["test"], **TINY_MOE, "moe_intermediate_size": 48},
                    vision=qwen3_vl.TINY_VISION,
                    vocab_words=1024,
                    video_processor=qwen3_vl.TINY_VIDEO_PROCESSOR,
                    expert_layout="released",
                )
            },
            config=tiny_config,
            processor=qwen3_vl.qwen3_tiny_processor,
        ),
    )
)
# the DTD classes (SPEC.class_names), built when first asked for
__getattr__ = lazy_classes(SPEC)
