"""Qwen3-VL MoE with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen3_vl_moe.py``).

vLLM serves the MoE checkpoints (30B-A3B, 235B-A22B) with Qwen3-VL's multimodal processor and a
``Qwen3VLForConditionalGeneration`` subclass whose LLM is a mixture of experts: the DTD glue is
Qwen3-VL's (:mod:`vllm_plugin.models.qwen3_vl`), bound to the MoE classes, with the MoE vision tower
for feature-level DTD.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder, Qwen3VLMultiModalProcessor
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.models.base import DTDModelMixin, DTDProcessingInfoMixin
from vllm_plugin.models.qwen3_vl import DTDQwen3VLMultiModalProcessor, DTDTimestampedPositionsMixin
from vllm_plugin.models.vision import VisionTowerSpec


class DTDQwen3VLMoeProcessingInfo(DTDProcessingInfoMixin, Qwen3VLMoeProcessingInfo):
    pass


class DTDQwen3VLMoeMultiModalProcessor(DTDQwen3VLMultiModalProcessor):
    vision_tower = VisionTowerSpec("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeVisionModel",
                                   deepstack=True)


@MULTIMODAL_REGISTRY.register_processor(
    DTDQwen3VLMoeMultiModalProcessor,
    info=DTDQwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class Qwen3VLMoeDTDForConditionalGeneration(DTDTimestampedPositionsMixin, DTDModelMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL MoE whose video prompts carry only the tokens that survive DTD."""


vllm_patches.check_overrides(DTDQwen3VLMoeProcessingInfo, Qwen3VLMoeProcessingInfo)
vllm_patches.check_overrides(DTDQwen3VLMoeMultiModalProcessor, Qwen3VLMultiModalProcessor)
vllm_patches.check_overrides(Qwen3VLMoeDTDForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
