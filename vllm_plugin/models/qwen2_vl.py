"""Qwen2-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen2_vl.py``).

The DTD behaviour is in :mod:`vllm_plugin.models.base`; this module binds it to the family's vLLM
classes, checks them against the installed vLLM, and registers the processor. Select it for any
Qwen2-VL checkpoint with ``--hf-overrides '{"architectures": ["Qwen2VLDTDForConditionalGeneration"]}'``
(``python -m vllm_plugin.serve`` does that).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
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


class DTDQwen2VLProcessingInfo(DTDProcessingInfoMixin, Qwen2VLProcessingInfo):
    pass


class DTDQwen2VLMultiModalProcessor(DTDMultiModalProcessorMixin, Qwen2VLMultiModalProcessor):
    vision_tower = VisionTowerSpec("transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel")


@MULTIMODAL_REGISTRY.register_processor(
    DTDQwen2VLMultiModalProcessor,
    info=DTDQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class Qwen2VLDTDForConditionalGeneration(DTDModelMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose video prompts carry only the tokens that survive DTD."""


vllm_patches.check_overrides(DTDQwen2VLProcessingInfo, Qwen2VLProcessingInfo)
vllm_patches.check_overrides(DTDQwen2VLMultiModalProcessor, Qwen2VLMultiModalProcessor)
vllm_patches.check_overrides(Qwen2VLDTDForConditionalGeneration, Qwen2VLForConditionalGeneration)
