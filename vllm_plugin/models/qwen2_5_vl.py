"""Qwen2.5-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen2_5_vl.py``).

The DTD behaviour is in :mod:`vllm_plugin.models.base`; this module binds it to the family's vLLM
classes, checks them against the installed vLLM, and registers the processor. Select it for any
Qwen2.5-VL checkpoint with ``--hf-overrides '{"architectures": ["Qwen2_5_VLDTDForConditionalGeneration"]}'``
(``python -m vllm_plugin.serve`` does that).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import ProcessorInputs
from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig

from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.models.base import DTDModelMixin, DTDMultiModalProcessorMixin, DTDProcessingInfoMixin
from vllm_plugin.models.vision import VisionTowerSpec

# fields the mixins read or replace
vllm_patches.require(EncoderCudaGraphConfig, "modalities")
vllm_patches.require(EncoderCudaGraphConfig, "max_frames_per_video")
vllm_patches.require(ProcessorInputs, "hf_processor_mm_kwargs")
vllm_patches.check_sequential_video_encoding()  # DTDModelMixin.requires_sequential_video_encoding


class DTDQwen2_5_VLProcessingInfo(DTDProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class DTDQwen2_5_VLMultiModalProcessor(DTDMultiModalProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    vision_tower = VisionTowerSpec("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel")


@MULTIMODAL_REGISTRY.register_processor(
    DTDQwen2_5_VLMultiModalProcessor,
    info=DTDQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class Qwen2_5_VLDTDForConditionalGeneration(DTDModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose video prompts carry only the tokens that survive DTD."""


vllm_patches.check_overrides(DTDQwen2_5_VLProcessingInfo, Qwen2_5_VLProcessingInfo)
vllm_patches.check_overrides(DTDQwen2_5_VLMultiModalProcessor, Qwen2_5_VLMultiModalProcessor)
vllm_patches.check_overrides(Qwen2_5_VLDTDForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
