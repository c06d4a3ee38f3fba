"""Build a tiny random-weight Qwen-VL checkpoint locally (no model hub), one per model family.

    python -m analysis.harness.tiny_model OUT [--family qwen2_5_vl|qwen3_vl|qwen3_vl_moe|qwen2_vl] --size test|bench [--seed N]

writes to OUT: ``config.json``, ``model.safetensors``, a byte-level BPE tokenizer trained here with
``tokenizers`` (carrying Qwen's special tokens) plus a Qwen-style chat template, and the
image/video processor configs. The result is deterministic from (size, seed) and cached: if OUT
already holds the checkpoint of the same content hash, nothing is written.

Sizes:
* ``test`` — as small as vLLM's CPU backend accepts (LLM head_dim 64: its CPU attention rejects 16).
* ``bench`` — Qwen2.5-VL-7B's shape scaled down so that LLM FLOPs per video token are ≥ 10× the
  vision encoder's: prefill (what DTD saves) dominates, as on real deployments.

Families (:data:`FAMILIES`; default ``qwen2_5_vl``, whose checkpoints and hashes are those of
before families existed): ``qwen3_vl`` is Qwen3-VL's shape (DeepStack from two vision layers,
interleaved M-RoPE, patch 16) with transformers' ``Qwen3VLVideoProcessor`` defaults (its total pixel
budget over all frames, fps 2, mean/std 0.5: the sizing real Qwen3-VL checkpoints ship);
``qwen3_vl_moe`` is the same with a mixture-of-experts LLM (``test`` size only); ``qwen2_vl`` is
Qwen2-VL's (no window attention, plain frame-index temporal positions). ``bench7b`` exists for
``qwen2_5_vl`` only.

All load in transformers (``<Family>ForConditionalGeneration``) and serve in vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the produced files change for the same (size, seed).
BUILDER_VERSION = 1
STAMP = ".tiny_model.json"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL style chat template: string or list content; image/video parts become placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VISION = dict(
    depth=2,
    hidden_size=128,
    num_heads=2,
    intermediate_size=256,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,  # Qwen2.5-VL's value
    window_size=112,
    fullatt_block_indexes=[1],
    hidden_act="silu",
)

SIZES: dict[str, dict] = {
    "test": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        vision=_VISION,
        vocab_words=1024,
    ),
    "bench": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2),
        vision=_VISION,
        vocab_words=1024,
    ),
    # the bench LLM with an encoder as costly per video token as Qwen2.5-VL-7B's relative to its LLM
    # (vision ≈ 0.4 x LLM multiply-adds per token; `bench` gives the LLM >= 10x): where DTD's saving
    # on the LLM meets the encoder cost it does not reduce
    "bench7b": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2),
        vision={**_VISION, "depth": 4, "hidden_size": 256, "num_heads": 4, "intermediate_size": 448, "fullatt_block_indexes": [1, 3]},
        vocab_words=1024,
    ),
}

# Real checkpoints' shapes, for the cost ratio only (config.json of Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct).
REAL_SHAPES: dict[str, dict] = {
    "Qwen2.5-VL-7B": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
        vision={**_VISION, "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420},
    ),
    "Qwen2.5-VL-3B": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
        vision={**_VISION, "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420},
    ),
}

# Video preprocessing of the tiny checkpoints: the paper's 448x448 budget per frame.
VIDEO_MIN_PIXELS = 4 * 28 * 28
VIDEO_MAX_PIXELS = 448 * 448
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 448 * 448

_WORDS = (
    "the a an of to in and is are was were be on at by for with from as this that these those it its "
    "video frame frames scene camera person people car plane jet field sky sun tree trees road house "
    "man woman child dog cat ball cup cups table hand hands screen window mouse cursor button page text "
    "moves moving stands walks runs flies sits looks holds opens closes turns shows appears changes "
    "left right up down top bottom center near far fast slow small large red green blue white black "
    "what where when who why how many much does do did is there any one two three four five first last "
    "question answer describe happening now before after during then again yes no maybe"
).split()


# Qwen3-VL: patch 16, DeepStack features from vision layers 0 and 1 (real: 8/16/24 of 27), learned
# position embeddings interpolated to the grid (16 x 16 here).
_VISION_QWEN3 = dict(
    depth=3,
    hidden_size=64,
    num_heads=1,
    intermediate_size=128,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=256,
    deepstack_visual_indexes=[0, 1],
    hidden_act="gelu_pytorch_tanh",
)
# Qwen2-VL: no window attention, no tokens_per_second (temporal position = step index).
_VISION_QWEN2 = dict(
    depth=2,
    embed_dim=128,
    num_heads=2,
    mlp_ratio=2,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    hidden_act="quick_gelu",
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_vl")
# Qwen3-VL MoE: the LLM's MLPs are 4 experts (2 per token). moe_intermediate_size 48: no fused expert
# matrix is square (hidden 128, 2 x 48), because transformers 5.19 reads the released layout by
# transposing only where the shapes disagree (a square one would load untransposed; measured)
_MOE = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)  # real configs set it; vLLM reads it
FAMILY_SIZES: dict[str, dict[str, dict]] = {
    "qwen2_5_vl": SIZES,
    # video processor: transformers' Qwen3VLVideoProcessor defaults, with the per-frame pixel cap of
    # qwen-vl-utils (the reference implementation) set explicitly: transformers 5.19 leaves it off
    # with a warning, 5.22 turns it on.
    "qwen3_vl": {
        "test": dict(text=SIZES["test"]["text"], vision=_VISION_QWEN3, vocab_words=1024,
                     video_processor=dict(cap_pixels_per_frame=True)),
        "bench": dict(text=SIZES["bench"]["text"], vision={**_VISION_QWEN3, "hidden_size": 128, "num_heads": 2,
                                                            "intermediate_size": 256}, vocab_words=1024,
                      video_processor=dict(cap_pixels_per_frame=True)),
    },
    "qwen3_vl_moe": {
        "test": dict(text={**SIZES["test"]["text"], **_MOE, "moe_intermediate_size": 48}, vision=_VISION_QWEN3,
                     vocab_words=1024, video_processor=dict(cap_pixels_per_frame=True), expert_layout="released"),
    },
    "qwen2_vl": {
        "test": dict(text=SIZES["test"]["text"], vision=_VISION_QWEN2, vocab_words=1024),
        "bench": dict(text=SIZES["bench"]["text"], vision=_VISION_QWEN2, vocab_words=1024),
    },
}


def spec_for(size: str, seed: int, family: str = "qwen2_5_vl") -> dict:
    if family not in FAMILY_SIZES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    sizes = FAMILY_SIZES[family]
    if size not in sizes:
        raise ValueError(f"size must be one of {sorted(sizes)} for {family}, got {size!r}")
    extra = {} if family == "qwen2_5_vl" else {"family": family}  # qwen2_5_vl keeps its pre-family hashes
    return {"builder_version": BUILDER_VERSION, "size": size, "seed": seed, **extra, **sizes[size]}


def content_hash(size: str, seed: int, family: str = "qwen2_5_vl") -> str:
    blob = json.dumps(spec_for(size, seed, family), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def flops_per_video_token(size: str) -> dict[str, float]:
    """Approximate multiply-adds per LLM video token, LLM (linear layers) vs vision encoder, of a
    tiny size or a :data:`REAL_SHAPES` model. ``ratio`` = LLM / vision.

    The vision encoder runs ``merge²`` patches per LLM token, each through its blocks, plus the
    patch embedding and the merger MLP.
    """
    s = SIZES[size] if size in SIZES else REAL_SHAPES[size]
    t, v = s["text"], s["vision"]
    hd = t["hidden_size"] // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    llm_layer = t["hidden_size"] * (t["hidden_size"] * 2 + kv * 2) + 3 * t["hidden_size"] * t["intermediate_size"]
    llm = t["num_hidden_layers"] * llm_layer
    m2 = v["spatial_merge_size"] ** 2
    vh = v["hidden_size"]
    vis_layer = 4 * vh * vh + 3 * vh * v["intermediate_size"]
    patch_embed = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * vh
    merger = (vh * m2) ** 2 + vh * m2 * t["hidden_size"]
    vision = m2 * (v["depth"] * vis_layer + patch_embed) + merger
    return {"llm": float(llm), "vision": float(vision), "ratio": llm / vision}


def _train_tokenizer(seed: int, vocab_words: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(4000)]
    corpus += ["".join(chr(c) for c in range(32, 127))]  # every printable ASCII character
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_words,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _family_classes(family: str, spec: dict, tokenizer):
    """(model class, processor) of a family: Qwen2-VL / Qwen2.5-VL with the paper's 448x448 frame budget,
    Qwen3-VL with its own video processor's defaults (a pixel budget over all frames)."""
    import transformers as tf

    v = spec["vision"]
    common = dict(patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"])
    image_processor = tf.Qwen2VLImageProcessor(size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}, **common)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        image_processor = tf.Qwen2VLImageProcessor(
            size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **common,
        )
        video_processor = tf.Qwen3VLVideoProcessor(**spec["video_processor"], **common)
        processor = tf.Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        return (tf.Qwen3VLForConditionalGeneration if family == "qwen3_vl" else tf.Qwen3VLMoeForConditionalGeneration), processor
    video_processor = tf.Qwen2VLVideoProcessor(size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, **common)
    if family == "qwen2_vl":
        processor = tf.Qwen2VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        return tf.Qwen2VLForConditionalGeneration, processor
    processor = tf.Qwen2_5_VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                       tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return tf.Qwen2_5_VLForConditionalGeneration, processor


def _released_expert_layout(out: Path) -> None:
    """Qwen3-VL MoE checkpoints as Qwen released them: fused experts ``gate_up_proj`` (E, hidden, 2I)
    and ``down_proj`` (E, I, hidden). transformers 5.19 saves the transposes, which vLLM 0.32's loader
    (``is_fused_checkpoint_transposed``) does not read; transformers reads both layouts."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    state = load_file(path)
    for k in state:
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            state[k] = state[k].transpose(1, 2).contiguous()
    save_file(state, path, metadata={"format": "pt"})


def build(out: str | os.PathLike, size: str = "test", seed: int = 0, force: bool = False,
          family: str = "qwen2_5_vl") -> Path:
    """Write the checkpoint to ``out`` (skipped when ``out`` already holds the same content hash)."""
    out = Path(out)
    digest = content_hash(size, seed, family)
    stamp = out / STAMP
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("hash") == digest:
                return out
        except (OSError, ValueError):
            pass

    import torch
    from transformers import PreTrainedTokenizerFast

    spec = spec_for(size, seed, family)
    raw_tok = _train_tokenizer(seed, spec["vocab_words"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: raw_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = ((raw_tok.get_vocab_size() + 63) // 64) * 64

    t = spec["text"]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    half = head_dim // 2  # mrope sections (t, h, w) split the rotary half: Qwen's 16/24/24 of 64, scaled
    mrope_section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = dict(
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        initializer_range=0.05,
        **t,
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_cls, processor = _family_classes(family, spec, tokenizer)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

        config = (Qwen3VLConfig if family == "qwen3_vl" else Qwen3VLMoeConfig)(
            text_config=dict(
                head_dim=head_dim, pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True,
                                 "rope_theta": 5000000.0},
                **text,
            ),
            vision_config=dict(out_hidden_size=t["hidden_size"], initializer_range=0.05, **spec["vision"]),
            tie_word_embeddings=False,
            **tokens,
        )
        config.text_config.bos_token_id = ids["<|endoftext|>"]
        config.text_config.eos_token_id = ids["<|im_end|>"]
        if family == "qwen3_vl_moe":  # its text config ties embeddings by default; the model does not
            config.text_config.tie_word_embeddings = False
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

        config_cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen2VLConfig
        vision = dict(spec["vision"], initializer_range=0.05)
        if family == "qwen2_5_vl":
            vision["out_hidden_size"] = t["hidden_size"]
        else:
            vision["hidden_size"] = t["hidden_size"]  # Qwen2-VL: the merger's output size
        config = config_cls(
            text_config=dict(
                rope_scaling={"type": "mrope", "mrope_section": mrope_section, "rope_theta": 1000000.0},
                bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False,
                **text,
            ),
            vision_config=vision,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
            **tokens,
        )
    config.torch_dtype = torch.float32

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if family == "qwen3_vl_moe":
            _released_expert_layout(tmp)
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({"hash": digest, **spec}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


CACHE_ENV = "DTD_CACHE_DIR"  # was VLLM_DTD_CACHE (release 0.1; read with a warning: vLLM warns about unknown VLLM_* names)


def default_cache_dir() -> Path:
    """``$DTD_CACHE_DIR``, else the repository's (git-ignored) ``.cache``."""
    env = os.environ.get(CACHE_ENV)
    if not env and os.environ.get("VLLM_DTD_CACHE"):
        import warnings

        warnings.warn("VLLM_DTD_CACHE is deprecated: use DTD_CACHE_DIR", FutureWarning, stacklevel=2)
        env = os.environ["VLLM_DTD_CACHE"]
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache"


def ensure_tiny_model(size: str = "test", seed: int = 0, cache_dir: str | os.PathLike | None = None,
                      family: str = "qwen2_5_vl") -> Path:
    """Path of the cached checkpoint for (family, size, seed), building it on first use."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    prefix = size if family == "qwen2_5_vl" else f"{family}-{size}"
    return build(root / "tiny_models" / f"{prefix}-{content_hash(size, seed, family)[:12]}", size=size, seed=seed,
                 family=family)


def add_model_arguments(ap: argparse.ArgumentParser, default_size: str) -> None:
    """``--model PATH`` (a real checkpoint of any family with DTD) or a tiny one: ``--family``, ``--size``."""
    ap.add_argument("--model", type=Path, help="a checkpoint directory (any family DTD serves); default: a tiny one")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl", help="family of the tiny checkpoint")
    ap.add_argument("--size", default=default_size, choices=sorted(SIZES),
                    help="size of the tiny checkpoint (bench7b: an encoder as costly, relative to the LLM, as "
                         "Qwen2.5-VL-7B's, qwen2_5_vl only; bench: LLM-heavy; test: the smallest)")


def model_from_arguments(ap: argparse.ArgumentParser, args) -> Path:
    """The checkpoint the arguments of :func:`add_model_arguments` name (built when tiny)."""
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            ap.error(f"--model {args.model}: no config.json there")
        return args.model
    try:
        spec_for(args.size, 0, args.family)
    except ValueError as e:
        ap.error(str(e))
    return ensure_tiny_model(args.size, family=args.family)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.harness.tiny_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    ap.add_argument("--size", choices=sorted(SIZES), default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT holds the same content hash")
    args = ap.parse_args(argv)
    try:
        spec_for(args.size, args.seed, args.family)
    except ValueError as e:
        ap.error(str(e))
    path = build(args.out, size=args.size, seed=args.seed, force=args.force, family=args.family)
    ratio = f", LLM/vision FLOPs per video token = {flops_per_video_token(args.size)['ratio']:.1f}" if args.family == "qwen2_5_vl" else ""
    print(f"{path}  (family={args.family}, size={args.size}, seed={args.seed}, "
          f"hash={content_hash(args.size, args.seed, args.family)[:12]}{ratio})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
