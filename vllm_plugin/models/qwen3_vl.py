"""Qwen3-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen3_vl.py``).

The family's :class:`~vllm_plugin.models.families.FamilySpec`: :mod:`vllm_plugin.models.base`'s DTD
behaviour, bound to the family's vLLM classes when vLLM first asks for them, with the rules where
Qwen3-VL differs from Qwen2.5-VL:

* **prompt**: every temporal step is its own group, ``<t.t seconds><|vision_start|> <|video_pad|>×kept
  <|vision_end|>``; the step's timestamp text stays when DTD keeps none of its tokens (the group is
  then empty), as vLLM's own EVS pruning leaves it: the model still reads that the moment passed.
* **positions**: time is in that text, each step's grid restarts the temporal section; survivors and
  text keep the positions they have in the full prompt
  (:func:`vllm_plugin.core.timestamped_mrope_positions`, :class:`DTDTimestampedPositionsMixin`).
* **DeepStack**: the vision tower's output rows carry the intermediate-layer features after the main
  ones (vLLM's layout), so keeping a row keeps it at every level; feature-level DTD decides on the
  main output (:class:`vllm_plugin.models.vision.VisionTowerSpec` ``deepstack``).

Select it for any Qwen3-VL checkpoint with
``--hf-overrides '{"architectures": ["Qwen3VLDTDForConditionalGeneration"]}'`` (``python -m
vllm_plugin.serve`` does that). The MoE checkpoints: :mod:`vllm_plugin.models.qwen3_vl_moe`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vllm_plugin.core import PatchLayout, timestamped_mrope_positions, timestamped_position_span
from vllm_plugin.models.families import FamilySpec, TinyContext, TinyRecipe, lazy_classes, register_family
from vllm_plugin.models.qwen2_5_vl import TINY_TEXT
from vllm_plugin.models.vision import VisionTowerSpec

LAYOUT = PatchLayout(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))  # Qwen3-VL normalizes to [-1, 1]
PATCH_SIZE = 16


def step_text_lens(
    item_tokens: Sequence[int], kept_per_step: Sequence[int], vision_start_id: int, video_id: int
) -> list[int]:
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


def timestamped_replacement(processor, mask: torch.Tensor, out_item) -> list[int]:
    """The prompt rule (the processor's ``_dtd_replacement``): each step's group with its kept tokens
    only; a step that keeps none keeps its timestamp and an empty ``<|vision_start|><|vision_end|>``."""
    hf_config = processor.info.get_hf_config()
    return processor.get_video_repl(  # vLLM's Qwen3VLMultiModalProcessor.get_video_repl (a staticmethod)
        tokens_per_frame=[int(k) for k in mask.flatten(1).sum(1).tolist()],
        timestamps=out_item["timestamps"].data,
        tokenizer=processor.info.get_tokenizer(),
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        video_token_id=hf_config.video_token_id,
        select_token_id=True,
    )


def timestamped_span(steps: int, h: int, w: int, t_factor: float, text_tokens: int) -> int:
    """The position rule: time is in each step's timestamp text, every step's grid takes
    ``max(h, w)`` positions (:func:`vllm_plugin.core.timestamped_position_span`)."""
    return timestamped_position_span(steps, h, w, text_tokens)


class DTDTimestampedPositionsMixin:
    """Qwen3-VL's M-RoPE positions with DTD: text and survivors keep the full prompt's positions
    (shared by the dense and MoE model classes)."""

    config: Any  # the checkpoint's HF config: an attribute of vLLM's model class this is mixed into

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        from vllm_plugin.models.base import MASK_KEY  # (base imports vLLM: this runs in the engine)

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
                lens = step_text_lens(
                    input_tokens[offset : offset + length],
                    mask.flatten(1).sum(1).tolist(),
                    cfg.vision_start_token_id,
                    cfg.video_token_id,
                )
            else:  # an image: its placeholder is its grid
                lens = [0, 0]
            pos, next_pos = timestamped_mrope_positions(mask, lens, start=start)
            if pos.shape[1] != length:
                raise ValueError(
                    f"M-RoPE positions cover {pos.shape[1]} tokens of a {length}-token {feature.modality} placeholder"
                )
            parts.append(pos.numpy())
            st = offset + length
        if st < len(input_tokens):
            parts.append(np.broadcast_to(np.arange(len(input_tokens) - st), (3, len(input_tokens) - st)) + next_pos)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        if positions.shape[1] != len(input_tokens):
            raise ValueError(f"M-RoPE positions cover {positions.shape[1]} tokens, the prompt has {len(input_tokens)}")
        return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max() + 1 - len(input_tokens))


# Qwen3-VL's tiny checkpoints: patch 16, DeepStack features from vision layers 0 and 1 (real: 8/16/24
# of 27), learned position embeddings interpolated to the grid (16 x 16 here), interleaved M-RoPE; the
# video processor with transformers' Qwen3VLVideoProcessor defaults (its total pixel budget over all
# frames, fps 2, mean/std 0.5: the sizing real Qwen3-VL checkpoints ship), with the per-frame pixel cap
# of qwen-vl-utils (the reference implementation) set explicitly: transformers 5.19 leaves it off with
# a warning, 5.22 turns it on.
TINY_VISION = dict(
    depth=3,
    hidden_size=64,
    num_heads=1,
    intermediate_size=128,
    **TinyRecipe.vision_patches(PATCH_SIZE, LAYOUT),
    num_position_embeddings=256,
    deepstack_visual_indexes=[0, 1],
    hidden_act="gelu_pytorch_tanh",
)
TINY_VIDEO_PROCESSOR = dict(cap_pixels_per_frame=True)


def qwen3_tiny_config(config_class: str):
    """The tiny config builder of a Qwen3-VL style family (``config_class`` of transformers)."""

    def build(shape: Mapping[str, Any], ctx: TinyContext):
        import transformers

        ids = ctx.token_ids
        config = getattr(transformers, config_class)(
            text_config=dict(
                head_dim=ctx.head_dim,
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={
                    "rope_type": "default",
                    "mrope_section": ctx.mrope_section,
                    "mrope_interleaved": True,
                    "rope_theta": 5000000.0,
                },
                **ctx.text,
            ),
            vision_config=dict(out_hidden_size=shape["text"]["hidden_size"], initializer_range=0.05, **shape["vision"]),
            tie_word_embeddings=False,
            **ctx.tokens,
        )
        config.text_config.bos_token_id = ids["<|endoftext|>"]
        config.text_config.eos_token_id = ids["<|im_end|>"]
        return config

    return build


def qwen3_tiny_processor(shape: Mapping[str, Any], ctx: TinyContext):
    """Qwen3-VL's processor: images with the per-image budget and its mean / std, videos with its own
    video processor's defaults (a pixel budget over all frames)."""
    import transformers as tf

    v = shape["vision"]
    common = dict(
        patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"]
    )
    image = tf.Qwen2VLImageProcessor(
        size={"shortest_edge": ctx.image_pixels[0], "longest_edge": ctx.image_pixels[1]},
        image_mean=list(LAYOUT.image_mean),
        image_std=list(LAYOUT.image_std),
        **common,
    )
    video = tf.Qwen3VLVideoProcessor(**shape["video_processor"], **common)
    return tf.Qwen3VLProcessor(
        image_processor=image, video_processor=video, tokenizer=ctx.tokenizer, chat_template=ctx.chat_template
    )


SPEC = register_family(
    FamilySpec.named(
        "qwen3_vl",
        "Qwen3VL",
        VisionTowerSpec("transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel", deepstack=True),
        reference_pipeline="analysis.lib.reference:Qwen3VLReferencePipeline",
        patch_layout=LAYOUT,
        patch_size=PATCH_SIZE,
        position_span=timestamped_span,
        prompt_replacement=timestamped_replacement,
        model_mixins=(DTDTimestampedPositionsMixin,),
        processor_requires=("get_video_repl",),
        tiny=TinyRecipe(
            sizes={
                "test": dict(
                    text=TINY_TEXT["test"], vision=TINY_VISION, vocab_words=1024, video_processor=TINY_VIDEO_PROCESSOR
                ),
                "bench": dict(
                    text=TINY_TEXT["bench"],
                    vision={**TINY_VISION, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256},
                    vocab_words=1024,
                    video_processor=TINY_VIDEO_PROCESSOR,
                ),
            },
            config=qwen3_tiny_config("Qwen3VLConfig"),
            processor=qwen3_tiny_processor,
        ),
    )
)
# the DTD classes (SPEC.class_names), built when first asked for
__getattr__ = lazy_classes(SPEC)
