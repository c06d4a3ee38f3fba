"""Build a tiny random-weight Qwen-VL checkpoint locally (no model hub), one per model family.

    python -m analysis.harness.tiny_model OUT [--family NAME] --size test|bench [--seed N]

writes to OUT: ``config.json``, ``model.safetensors``, a byte-level BPE tokenizer trained here with
``tokenizers`` (carrying Qwen's special tokens) plus a Qwen-style chat template, and the
image/video processor configs. The result is deterministic from (size, seed) and cached: if OUT
already holds the checkpoint of the same content hash, nothing is written.

Each family's recipe is in its :class:`~vllm_plugin.models.families.FamilySpec` (``tiny``: the
shapes per size, and the builders of its transformers config and processor, in
``vllm_plugin/models/<family>.py``); ``--family`` takes any registered family (default
``qwen2_5_vl``, whose checkpoints and hashes are those of before families existed). Sizes: ``test``,
as small as vLLM's CPU backend accepts; ``bench``, LLM-heavy; ``bench7b`` (``qwen2_5_vl`` only), an
encoder as costly, relative to the LLM, as Qwen2.5-VL-7B's.

All load in transformers (the family's ``reference_class``) and serve in vLLM.
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

from vllm_plugin.models.families import DEFAULT_FAMILY, TinyContext, TinyRecipe, family_names, get_family

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
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Real checkpoints' shapes, for the cost ratio only (config.json of Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct):
# their LLMs, and the vision tower they share.
_REAL_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, **TinyRecipe.vision_patches())
_REAL_TEXT = {
    "Qwen2.5-VL-7B": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4
    ),
    "Qwen2.5-VL-3B": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2
    ),
}
REAL_SHAPES: dict[str, dict] = {name: dict(text=text, vision=_REAL_VISION) for name, text in _REAL_TEXT.items()}

# Video preprocessing of the tiny checkpoints: the paper's 448x448 budget per frame.
VIDEO_MIN_PIXELS = 4 * 28 * 28
VIDEO_MAX_PIXELS = 448 * 448
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 448 * 448

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "is",
    "are",
    "was",
    "were",
    "be",
    "on",
    "at",
    "by",
    "for",
    "with",
    "from",
    "as",
    "this",
    "that",
    "these",
    "those",
    "it",
    "its",
    "video",
    "frame",
    "frames",
    "scene",
    "camera",
    "person",
    "people",
    "car",
    "plane",
    "jet",
    "field",
    "sky",
    "sun",
    "tree",
    "trees",
    "road",
    "house",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "ball",
    "cup",
    "cups",
    "table",
    "hand",
    "hands",
    "screen",
    "window",
    "mouse",
    "cursor",
    "button",
    "page",
    "text",
    "moves",
    "moving",
    "stands",
    "walks",
    "runs",
    "flies",
    "sits",
    "looks",
    "holds",
    "opens",
    "closes",
    "turns",
    "shows",
    "appears",
    "changes",
    "left",
    "right",
    "up",
    "down",
    "top",
    "bottom",
    "center",
    "near",
    "far",
    "fast",
    "slow",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "white",
    "black",
    "what",
    "where",
    "when",
    "who",
    "why",
    "how",
    "many",
    "much",
    "does",
    "do",
    "did",
    "is",
    "there",
    "any",
    "one",
    "two",
    "three",
    "four",
    "five",
    "first",
    "last",
    "question",
    "answer",
    "describe",
    "happening",
    "now",
    "before",
    "after",
    "during",
    "then",
    "again",
    "yes",
    "no",
    "maybe",
]


def __getattr__(name: str):
    if name == "FAMILIES":  # the registered families' names (read on use: a family registered later is in)
        return family_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recipe(family: str = DEFAULT_FAMILY) -> TinyRecipe:
    """The tiny checkpoint recipe of a registered family (``ValueError`` for a family without one)."""
    spec = get_family(family)
    if spec.tiny is None:
        raise ValueError(f"family {family!r} has no tiny checkpoint recipe")
    return spec.tiny


def all_sizes() -> list[str]:
    """Every size some family's recipe has."""
    recipes = [get_family(name).tiny for name in family_names()]
    return sorted({size for tiny in recipes if tiny for size in tiny.sizes})


def spec_for(size: str, seed: int, family: str = DEFAULT_FAMILY) -> dict:
    sizes = recipe(family).sizes
    if size not in sizes:
        raise ValueError(f"size must be one of {sorted(sizes)} for {family}, got {size!r}")
    extra = {} if recipe(family).legacy_hash else {"family": family}  # the default family keeps its pre-family hashes
    return {"builder_version": BUILDER_VERSION, "size": size, "seed": seed, **extra, **sizes[size]}


def content_hash(size: str, seed: int, family: str = DEFAULT_FAMILY) -> str:
    blob = json.dumps(spec_for(size, seed, family), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def flops_per_video_token(size: str) -> dict[str, float]:
    """Approximate multiply-adds per LLM video token, LLM (linear layers) vs vision encoder, of a
    tiny size of the default family (Qwen2.5-VL) or a :data:`REAL_SHAPES` model. ``ratio`` = LLM / vision.

    The vision encoder runs ``merge²`` patches per LLM token, each through its blocks, plus the
    patch embedding and the merger MLP.
    """
    sizes = recipe(DEFAULT_FAMILY).sizes
    s = sizes[size] if size in sizes else REAL_SHAPES[size]
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


def build(
    out: str | os.PathLike, size: str = "test", seed: int = 0, force: bool = False, family: str = DEFAULT_FAMILY
) -> Path:
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
    import transformers
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
    context = TinyContext(
        tokenizer=tokenizer,
        token_ids=ids,
        tokens=tokens,
        text=text,
        head_dim=head_dim,
        mrope_section=mrope_section,
        chat_template=CHAT_TEMPLATE,
        image_pixels=(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS),
        video_pixels=(VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS),
    )
    processor = recipe(family).processor(spec, context)
    config = recipe(family).config(spec, context)
    config.torch_dtype = torch.float32

    torch.manual_seed(seed)
    model = getattr(transformers, get_family(family).reference_class)(config).to(torch.float32).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if spec.get("expert_layout") == "released":
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


CACHE_ENV = "DTD_CACHE_DIR"  # vllm_plugin.settings


def default_cache_dir() -> Path:
    """``$DTD_CACHE_DIR``, else the repository's (git-ignored) ``.cache``."""
    from vllm_plugin import settings

    given = settings.get(CACHE_ENV)
    if given:
        return Path(given)
    return Path(__file__).resolve().parents[2] / ".cache"


def ensure_tiny_model(
    size: str = "test", seed: int = 0, cache_dir: str | os.PathLike | None = None, family: str = DEFAULT_FAMILY
) -> Path:
    """Path of the cached checkpoint for (family, size, seed), building it on first use."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    prefix = size if recipe(family).legacy_hash else f"{family}-{size}"
    return build(
        root / "tiny_models" / f"{prefix}-{content_hash(size, seed, family)[:12]}", size=size, seed=seed, family=family
    )


def add_model_arguments(ap: argparse.ArgumentParser, default_size: str) -> None:
    """``--model PATH`` (a real checkpoint of any family with DTD) or a tiny one: ``--family``, ``--size``."""
    ap.add_argument("--model", type=Path, help="a checkpoint directory (any family DTD serves); default: a tiny one")
    ap.add_argument("--family", choices=family_names(), default=DEFAULT_FAMILY, help="family of the tiny checkpoint")
    ap.add_argument(
        "--size",
        default=default_size,
        choices=all_sizes(),
        help="size of the tiny checkpoint (bench7b: an encoder as costly, relative to the LLM, as "
        "Qwen2.5-VL-7B's, qwen2_5_vl only; bench: LLM-heavy; test: the smallest)",
    )


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
    ap.add_argument("--family", choices=family_names(), default=DEFAULT_FAMILY)
    ap.add_argument("--size", choices=all_sizes(), default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT holds the same content hash")
    args = ap.parse_args(argv)
    try:
        spec_for(args.size, args.seed, args.family)
    except ValueError as e:
        ap.error(str(e))
    path = build(args.out, size=args.size, seed=args.seed, force=args.force, family=args.family)
    ratio = ""
    if args.family == DEFAULT_FAMILY:  # the cost model reads the default family's shapes
        ratio = f", LLM/vision FLOPs per video token = {flops_per_video_token(args.size)['ratio']:.1f}"
    print(
        f"{path}  (family={args.family}, size={args.size}, seed={args.seed}, "
        f"hash={content_hash(args.size, args.seed, args.family)[:12]}{ratio})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
