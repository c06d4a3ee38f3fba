"""References (vllm_plugin/core/references/): the motion-compensated reference on synthetic pans,
its equality with ``previous`` when nothing moves, and the registry — a reference registered in a
test is validated, decided and processed by the DTD processor with nothing else touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import decide_step_by_step
from vllm_plugin.core import DTDConfig, DTDOptionError, decide_steps, frame_tokens, reference_names
from vllm_plugin.core.references import Comparison, Reference, register_reference, unregister_reference
from vllm_plugin.core.references.motion import candidate_shifts
from vllm_plugin.core.tokens import _l1_scores_8bit

CELL = 28  # pixels per token side (patch 14, merge 2)
DIRECTIONS = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (2, -1), (-3, 3)]


def entering_edge(H: int, W: int, dy: int, dx: int) -> torch.Tensor:
    """bool (H, W): the places whose content was outside the view a step before (panning by dy, dx)."""
    rows = torch.arange(H)[:, None]
    cols = torch.arange(W)[None, :]
    return ((rows < dy) | (rows >= H + dy)) | ((cols < dx) | (cols >= W + dx))


def panned_frames(dy: int, dx: int, steps: int = 5, H: int = 12, W: int = 12, seed: int = 0) -> np.ndarray:
    """uint8 (2·steps, H·28, W·28, 3): a random texture seen through a window that moves so that the
    content moves by (dy, dx) tokens per temporal step (two identical frames per step)."""
    rng = np.random.default_rng(seed)
    margin = 4 * steps
    big = rng.integers(0, 256, size=((H + 2 * margin) * CELL, (W + 2 * margin) * CELL, 3), dtype=np.uint8)
    frames = []
    for t in range(steps):
        y, x = (margin - t * dy) * CELL, (margin - t * dx) * CELL
        frames += [big[y : y + H * CELL, x : x + W * CELL]] * 2
    return np.stack(frames)


@pytest.mark.parametrize("dy,dx", DIRECTIONS)
def test_motion_keeps_only_the_entering_edge_of_a_pan_pixel_level(dy, dx):
    tokens = frame_tokens(torch.from_numpy(panned_frames(dy, dx)))
    T, H, W, _ = tokens.shape
    motion = decide_steps(tokens, DTDConfig(reference="motion"))
    edge = entering_edge(H, W, dy, dx)
    assert motion.mask[0].all()
    for t in range(1, T):
        assert torch.equal(motion.mask[t], edge), f"step {t}"
    assert motion.offsets == ((0, 0),) + ((dy, dx),) * (T - 1)
    # the paper's rule keeps everything of a pan of a texture
    assert decide_steps(tokens, DTDConfig(reference="previous")).mask.all()


@pytest.mark.parametrize("dy,dx", DIRECTIONS)
def test_motion_keeps_only_the_entering_edge_of_a_pan_feature_level(dy, dx):
    g = torch.Generator().manual_seed(1)
    H = W = 12
    big = torch.randn(H + 40, W + 40, 32, generator=g)
    steps = [big[20 - t * dy : 20 - t * dy + H, 20 - t * dx : 20 - t * dx + W] for t in range(5)]
    tokens = torch.stack(steps)
    d = decide_steps(tokens, DTDConfig(criterion="feature", reference="motion"))
    for t in range(1, 5):
        assert torch.equal(d.mask[t], entering_edge(H, W, dy, dx))


def test_the_8bit_scorer_decides_motion_as_the_float_path():
    frames = torch.from_numpy(panned_frames(1, -2, steps=4))
    raw = frame_tokens(frames, rescale_factor=1.0).to(torch.uint8)  # raw pixel values, token order
    config = DTDConfig(reference="motion", threshold=0.05)
    fast = decide_steps(raw, config, score=_l1_scores_8bit(0.05, 1 / 255))
    slow = decide_steps(frame_tokens(frames), config)
    assert torch.equal(fast.mask, slow.mask) and fast.offsets == slow.offsets


def test_zero_motion_is_previous_bit_for_bit():
    """A fixed view with sensor noise and a moving object: no candidate translation, the masks are
    ``previous``'s exactly (the scores at offset (0, 0) are the same call)."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 200, size=(12 * CELL, 12 * CELL, 3)).astype(np.int16)
    frames = []
    for t in range(8):
        f = base + rng.integers(-6, 7, size=base.shape)
        f[CELL * t : CELL * (t + 2), CELL : CELL * 3] = 250  # an object walking down
        frames += [np.clip(f, 0, 255).astype(np.uint8)] * 2
    tokens = frame_tokens(torch.from_numpy(np.stack(frames)))
    for t in range(1, tokens.shape[0]):
        assert candidate_shifts(tokens[t], tokens[t - 1]) == []
    for threshold in (0.01, 0.03, 0.05, 0.2):
        motion = decide_steps(tokens, DTDConfig(reference="motion", threshold=threshold))
        previous = decide_steps(tokens, DTDConfig(reference="previous", threshold=threshold))
        assert torch.equal(motion.mask, previous.mask) and torch.equal(motion.state, previous.state)


def test_chunked_equals_whole_for_a_pan():
    tokens = frame_tokens(torch.from_numpy(panned_frames(-1, 2, steps=6)))
    config = DTDConfig(reference="motion")
    assert torch.equal(decide_step_by_step(tokens, config), decide_steps(tokens, config).mask)


@pytest.fixture
def toy_reference():
    """A reference written in a test: every step is compared with the video's FIRST step."""

    @register_reference
    class First(Reference):
        name = "first_step"

        def start(self, first):
            return first.clone()

        def compare(self, current, state, score, redundant):
            return Comparison(score(current, state))

        def update(self, state, current, keep):
            return state

    yield "first_step"
    unregister_reference("first_step")


def test_a_registered_reference_is_a_setting_everywhere(toy_reference):
    assert toy_reference in reference_names()
    config = DTDConfig.from_kwargs({"dtd_reference": toy_reference, "dtd_threshold": 0.1})
    assert config.reference == toy_reference and DTDConfig.from_kwargs(config.to_kwargs()) == config
    x = torch.zeros(4, 2, 2, 3)
    x[1] = 0.06  # each step 0.06 from the previous one: previous drops steps 1-3 at τ 0.1 ...
    x[2] = 0.12
    x[3] = 0.18
    assert not decide_steps(x, DTDConfig(threshold=0.1)).mask[1:].any()
    # ... against the first step, 2 and 3 are too far
    assert decide_steps(x, config).mask[:, 0, 0].tolist() == [True, False, True, True]
    unregister_reference(toy_reference)
    with pytest.raises(DTDOptionError) as e:
        DTDConfig.from_kwargs({"dtd_reference": toy_reference})
    assert e.value.field == "dtd_reference"


def test_a_registered_reference_is_processed_by_the_dtd_processor(toy_reference, dtd_processor, synthetic_clip):
    from test_glue_units import _apply, _video

    from vllm_plugin.models.base import MASK_KEY

    frames = synthetic_clip.frames
    out, n_pad = _apply(dtd_processor, [_video(frames)], dtd_threshold=0.05, dtd_reference=toy_reference)
    served = out["mm_kwargs"]["video"][0][MASK_KEY].data
    expected = decide_steps(
        frame_tokens(torch.from_numpy(frames)), DTDConfig(threshold=0.05, reference=toy_reference)
    ).mask
    assert torch.equal(served, expected.flatten()) and n_pad == int(expected.sum())
    assert not torch.equal(
        expected, decide_steps(frame_tokens(torch.from_numpy(frames)), DTDConfig(threshold=0.05)).mask
    )
    motion, _ = _apply(dtd_processor, [_video(frames)], dtd_threshold=0.05, dtd_reference="motion")
    want = decide_steps(frame_tokens(torch.from_numpy(frames)), DTDConfig(threshold=0.05, reference="motion")).mask
    assert torch.equal(motion["mm_kwargs"]["video"][0][MASK_KEY].data, want.flatten())


def test_relative_mode_is_a_request_option(dtd_processor, synthetic_clip):
    """``dtd_drop_ratio``: every step after the first keeps the same count, whatever the content
    (the bound on a video with nothing to drop)."""
    from test_glue_units import _apply, _video

    from vllm_plugin.models.base import MASK_KEY

    frames = synthetic_clip.frames
    out, n_pad = _apply(dtd_processor, [_video(frames)], dtd_drop_ratio=0.75)
    mask = out["mm_kwargs"]["video"][0][MASK_KEY].data
    T, H, W = frame_tokens(torch.from_numpy(frames)).shape[:3]
    per_step = mask.view(T, H * W).sum(1).tolist()
    assert per_step == [H * W] + [H * W - int(H * W * 0.75)] * (T - 1) and n_pad == sum(per_step)


@pytest.mark.parametrize("reference", ["previous", "last_kept", "motion"])
def test_a_stream_decides_each_append_as_the_whole_video(reference, synthetic_clip):
    """Streams (DecisionState, what every append runs) with any reference: chunked = whole, on a pan
    and on the synthetic clip (cuts, motion, a fade)."""
    from vllm_plugin.streams.decision import DecisionState

    for frames in (panned_frames(1, -1, steps=8), synthetic_clip.frames):
        config = DTDConfig(threshold=0.05, reference=reference)
        stream = DecisionState(config)
        cuts = [0, 2, 6, 8, 14, len(frames)]
        masks = [stream.decide(stream.pixel_tokens(frames[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]
        whole = decide_steps(frame_tokens(torch.from_numpy(frames)), config)
        assert torch.equal(torch.cat(masks), whole.mask)


def test_request_options_round_trip_and_hostile_numbers_are_option_errors():
    for kwargs in (
        {},
        {"dtd_reference": "motion", "dtd_threshold": 0.1},
        {"dtd_drop_ratio": 0.5, "dtd_metric": "cosine"},
        {"dtd_criterion": "feature", "dtd_enabled": False},
    ):
        c = DTDConfig.from_kwargs(kwargs)
        assert DTDConfig.from_kwargs(c.to_kwargs()) == c
    relative = DTDConfig.from_kwargs({"dtd_drop_ratio": 0.5})
    assert "dtd_threshold" not in relative.to_kwargs()  # one mode: relative mode reads no threshold
    # a server default of relative mode is switched off per request with null
    assert DTDConfig.from_kwargs({"dtd_drop_ratio": None, "dtd_threshold": 0.1}).drop_ratio is None
    for key in ("dtd_threshold", "dtd_drop_ratio"):
        for value in (10**400, -(10**400), float("nan"), "0.1", True):
            with pytest.raises(DTDOptionError) as e:
                DTDConfig.from_kwargs({key: value})
            assert e.value.field == key


def test_nan_feature_tokens_are_refused_by_a_stream_decision():
    from vllm_plugin.streams.decision import DecisionState

    tokens = torch.rand(2, 3, 3, 16)
    tokens[1, 1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        DecisionState(DTDConfig(criterion="feature", reference="motion")).decide(tokens)
