"""Tiny checkpoints: deterministic, cached, Qwen-shaped; they load in transformers and serve in vLLM."""

import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch

from analysis.harness.tiny_model import SPECIAL_TOKENS, build, content_hash, flops_per_video_token
from conftest import REPO


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_cli_builds_deterministically_and_caches(tmp_path, tiny_model_path):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "analysis.harness.tiny_model", str(out), "--size", "test"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert _digest(out) == _digest(tiny_model_path)  # same (size, seed) -> same weights
    assert (out / "tokenizer.json").read_text() == (tiny_model_path / "tokenizer.json").read_text()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    build(out, "test")
    assert time.monotonic() - t0 < 1.0 and (out / "model.safetensors").stat().st_mtime_ns == mtime  # cache hit
    assert json.loads((out / ".tiny_model.json").read_text())["hash"] == content_hash("test", 0)
    assert content_hash("test", 1) != content_hash("test", 0) != content_hash("bench", 0)


def test_checkpoint_shape_and_tokens(tiny_model_path):
    from transformers import AutoProcessor

    cfg = json.loads((tiny_model_path / "config.json").read_text())
    t = cfg["text_config"]
    assert t["hidden_size"] // t["num_attention_heads"] == 64  # vLLM CPU attention needs 64
    assert sum(t["rope_parameters"]["mrope_section"]) == 32
    proc = AutoProcessor.from_pretrained(tiny_model_path)
    vocab = proc.tokenizer.get_vocab()
    for tok in SPECIAL_TOKENS:
        assert tok in vocab and len(proc.tokenizer.encode(tok)) == 1
    assert cfg["video_token_id"] == vocab["<|video_pad|>"] and cfg["image_token_id"] == vocab["<|image_pad|>"]
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|video_pad|><|vision_end|>what happens<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_bench_size_is_prefill_dominated():
    assert flops_per_video_token("bench")["ratio"] >= 10.0
    assert flops_per_video_token("bench")["llm"] > 50 * flops_per_video_token("test")["llm"]


def test_bench7b_has_the_encoder_cost_of_qwen2_5_vl_7b():
    """Vision-encoder multiply-adds per LLM video token relative to the LLM's: Qwen2.5-VL-7B ~0.4,
    -3B ~0.9 (from their configs); bench7b puts the bench LLM beside an encoder of the 7B's share."""
    share = {s: 1 / flops_per_video_token(s)["ratio"] for s in ("bench", "bench7b", "Qwen2.5-VL-7B", "Qwen2.5-VL-3B")}
    assert share["Qwen2.5-VL-7B"] == pytest.approx(0.39, abs=0.02) and share["Qwen2.5-VL-3B"] == pytest.approx(
        0.92, abs=0.03
    )
    assert abs(share["bench7b"] - share["Qwen2.5-VL-7B"]) < 0.05 and share["bench"] < 0.1
    assert flops_per_video_token("bench7b")["llm"] == flops_per_video_token("bench")["llm"]


@pytest.mark.parametrize("size", ["test", "bench", "bench7b"])
def test_loads_in_transformers(size):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from analysis.harness.tiny_model import ensure_tiny_model

    path = ensure_tiny_model(size)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(path)
    ids = proc.tokenizer("what happens now", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()
