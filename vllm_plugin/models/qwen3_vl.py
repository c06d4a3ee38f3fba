"""Qwen3-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen3_vl.py``).

The DTD behaviour is in :mod:`vllm_plugin.models.base`; this module binds it to the family's vLLM
classes and adds what Qwen3-VL does differently from Qwen2.5-VL:

* **prompt**: every temporal step is its own group, ``<t.t seconds><|vision_start|> <|video_pad|>×kept
  <|vision_end|>``; the step's timestamp text stays when DTD keeps none of its tokens (the group is
  then empty), as vLLM's own EVS pruning leaves it: the model still reads that the moment passed.
* **positions**: time is in that text, each step's grid restarts the temporal section; survivors and
  text keep the positions they have in the full prompt
  (:func:`vllm_plugin.core.timestamped_mrope_positions`).
* **DeepStack**: the vision tower's output rows carry the intermediate-layer features after the main
  ones (vLLM's layout), so keeping a row keeps it at every level; feature-level DTD decides on the
  main output (:class:`vllm_plugin.models.vision.VisionTowerSpec` ``deepstack``).

Select it for any Qwen3-VL checkpoint with
``--hf-overrides '{"architectures": ["Qwen3VLDTDForConditionalGeneration"]}'`` (``python -m
vllm_plugin.serve`` does that). The MoE checkpoints: :mod:`vllm_plugin.models.qwen3_vl_moe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import ProcessorInputs
from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig

from vllm_plugin.core import timestamped_mrope_positions, timestamped_position_span
from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.models.base import MASK_KEY, DTDModelMixin, DTDMultiModalProcessorMixin, DTDProcessingInfoMixin
from vllm_plugin.models.vision import VisionTowerSpec

# fields and helpers the family glue reads
vllm_patches.require(EncoderCudaGraphConfig, "modalities")
vllm_patches.require(EncoderCudaGraphConfig, "max_frames_per_video")
vllm_patches.require(ProcessorInputs, "hf_processor_mm_kwargs")
vllm_patches.require(Qwen3VLMultiModalProcessor, "get_video_repl")
vllm_patches.check_sequential_video_encoding()  # DTDModelMixin.requires_sequential_video_encoding


def step_text_lens(item_tokens: Sequence[int], kept_per_step: Sequence[int], vision_start_id: int, video_id: int) -> list[int]:
    """Text tokens around the steps of one Qwen3-VL video placeholder, for
    :func:`vllm_plugin.core.timestamped_mrope_positions`: T + 1 counts (before each step's grid, up to
    and including its ``<|vision_start|>``; after the last grid).

    Args:
        item_tokens: the item's placeholder tokens (``mm_position``'s range of the prompt).
        kept_per_step: kept tokens of each of the T steps.
    """
    starts = [i for i, tok in enumerate(item_tokens) if tok == vision_start_id]
    if len(starts) != len(kept_per_step):
        raise ValueError(f"the video placeholder has {len(starts)} frame groups, its grid {len(kept_per_step)} steps")
    lens, end = [], 0
    for s, kept in zip(starts, kept_per_step):
        grid = item_tokens[s + 1 : s + 1 + kept]
        if len(grid) != kept or any(tok != video_id for tok in grid):
            raise ValueError(f"frame group at {s} does not hold its {kept} video tokens")
        lens.append(s + 1 - end)
        end = s + 1 + kept
    lens.append(len(item_tokens) - end)
    return lens


class DTDQwen3VLProcessingInfo(DTDProcessingInfoMixin, Qwen3VLProcessingInfo):
    pass


class DTDQwen3VLMultiModalProcessor(DTDMultiModalProcessorMixin, Qwen3VLMultiModalProcessor):
    vision_tower = VisionTowerSpec("transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel", deepstack=True)

    def _dtd_replacement(self, mask: torch.Tensor, out_item):
        """Each step's group with its kept tokens only; a step that keeps none keeps its timestamp
        and an empty ``<|vision_start|><|vision_end|>``."""
        hf_config = self.info.get_hf_config()
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[int(k) for k in mask.flatten(1).sum(1).tolist()],
            timestamps=out_item["timestamps"].data,
            tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=hf_config.vision_start_token_id,
            vision_end_token_id=hf_config.vision_end_token_id,
            video_token_id=hf_config.video_token_id,
            select_token_id=True,
        )

    def _dtd_position_span(self, steps: int, h: int, w: int, t_factor: float, text_tokens: int) -> int:
        """Time is in each step's timestamp text: every step's grid takes ``max(h, w)`` positions."""
        return timestamped_position_span(steps, h, w, text_tokens)


class DTDTimestampedPositionsMixin:
    """Qwen3-VL's M-RoPE positions with DTD: text and survivors keep the full prompt's positions
    (shared by the dense and MoE model classes)."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        cfg = self.config
        merge = cfg.vision_config.spatial_merge_size
        parts: list[np.ndarray] = []
        st = 0  # index in input_tokens after the last placed item
        next_pos = 0  # position id of the next text token
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            parts.append(np.broadcast_to(np.arange(offset - st), (3, offset - st)) + next_pos)
            start = next_pos + offset - st
            key = "video_grid_thw" if feature.modality == "video" else "image_grid_thw"
            t, h, w = (int(x) for x in feature.data[key].data.tolist())
            shape = (t, h // merge, w // merge)
            elem = feature.data.get(MASK_KEY) if feature.modality == "video" else None
            mask = elem.data.reshape(shape).bool() if elem is not None else torch.ones(shape, dtype=torch.bool)
            if feature.modality == "video":
                lens = step_text_lens(input_tokens[offset:offset + length], mask.flatten(1).sum(1).tolist(),
                                      cfg.vision_start_token_id, cfg.video_token_id)
            else:  # an image: its placeholder is its grid
                lens = [0, 0]
            pos, next_pos = timestamped_mrope_positions(mask, lens, start=start)
            if pos.shape[1] != length:
                raise ValueError(f"M-RoPE positions cover {pos.shape[1]} tokens of a {length}-token {feature.modality} placeholder")
            parts.append(pos.numpy())
            st = offset + length
        if st < len(input_tokens):
            parts.append(np.broadcast_to(np.arange(len(input_tokens) - st), (3, len(input_tokens) - st)) + next_pos)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        if positions.shape[1] != len(input_tokens):
            raise ValueError(f"M-RoPE positions cover {positions.shape[1]} tokens, the prompt has {len(input_tokens)}")
        return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max() + 1 - len(input_tokens))


@MULTIMODAL_REGISTRY.register_processor(
    DTDQwen3VLMultiModalProcessor,
    info=DTDQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class Qwen3VLDTDForConditionalGeneration(DTDTimestampedPositionsMixin, DTDModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose video prompts carry only the tokens that survive DTD."""


vllm_patches.check_overrides(DTDQwen3VLProcessingInfo, Qwen3VLProcessingInfo)
vllm_patches.check_overrides(DTDQwen3VLMultiModalProcessor, Qwen3VLMultiModalProcessor)
vllm_patches.check_overrides(Qwen3VLDTDForConditionalGeneration, Qwen3VLForConditionalGeneration)
