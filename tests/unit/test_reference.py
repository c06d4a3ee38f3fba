"""The reference (transformers) pipeline: the oracle the serving plugin is held to."""

import torch

from vllm_plugin.core import DTDConfig, mrope_positions


def test_disabled_gives_the_unmodified_models_logits(reference, synthetic_clip):
    # 8 frames -> T=4: the original and transformers-5 position conventions coincide here
    frames = synthetic_clip.frames[:8]
    prepared = reference.prepare("what happens", frames, 2.0, DTDConfig(enabled=False))
    ours = reference.logits(prepared)
    plain = reference.plain_logits("what happens", frames, 2.0)
    assert ours.shape == plain.shape
    assert torch.equal(ours, plain)


def test_video_positions_equal_the_models_rope_index(reference, synthetic_clip):
    from transformers.video_utils import VideoMetadata

    frames = synthetic_clip.frames
    text = reference.chat_text("what happens")
    meta = VideoMetadata(
        total_num_frames=len(frames), fps=2.0, duration=len(frames) / 2.0, frames_indices=list(range(len(frames)))
    )
    inputs = reference.processor(
        text=[text], videos=[frames], video_metadata=[meta], return_tensors="pt", do_sample_frames=False
    )
    hf_pos, _ = reference.model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
    )
    prepared = reference.prepare("what happens", frames, 2.0, DTDConfig(enabled=False))
    is_video = inputs["input_ids"][0] == reference.config.video_token_id
    last_video = int(is_video.nonzero().max())
    # text before and every video token: identical
    assert torch.equal(prepared.position_ids[:, : last_video + 1], hf_pos[:, 0, : last_video + 1])
    # text after the video: original Qwen2.5-VL / vLLM convention, 1 + max video position
    assert int(prepared.position_ids[0, last_video + 1]) == int(prepared.position_ids[:, : last_video + 1].max()) + 1


def test_dtd_drops_tokens_but_keeps_original_positions(reference, synthetic_clip):
    full = reference.prepare("what happens", synthetic_clip.frames, 2.0, DTDConfig(enabled=False))
    dtd = reference.prepare("what happens", synthetic_clip.frames, 2.0, DTDConfig(threshold=0.01, metric="l1"))
    kept_video = int(torch.from_numpy(synthetic_clip.changed).sum())
    assert dtd.stats.kept == kept_video
    assert full.num_prompt_tokens - dtd.num_prompt_tokens == 24 * 64 - kept_video
    # survivors' positions are a subset of the full positions; the text after the video is unchanged
    full_cols = {tuple(c) for c in full.position_ids.T.tolist()}
    assert all(tuple(c) in full_cols for c in dtd.position_ids.T.tolist())
    assert torch.equal(full.position_ids[:, -5:], dtd.position_ids[:, -5:])
    s0 = int((dtd.input_ids == reference.config.video_token_id).nonzero().min())
    pos, _ = mrope_positions(dtd.mask, start=s0, second_per_grid_t=1.0, tokens_per_second=2)
    assert torch.equal(dtd.position_ids[:, s0 : s0 + dtd.stats.kept], pos)
    # the model really sees a different input
    assert not torch.allclose(reference.logits(full)[-1], reference.logits(dtd)[-1])


def test_feature_criterion_and_generation(reference, synthetic_clip):
    feat = reference.prepare(
        "what happens", synthetic_clip.frames, 2.0, DTDConfig(threshold=0.9, metric="cosine", criterion="feature")
    )
    assert feat.stats.kept_per_step[0] == 64 and feat.stats.kept < feat.stats.total
    # static steps: identical frames -> identical embeddings -> all dropped
    for s in synthetic_clip.static_steps:
        assert feat.stats.kept_per_step[s] == 0
    gen = reference.generate(feat, max_new_tokens=4, stop_at_eos=False)
    assert len(gen.token_ids) == 4 and all(len(t) == 5 for t in gen.top_logprobs)
    assert all(gen.top_logprobs[i][gen.token_ids[i]] == max(gen.top_logprobs[i].values()) for i in range(4))
