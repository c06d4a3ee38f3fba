"""Decoding (PyAV) at a chosen fps, the bundled clip, the synthetic generator's ground truth."""

import hashlib

import numpy as np
import pytest
import torch

from analysis.lib.video import SAMPLE_VIDEO, VideoDecodeError, load_video
from vllm_plugin.core import dtd_keep_mask, mask_stats, pixel_tokens


def test_bundled_clip_is_the_attributed_file():
    digest = hashlib.sha256(SAMPLE_VIDEO.read_bytes()).hexdigest()
    assert digest == "15849a8be4e2c958173002803aed25c031bb152262597f3198cb01ef7ba4a6ad"
    assert "moviepy" in (SAMPLE_VIDEO.parent / "NOTICE.md").read_text()


def test_load_at_chosen_fps():
    v1 = load_video(SAMPLE_VIDEO, fps=1.0)
    assert v1.frames.shape[1:] == (360, 640, 3) and v1.frames.dtype == np.uint8
    assert len(v1) == 12  # 11.2 s at 1 fps: t = 0 .. 11
    assert np.allclose(np.diff(v1.timestamps), 1.0, atol=0.05)
    v2 = load_video(SAMPLE_VIDEO, fps=2.0)
    assert len(v2) == 23  # t = 0, 0.5 .. 11.0
    vall = load_video(SAMPLE_VIDEO, fps=None)
    assert len(vall) == pytest.approx(280, abs=2) and vall.source_fps == pytest.approx(25.0)
    assert len(load_video(SAMPLE_VIDEO, fps=1.0, max_frames=3)) == 3
    w = load_video(SAMPLE_VIDEO, fps=1.0, start=2.0, end=5.0)
    assert len(w) == 3 and w.timestamps[0] == pytest.approx(0.0, abs=0.05)


def test_bad_files_raise_typed_errors(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such"):
        load_video(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError):
        load_video(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01 this is not a video" * 100)
    with pytest.raises(VideoDecodeError):
        load_video(junk)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(SAMPLE_VIDEO.read_bytes()[:4000])
    with pytest.raises(VideoDecodeError):
        load_video(truncated)
    with pytest.raises(ValueError, match="fps"):
        load_video(SAMPLE_VIDEO, fps=0)


def test_synthetic_clip_ground_truth(synthetic_clip):
    c = synthetic_clip
    assert c.frames.shape == (48, 224, 224, 3)
    assert c.cut_steps == [12, 16]
    assert c.static_steps == [1, 2, 3, 4, 5, 13, 14, 15, 17, 18, 19]
    kept = c.expected_kept_per_step()
    assert kept[0] == 64 and all(kept[s] == 2 for s in range(6, 12)) and kept[12] == kept[16] == 64
    # deterministic
    from analysis.lib.synthetic import make_clip

    assert np.array_equal(make_clip().frames, c.frames)
    assert not np.array_equal(make_clip(seed=1).frames, c.frames)


def test_synthetic_roundtrip_through_mp4_is_lossless(synthetic_clip, synthetic_mp4):
    v = load_video(synthetic_mp4, fps=None)
    assert v.source_fps == pytest.approx(2.0)
    assert np.array_equal(v.frames, synthetic_clip.frames)


def test_pixel_dtd_on_processed_synthetic_equals_ground_truth(reference, synthetic_clip):
    """Static regions dropped; cuts, the fade and the moving object kept — exactly."""
    video = reference.process_video(synthetic_clip.frames, synthetic_clip.fps)
    assert video.llm_grid == (24, 8, 8)
    tokens = pixel_tokens(video.pixel_values, video.grid_thw)
    for reference_mode in ("previous", "last_kept"):
        mask = dtd_keep_mask(tokens, 0.01, metric="l1", reference=reference_mode)
        assert torch.equal(mask, torch.from_numpy(synthetic_clip.changed))
    stats = mask_stats(mask)
    assert list(stats.kept_per_step) == synthetic_clip.expected_kept_per_step()
    assert stats.drop_ratio == pytest.approx(1 - sum(synthetic_clip.expected_kept_per_step()) / (24 * 64))
    # cosine is blind to a uniform fade (scaled pixels point the same way) but sees cuts and motion
    cos = dtd_keep_mask(tokens, 0.999, metric="cosine")
    assert cos[20:].sum() == 0 and cos[12].all() and cos[16].all() and cos[6:12].sum() == 12
