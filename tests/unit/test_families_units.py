"""Model families beyond Qwen2.5-VL (Qwen3-VL, Qwen2-VL), without a server: vLLM's processor built
in-process as the renderer builds it, the plugin's M-RoPE positions, against the transformers
reference pipeline (prompt, masks and positions straight from transformers)."""

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_plugin.core import DTDConfig, mask_digest, timestamped_mrope_positions
from vllm_plugin.models.families import DEFAULT_FAMILY, families, family_names, get_family, load

Q = "what happens"


def _served(processor, reference, frames, fps, **mm):
    """vLLM's processing of the chat prompt with one video (DTD plugin), and the plugin's positions."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec

    from vllm_plugin.models.qwen3_vl import Qwen3VLDTDForConditionalGeneration

    n = len(frames)
    meta = {
        "fps": float(fps),
        "duration": n / fps,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "test",
        "do_sample_frames": False,
    }
    prompt = reference.tokenizer(reference.chat_text(Q))["input_ids"]
    out = processor(prompt, processor.info.parse_mm_data({"video": [(frames, meta)]}), hf_processor_mm_kwargs=mm)
    (item,), (ph,) = out["mm_kwargs"]["video"], out["mm_placeholders"]["video"]
    feature = MultiModalFeatureSpec(data=item, modality="video", identifier="v0", mm_position=ph)
    model = SimpleNamespace(config=processor.info.get_hf_config())
    positions, delta = Qwen3VLDTDForConditionalGeneration.get_mrope_input_positions(
        model, out["prompt_token_ids"], [feature]
    )
    return out["prompt_token_ids"], item, positions, delta


@pytest.mark.parametrize(
    "dtd",
    [DTDConfig(enabled=False), DTDConfig(), DTDConfig(threshold=0.2, reference="last_kept")],
    ids=["off", "default", "last_kept"],
)
def test_qwen3_served_prompt_mask_and_positions_equal_transformers(qwen3_processor, qwen3_reference, qwen3_clip, dtd):
    """The prompt (timestamps, one group per step, kept tokens only), the keep mask and every position
    (text, timestamps and survivors: those of the FULL prompt, from transformers' get_rope_index)."""
    c = qwen3_clip
    mm = (
        {"dtd_enabled": dtd.enabled, "dtd_threshold": dtd.threshold, "dtd_reference": dtd.reference}
        if dtd.enabled
        else {"dtd_enabled": False}
    )
    ids, item, positions, delta = _served(qwen3_processor, qwen3_reference, c.frames, c.fps, **mm)
    ref = qwen3_reference.prepare(Q, c.frames, c.fps, dtd)
    t, h, w = ref.mask.shape
    assert mask_digest(item["video_dtd_mask"].data.reshape(t, h, w)) == mask_digest(ref.mask)
    assert ids == ref.input_ids.tolist()
    assert torch.equal(positions, ref.position_ids)
    assert delta == int(ref.position_ids.max()) + 1 - len(ids)
    if dtd.enabled:
        assert int(ref.mask.sum()) < ref.mask.numel() and len(ids) < ref.full_length


def test_qwen3_a_step_that_keeps_nothing_keeps_its_timestamp(qwen3_processor, qwen3_reference, qwen3_clip):
    """Static steps of the clip keep no token: their ``<t seconds><|vision_start|><|vision_end|>`` stays."""
    c = qwen3_clip
    ids, item, _, _ = _served(qwen3_processor, qwen3_reference, c.frames, c.fps)
    tok = qwen3_reference.tokenizer
    text = tok.decode(ids)
    steps = item["video_grid_thw"].data.tolist()[0]
    assert text.count("seconds>") == steps
    assert "<|vision_start|><|vision_end|>" in text  # an empty group: a step DTD dropped whole
    assert text.index("<0.2 seconds>") < text.index("<1.2 seconds>")


def test_timestamped_positions_by_hand():
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1] = False
    mask[1, 1, 2] = True
    pos, nxt = timestamped_mrope_positions(mask, [4, 5, 1], start=10)
    assert pos.tolist() == [
        [10, 11, 12, 13, 14, 14, 14, 14, 14, 14, 17, 18, 19, 20, 21, 22, 25],
        [10, 11, 12, 13, 14, 14, 14, 15, 15, 15, 17, 18, 19, 20, 21, 23, 25],
        [10, 11, 12, 13, 14, 15, 16, 14, 15, 16, 17, 18, 19, 20, 21, 24, 25],
    ]
    assert nxt == 26
    # no token kept in a step: its text keeps the positions it has when the step is kept whole
    full, _ = timestamped_mrope_positions(torch.ones(2, 2, 3, dtype=torch.bool), [4, 5, 1], start=10)
    empty = mask.clone()
    empty[1] = False
    pos, nxt2 = timestamped_mrope_positions(empty, [4, 5, 1], start=10)
    assert nxt2 == 26 and pos[:, -1].tolist() == full[:, -1].tolist() == [25, 25, 25]
    with pytest.raises(ValueError, match="text_lens"):
        timestamped_mrope_positions(mask, [1, 2])


def test_step_text_lens_reads_the_groups():
    from vllm_plugin.models.qwen3_vl import step_text_lens

    VS, VE, V, X = 3, 4, 7, 9
    item = [X, X, VS, V, V, VE, X, VS, VE, X, VS, V, VE]
    assert step_text_lens(item, [2, 0, 1], VS, V) == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="frame groups"):
        step_text_lens(item, [2, 0], VS, V)
    with pytest.raises(ValueError, match="video tokens"):
        step_text_lens(item, [1, 1, 1], VS, V)


def test_qwen3_vision_tower_rows_carry_deepstack_and_decide_on_the_main_output(qwen3_path, qwen3_reference, qwen3_clip):
    """The API server's tower gives vLLM's row layout [main | DeepStack levels]; DTD compares the main part."""
    from vllm_plugin.models.qwen3_vl import DTDQwen3VLMultiModalProcessor
    from vllm_plugin.models.vision import VisionTower

    cfg = qwen3_reference.config.vision_config
    tower = VisionTower.load(
        DTDQwen3VLMultiModalProcessor.vision_tower, str(qwen3_path), cfg, torch.float32, device="cpu"
    )
    video = qwen3_reference.process_video(qwen3_clip.frames[:8], qwen3_clip.fps)
    rows = tower.encode(video.pixel_values, video.grid_thw)
    main, deepstack = qwen3_reference._features(video)
    levels = len(cfg.deepstack_visual_indexes)
    assert rows.shape == (main.shape[0], main.shape[1] * (1 + levels))
    torch.testing.assert_close(rows, torch.cat([main, *deepstack], dim=-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(tower.decision_view(rows), rows[:, : main.shape[1]])


@pytest.mark.parametrize("family", family_names())
def test_family_checkpoints_build_and_load(family):
    """Every family's tiny checkpoint builds, is its own (content hash), and loads in its spec's
    reference pipeline and transformers class; the spec's patch layout is its processor's."""
    from analysis.harness.tiny_model import content_hash, ensure_tiny_model
    from analysis.lib.reference import reference_pipeline
    from analysis.lib.synthetic import make_clip

    spec = get_family(family)
    path = ensure_tiny_model("test", family=family)
    assert (content_hash("test", 0, family) == content_hash("test", 0)) == (family == DEFAULT_FAMILY)
    pipe = reference_pipeline(path)
    assert type(pipe) is load(spec.reference_pipeline)
    archs = json.loads((path / "config.json").read_text())["architectures"]
    assert type(pipe.model).__name__ == spec.reference_class == archs[0]
    vp = pipe.processor.video_processor
    assert (vp.patch_size, vp.merge_size, vp.temporal_patch_size) == (
        spec.patch_size,
        spec.patch_layout.merge_size,
        spec.patch_layout.temporal_patch_size,
    )
    assert tuple(vp.image_mean) == pytest.approx(spec.patch_layout.image_mean)
    assert tuple(vp.image_std) == pytest.approx(spec.patch_layout.image_std)
    clip = make_clip(token_px=spec.token_px)
    ref = pipe.prepare(Q, clip.frames[:8], clip.fps, DTDConfig())
    assert pipe.generate(ref, max_new_tokens=2).token_ids


def test_qwen2_5_vl_checkpoint_is_unchanged_by_families():
    """Today's commands and caches keep working: the default family's content hash is the one before."""
    from analysis.harness.tiny_model import content_hash

    assert content_hash("test", 0)[:12] == "3c6c813fcc93"
    assert content_hash("test", 0, "qwen2_5_vl") == content_hash("test", 0)


def test_workbench_feature_tokens_of_another_family_line_up_with_the_pixel_grid(qwen3_path):
    """The sweep / notebooks take a Qwen3-VL checkpoint for feature tokens: frames scaled to its 32-px
    cells, same (T, H, W) grid as the pixel tokens, the main output (no DeepStack levels)."""
    from analysis.lib.synthetic import make_clip
    from analysis.lib.workbench import tokens_from_frames

    clip = make_clip()
    video = tokens_from_frames(clip.frames[:8], clip.fps)
    feats = video.tokens("feature", qwen3_path)
    assert feats.shape[:3] == video.grid and feats.shape[3] == 128


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--family", "llava"], "--family"),
        (["--criterion", "edges"], "--criterion"),
        (["--video", "/nonexistent.mp4"], "no such video"),
    ],
)
def test_token_count_tool_rejects_bad_arguments(argv, message, capsys):
    from analysis.cli.tokens import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("family, arch", [(s.name, s.dtd_architecture) for s in families()])
def test_dtd_with_vllm_video_pruning_is_refused_at_start(family, arch):
    """DTD and EVS both shorten the video placeholders: the server refuses the pair when it starts
    (the processor is built then), instead of serving mismatched prompts and embeddings."""
    from analysis.harness.tiny_model import ensure_tiny_model
    from conftest import mm_processor

    with pytest.raises(ValueError, match="--video-pruning-rate"):
        mm_processor(ensure_tiny_model("test", family=family), arch, video_pruning_rate=0.5)


def test_qwen3_cached_path_with_per_video_fps_decides_on_the_same_pixels(qwen3_processor, qwen3_clip):
    """Per-video ``fps`` lists send Qwen3-VL's cached path kwargs resolved into scopes
    (``videos_kwargs.do_normalize``); the decision must still read what the HF processor was asked
    (raw pixels under vLLM's ``mm_device_do_normalize``), so cache or not gives the same masks."""
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache

    proc, c = qwen3_processor, qwen3_clip
    tok = proc.info.get_tokenizer()
    V = "<|vision_start|><|video_pad|><|vision_end|>"
    prompt = tok(f"<|im_start|>user\n{V}{V}hi<|im_end|>\n")["input_ids"]
    videos = [c.frames[:24], c.frames[24:48]]

    def run(cache):
        meta = lambda n: {
            "fps": float(c.fps),
            "duration": n / c.fps,
            "total_num_frames": n,
            "frames_indices": list(range(n)),
            "video_backend": "test",
            "do_sample_frames": False,
        }
        items = proc.info.parse_mm_data({"video": [(v, meta(len(v))) for v in videos]})
        out = proc(prompt, items, hf_processor_mm_kwargs={"fps": [2.0, 2.0], "dtd_threshold": 0.1}, cache=cache)
        digests = []
        for i in out["mm_kwargs"]["video"]:
            t, h, w = i["video_grid_thw"].data.tolist()
            digests.append(mask_digest(i["video_dtd_mask"].data.reshape(t, h // 2, w // 2)))
        return digests

    assert run(MultiModalProcessorOnlyCache(proc.info.ctx.model_config)) == run(None)


def test_qwen3_stream_step_times_reach_the_prompt(qwen3_processor, qwen3_clip):
    """A stream chunk's item carries its steps' times (as the client stamped the frames): the prompt
    writes those, not ``frame index / fps``."""
    import numpy as np

    from vllm_plugin.entrypoints.options import GIVEN_MASK, GIVEN_TIMES

    proc, c = qwen3_processor, qwen3_clip
    frames = c.frames[:8]
    meta = {
        "fps": 2.0,
        "duration": 4.0,
        "total_num_frames": 8,
        "frames_indices": list(range(8)),
        "video_backend": "dtd_stream",
        GIVEN_MASK: np.ones((4, 8, 8), bool),
        GIVEN_TIMES: [100.5, 101.5, 107.0, 108.0],
    }
    tok = proc.info.get_tokenizer()
    prompt = tok("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n")["input_ids"]
    out = proc(
        prompt, proc.info.parse_mm_data({"video": [(frames, meta)]}), hf_processor_mm_kwargs={"do_resize": False}
    )
    text = tok.decode(out["prompt_token_ids"])
    assert [t for t in ("<100.5 seconds>", "<101.5 seconds>", "<107.0 seconds>", "<108.0 seconds>") if t in text] == [
        "<100.5 seconds>",
        "<101.5 seconds>",
        "<107.0 seconds>",
        "<108.0 seconds>",
    ]
    assert "<0.2 seconds>" not in text
