"""Qwen2.5-VL with Differential Token Drop (vLLM's ``vllm/model_executor/models/qwen2_5_vl.py``).

The family's :class:`~vllm_plugin.models.families.FamilySpec`: the DTD behaviour is
:mod:`vllm_plugin.models.base`'s, bound to the family's vLLM classes when vLLM first asks for them
(:func:`~vllm_plugin.models.families.build_classes`, which also checks them against the installed
vLLM and registers the processor). Select it for any Qwen2.5-VL checkpoint with
``--hf-overrides '{"architectures": ["Qwen2_5_VLDTDForConditionalGeneration"]}'``
(``python -m vllm_plugin.serve`` does that).

Its tiny checkpoints (``analysis/harness/tiny_model.py``; the default family, whose checkpoints and
hashes are those of before families existed): ``test``, as small as vLLM's CPU backend accepts (LLM
head_dim 64: its CPU attention rejects 16); ``bench``, Qwen2.5-VL-7B's shape scaled down so that LLM
FLOPs per video token are ≥ 10× the vision encoder's (prefill, what DTD saves, dominates as on real
deployments); ``bench7b``, the bench LLM with an encoder as costly per video token, relative to it,
as Qwen2.5-VL-7B's. Frames: the paper's 448x448 budget each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_plugin.models.families import FamilySpec, TinyContext, TinyRecipe, lazy_classes, register_family
from vllm_plugin.models.vision import VisionTowerSpec

TINY_VISION = dict(
    depth=2,
    hidden_size=128,
    num_heads=2,
    intermediate_size=256,
    **TinyRecipe.vision_patches(),
    tokens_per_second=2,  # Qwen2.5-VL's value
    window_size=112,
    fullatt_block_indexes=[1],
    hidden_act="silu",
)
TINY_TEXT = {
    "test": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    ),
    "bench": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2
    ),
}
TINY_SIZES: dict[str, dict] = {
    "test": dict(text=TINY_TEXT["test"], vision=TINY_VISION, vocab_words=1024),
    "bench": dict(text=TINY_TEXT["bench"], vision=TINY_VISION, vocab_words=1024),
    # the bench LLM with an encoder as costly per video token as Qwen2.5-VL-7B's relative to its LLM
    # (vision ≈ 0.4 x LLM multiply-adds per token; `bench` gives the LLM >= 10x): where DTD's saving
    # on the LLM meets the encoder cost it does not reduce
    "bench7b": dict(
        text=TINY_TEXT["bench"],
        vision={
            **TINY_VISION,
            "depth": 4,
            "hidden_size": 256,
            "num_heads": 4,
            "intermediate_size": 448,
            "fullatt_block_indexes": [1, 3],
        },
        vocab_words=1024,
    ),
}


def qwen2_tiny_config(config_class: str, merger_size_key: str):
    """The tiny config builder of a Qwen2-VL style family: ``config_class`` of transformers, the
    merger's output size under ``merger_size_key`` of the vision config."""

    def build(shape: Mapping[str, Any], ctx: TinyContext):
        import transformers

        ids = ctx.token_ids
        vision = dict(shape["vision"], initializer_range=0.05)
        vision[merger_size_key] = shape["text"]["hidden_size"]
        return getattr(transformers, config_class)(
            text_config=dict(
                rope_scaling={"type": "mrope", "mrope_section": ctx.mrope_section, "rope_theta": 1000000.0},
                bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False,
                **ctx.text,
            ),
            vision_config=vision,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
            **ctx.tokens,
        )

    return build


def qwen2_tiny_processor(processor_class: str):
    """The tiny processor builder of a Qwen2-VL style family: Qwen2-VL's image and video processors
    with the per-image and per-frame pixel budgets, under transformers' ``processor_class``."""

    def build(shape: Mapping[str, Any], ctx: TinyContext):
        import transformers as tf

        v = shape["vision"]
        common = dict(
            patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"]
        )
        image = tf.Qwen2VLImageProcessor(
            size={"shortest_edge": ctx.image_pixels[0], "longest_edge": ctx.image_pixels[1]}, **common
        )
        video = tf.Qwen2VLVideoProcessor(
            size={"shortest_edge": ctx.video_pixels[0], "longest_edge": ctx.video_pixels[1]}, **common
        )
        return getattr(tf, processor_class)(
            image_processor=image, video_processor=video, tokenizer=ctx.tokenizer, chat_template=ctx.chat_template
        )

    return build


SPEC = register_family(
    FamilySpec.named(  # patch layout and size: the defaults (Qwen2-VL's; OpenAI CLIP's mean / std)
        "qwen2_5_vl",
        "Qwen2_5_VL",
        VisionTowerSpec("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel"),
        tiny=TinyRecipe(
            sizes=TINY_SIZES,
            config=qwen2_tiny_config("Qwen2_5_VLConfig", "out_hidden_size"),
            processor=qwen2_tiny_processor("Qwen2_5_VLProcessor"),
            legacy_hash=True,
        ),
    )
)
# the DTD classes (SPEC.class_names), built when first asked for
__getattr__ = lazy_classes(SPEC)
