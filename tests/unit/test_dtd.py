"""The DTD core contract (vllm_plugin/core/): masks, relative mode, chunking, references, positions, stats, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import decide_step_by_step
from vllm_plugin.core import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DTDConfig,
    PatchLayout,
    decide_steps,
    dtd_keep_mask,
    frame_tokens,
    kept_thw,
    mask_stats,
    mrope_positions,
    pixel_keep_mask,
    pixel_tokens,
    token_scores,
)

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


@st.composite
def token_grids(draw, max_t=6, max_hw=4, max_c=5):
    T = draw(st.integers(1, max_t))
    H = draw(st.integers(1, max_hw))
    W = draw(st.integers(1, max_hw))
    C = draw(st.integers(1, max_c))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # quantized values so that equal/near-equal tokens actually occur
    x = torch.randint(0, 4, (T, H, W, C), generator=g).float() / 3.0
    return x


metric_thresholds = st.one_of(
    st.tuples(st.just("cosine"), st.floats(-1.0, 1.0)),
    st.tuples(st.just("l1"), st.floats(0.0, 1.0)),
)
references = st.sampled_from(["previous", "last_kept", "motion"])


@given(token_grids(), metric_thresholds, references)
def test_frame_zero_always_kept(x, mt, reference):
    metric, thr = mt
    m = dtd_keep_mask(x, thr, metric=metric, reference=reference)
    assert m.shape == x.shape[:3] and m.dtype == torch.bool
    assert m[0].all()


@given(token_grids(max_t=1), st.integers(2, 6), metric_thresholds, references)
def test_identical_frames_keep_only_frame_zero(x, T, mt, reference):
    metric, thr = mt
    # identical frames: cosine similarity 1 (> thr unless thr == 1), l1 difference 0 (< thr unless thr == 0)
    # float32 cosine of identical vectors can be 1 - 6e-8: thresholds that close to 1 are noise
    if (metric == "cosine" and thr > 0.9999) or (metric == "l1" and thr <= 0.0):
        thr = 0.5
    x = x.expand(T, *x.shape[1:]).clone() + 0.25  # no zero vectors: cosine is defined
    m = dtd_keep_mask(x, thr, metric=metric, reference=reference)
    assert m[0].all() and not m[1:].any()


@given(token_grids(), st.floats(-1.0, 1.0), st.floats(-1.0, 1.0))
def test_cosine_monotone_previous(x, a, b):
    strict, loose = max(a, b), min(a, b)  # a higher cosine threshold drops less
    m_strict = dtd_keep_mask(x, strict, "cosine", "previous")
    m_loose = dtd_keep_mask(x, loose, "cosine", "previous")
    assert (m_strict | ~m_loose).all()  # strict keeps a superset


@given(token_grids(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_l1_monotone_previous(x, a, b):
    strict, loose = min(a, b), max(a, b)  # a lower l1 threshold drops less
    m_strict = dtd_keep_mask(x, strict, "l1", "previous")
    m_loose = dtd_keep_mask(x, loose, "l1", "previous")
    assert (m_strict | ~m_loose).all()


def test_last_kept_catches_slow_drift_previous_misses():
    T, H, W, C = 10, 2, 2, 3
    base = torch.full((H, W, C), 0.2)
    x = torch.stack([base + 0.03 * t for t in range(T)])  # 0.03 per step, 0.27 in total
    prev = dtd_keep_mask(x, 0.05, "l1", "previous")
    last = dtd_keep_mask(x, 0.05, "l1", "last_kept")
    assert prev[1:].sum() == 0  # each step is below the threshold: drift hidden forever
    assert last[1:].sum() > 0  # against the last kept token the drift shows
    # kept exactly every second step: 0.06 ≥ 0.05 since the last kept one
    assert last[:, 0, 0].tolist() == [True, False, True, False, True, False, True, False, True, False]


def test_scores_match_definitions():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    assert torch.allclose(token_scores(a, b, "cosine"), torch.tensor([0.0, 0.375 / math.sqrt(0.5 * 0.3125)]))
    assert torch.allclose(token_scores(a, b, "l1"), torch.tensor([1.0, 0.125]))


def test_threshold_direction_matches_reference_code():
    # cosine > thr drops; l1 < thr drops (equality keeps)
    x = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])  # similarity 1, difference 0
    assert not dtd_keep_mask(x, 0.999, "cosine")[1].any()
    assert dtd_keep_mask(x, 1.0, "cosine")[1].all()
    assert not dtd_keep_mask(x, 0.001, "l1")[1].any()
    assert dtd_keep_mask(x, 0.0, "l1")[1].all()


@given(token_grids(max_t=8), st.integers(1, 7), metric_thresholds, references)
def test_chunked_equals_whole(x, split, mt, reference):
    metric, thr = mt
    if x.shape[0] < 2:
        return
    split = 1 + split % (x.shape[0] - 1)
    config = DTDConfig(threshold=thr, metric=metric, reference=reference)
    whole = decide_steps(x, config)
    first = decide_steps(x[:split], config)
    second = decide_steps(x[split:], config, state=first.state)
    assert torch.equal(torch.cat([first.mask, second.mask]), whole.mask)
    assert torch.equal(second.state, whole.state) and whole.offsets == first.offsets + second.offsets
    assert torch.equal(decide_step_by_step(x, config), whole.mask)  # step by step (what a stream does)
    assert torch.equal(dtd_keep_mask(x[split:], thr, metric, reference, initial_reference=first.state), second.mask)


def relative_kept_counts(T, n, ratio):
    k = n - int(n * ratio)
    return [n] + [k] * (T - 1)


@given(token_grids(), st.floats(0.0, 1.0), st.sampled_from(["cosine", "l1"]), references)
def test_relative_mode_counts(x, ratio, metric, reference):
    T, H, W, _ = x.shape
    m = dtd_keep_mask(x, metric=metric, reference=reference, drop_ratio=ratio)
    if reference == "motion":  # the entering edge is kept on top of the count
        assert all(k >= want for k, want in zip(mask_stats(m).kept_per_step, relative_kept_counts(T, H * W, ratio)))
    else:
        assert mask_stats(m).kept_per_step == tuple(relative_kept_counts(T, H * W, ratio))


def test_relative_mode_drops_most_redundant():
    x = torch.zeros(2, 1, 4, 1)
    x[0] = 0.5
    x[1, 0] = torch.tensor([[0.5], [0.9], [0.45], [0.0]])  # l1 diffs 0, 0.4, 0.05, 0.5
    m = dtd_keep_mask(x, metric="l1", drop_ratio=0.5)
    assert m[1, 0].tolist() == [False, True, False, True]
    x10 = torch.rand(3, 2, 5, 4)
    assert mask_stats(dtd_keep_mask(x10, drop_ratio=0.25)).kept_per_step == (10, 8, 8)  # int(10 * 0.25) = 2 dropped


def test_kept_positions_hand_computed():
    mask = torch.tensor(
        [
            [[True, True, True], [True, True, True]],
            [[False, True, False], [True, False, False]],
            [[False, False, False], [False, False, True]],
        ]
    )
    assert kept_thw(mask).tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 0, 2],
        [0, 1, 0],
        [0, 1, 1],
        [0, 1, 2],
        [1, 0, 1],
        [1, 1, 0],
        [2, 1, 2],
    ]
    # second_per_grid_t = 2 / fps(1) = 2 s, tokens_per_second = 2 -> t index 0, 4, 8; start at 10
    pos, nxt = mrope_positions(mask, start=10, second_per_grid_t=2.0, tokens_per_second=2)
    assert pos.tolist() == [
        [10, 10, 10, 10, 10, 10, 14, 14, 18],
        [10, 10, 10, 11, 11, 11, 10, 11, 11],
        [10, 11, 12, 10, 11, 12, 11, 10, 12],
    ]
    assert nxt == 19  # 1 + max position of the FULL grid (t index 8)
    # dropping the whole last frame does not move the text after the video
    mask2 = mask.clone()
    mask2[2] = False
    assert mrope_positions(mask2, start=10, second_per_grid_t=2.0, tokens_per_second=2)[1] == 19
    # fractional time scaling is truncated like the model does: 0.5 s * 2 = 1 per step
    pos, nxt = mrope_positions(torch.ones(3, 1, 1, dtype=torch.bool), 0, second_per_grid_t=0.25, tokens_per_second=2)
    assert pos[0].tolist() == [0, 0, 1] and nxt == 2


def test_stats():
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)
    mask[0] = True
    mask[2, 0, 1] = True
    s = mask_stats(mask)
    assert s.kept_per_step == (4, 0, 1) and s.total == 12 and s.kept == 5
    assert s.drop_ratio == pytest.approx(7 / 12)
    assert s.as_dict()["kept_per_step"] == [4, 0, 1]
    assert s.kept_fraction_per_step == (1.0, 0.0, 0.25)


def test_pixel_tokens_layout_and_denormalization():
    # Build processed patches exactly as Qwen2-VL's processor lays them out, from a known video.
    t, gh, gw, ps, tps, m, C = 2, 4, 6, 14, 2, 2, 3
    g = torch.Generator().manual_seed(0)
    video = torch.rand(t * tps, C, gh * ps, gw * ps, generator=g)  # frames in [0, 1]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    norm = (video - mean) / std
    p = norm.reshape(t, tps, C, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = p.reshape(t * gh * gw, C * tps * ps * ps)
    tok = pixel_tokens(pixel_values, (t, gh, gw))
    assert tok.shape == (t, gh // m, gw // m, C * tps * m * m * ps * ps)
    # raw pixel values (vLLM's device-side normalization): same tokens after rescaling
    raw = (video * 255.0).reshape(t, tps, C, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    tok_raw = pixel_tokens(raw.reshape(t * gh * gw, -1), (t, gh, gw), normalized=False)
    assert torch.allclose(tok_raw, tok, atol=1e-5)
    for ti, hi, wi in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
        region = video[ti * tps : (ti + 1) * tps, :, hi * 28 : (hi + 1) * 28, wi * 28 : (wi + 1) * 28]
        assert torch.allclose(tok[ti, hi, wi].sort().values, region.flatten().sort().values, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dtd_keep_mask(torch.zeros(0, 2, 2, 3), 0.5), "non-empty"),
        (lambda: dtd_keep_mask(torch.zeros(2, 2, 3), 0.5), "rank 4"),
        (lambda: dtd_keep_mask(torch.tensor([[[[float("nan")]]]]), 0.5), "NaN or inf"),
        (lambda: dtd_keep_mask(torch.tensor([[[[float("inf")]]]]), 0.5), "NaN or inf"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), 1.5, "cosine"), r"\[-1.0, 1.0\]"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), -0.1, "l1"), r"\[0.0, 1.0\]"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), float("nan")), "threshold"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), True), "must be a number"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), 0.5, "l2"), "metric"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), 0.5, "cosine", "first"), "reference"),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1, dtype=torch.long), 0.5), "floating-point"),
        (lambda: dtd_keep_mask([[1.0]], 0.5), "torch.Tensor"),
        (
            lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), 0.5, initial_reference=torch.ones(2, 2, 1)),
            "initial_reference",
        ),
        (lambda: dtd_keep_mask(torch.ones(2, 1, 1, 1), drop_ratio=1.5), "drop_ratio"),
        (lambda: pixel_tokens(torch.zeros(10, 1176), (1, 2, 2)), "patches"),
        (lambda: pixel_tokens(torch.zeros(8, 1176), (2, 2, 3)), "divisible"),
        (lambda: DTDConfig(threshold=2.0, metric="cosine"), "dtd_threshold"),
        (lambda: DTDConfig(metric="dot"), "dtd_metric"),
        (lambda: DTDConfig(reference="x"), "dtd_reference"),
        (lambda: DTDConfig(enabled="yes"), "dtd_enabled"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dtd_module_imports_without_vllm():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['vllm'] = None; sys.modules['transformers'] = None\n"
        "import vllm_plugin.core as d; print(d.dtd_keep_mask.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "dtd_keep_mask"


def test_frame_tokens_equal_pixel_tokens_of_raw_patches():
    t, gh, gw, ps, tps, m, C = 3, 4, 6, 14, 2, 2, 3
    frames = torch.randint(0, 256, (t * tps, gh * ps, gw * ps, C), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )
    # Qwen2-VL's processor layout of the same (unresized, unnormalized) frames
    v = frames.permute(0, 3, 1, 2).float()
    p = v.reshape(t, tps, C, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    from_patches = pixel_tokens(p.reshape(t * gh * gw, -1), (t, gh, gw), normalized=False)
    assert torch.equal(frame_tokens(frames), from_patches)
    with pytest.raises(ValueError, match="multiple"):
        frame_tokens(frames[:5])


@st.composite
def patch_videos(draw):
    """Processed patches (T*h*w, 3*2*14*14) as uint8 raw pixels or normalized floats, with low-amplitude
    changes between steps so both kept and dropped tokens occur."""
    T, H, W = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randint(0, 256, (1, H * W * 4, 1176), generator=g).float()
    noise = torch.randint(-12, 13, (T, H * W * 4, 1176), generator=g) * (torch.rand(T, H * W * 4, 1, generator=g) < 0.5)
    raw = (base + noise.cumsum(0)).clamp(0, 255).reshape(T * H * W * 4, 1176)
    if draw(st.booleans()):
        return raw.to(torch.uint8), (T, 2 * H, 2 * W), False
    mean = torch.tensor(OPENAI_CLIP_MEAN).repeat_interleave(392)
    std = torch.tensor(OPENAI_CLIP_STD).repeat_interleave(392)
    return (raw / 255.0 - mean) / std, (T, 2 * H, 2 * W), True


@settings(max_examples=60, deadline=None)
@given(patch_videos(), metric_thresholds, references, st.integers(0, 4))
def test_pixel_keep_mask_equals_keep_mask_of_pixel_tokens(video, mt, reference, ref_steps):
    pv, grid, normalized = video
    metric, threshold = mt
    ref_steps = min(ref_steps, grid[0] - 1) if reference == "previous" else 0
    tokens = pixel_tokens(pv, grid, normalized=normalized)
    want = dtd_keep_mask(
        tokens[ref_steps:], threshold, metric, reference, initial_reference=tokens[ref_steps - 1] if ref_steps else None
    )
    got = pixel_keep_mask(pv, grid, threshold, metric, reference, reference_steps=ref_steps, normalized=normalized)
    assert torch.equal(got, want)  # bit for bit, not approximately


def _on_threshold_videos():
    """Two-step uint8 patch videos (2x2 grid of 4-patch tokens, C = 4704) whose second step differs
    from the first by ``S`` levels in token (0, 0), with τ = S / (255 C): exact score ON τ."""
    g = torch.Generator().manual_seed(7)
    for S in (1, 7, 235, 4703, 59976, 123457):
        first = torch.randint(0, 128, (4, 1176), generator=g).to(torch.uint8).repeat(4, 1)  # 4 tokens of 4 patches
        second = first.clone()
        token = second[:4].view(-1)  # token (0, 0): its four patches, C = 4704 elements
        per, rest = divmod(S, token.numel())
        token.add_(per)
        token[:rest] += 1
        yield S, torch.cat([first, second]), S / (255 * 4704)


def test_8bit_l1_decisions_on_the_threshold_are_the_float_paths():
    """The uint8 L1 path (integer sums) decides every token as the float definition does, also where
    the exact score equals τ: there it defers to the float path; without that band it would not."""
    import vllm_plugin.core.tokens as tk

    for S, pv, tau in _on_threshold_videos():
        want = dtd_keep_mask(pixel_tokens(pv, (2, 4, 4), normalized=False), tau, "l1")
        got = pixel_keep_mask(pv, (2, 4, 4), tau, "l1", normalized=False)
        assert torch.equal(got, want), S
    band = tk._EXACT_BAND
    try:
        tk._EXACT_BAND = 0.0
        differ = [
            S
            for S, pv, tau in _on_threshold_videos()
            if not torch.equal(
                pixel_keep_mask(pv, (2, 4, 4), tau, "l1", normalized=False),
                dtd_keep_mask(pixel_tokens(pv, (2, 4, 4), normalized=False), tau, "l1"),
            )
        ]
    finally:
        tk._EXACT_BAND = band
    assert differ, "no on-threshold case where integer and float scores decide differently: the test proves nothing"


def test_8bit_l1_path_scores_without_floats_away_from_the_threshold(monkeypatch):
    import vllm_plugin.core.tokens as tk

    g = torch.Generator().manual_seed(3)
    pv = torch.randint(0, 256, (3 * 16, 1176), generator=g).to(torch.uint8)
    want = dtd_keep_mask(pixel_tokens(pv, (3, 4, 4), normalized=False), 0.05, "l1", reference="last_kept")
    calls = []
    monkeypatch.setattr(tk, "token_scores", lambda *a: calls.append(1) or token_scores(*a))
    monkeypatch.setattr(tk, "_StepTokens", None)  # the float path's step buffers: not used
    assert torch.equal(pixel_keep_mask(pv, (3, 4, 4), 0.05, "l1", "last_kept", normalized=False), want)
    assert not calls  # random pixels score ~0.33, far from τ: integer sums alone decided


@pytest.mark.parametrize(
    "rescale, tau", [(-1 / 255, 0.05), (-1 / 255, 0.0), (1e-50, 1e-60), (1e-42, 5e-43), (1e-45, 1.2e-45)]
)
def test_8bit_l1_path_is_left_where_float32_cannot_carry_the_scale(rescale, tau):
    """Counterexamples a review found: a negative rescale (the float path's abs removes the sign) and
    ones float32 underflows; there the float path decides."""
    pv = torch.randint(0, 256, (8, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for reference in ("previous", "last_kept"):
        layout = PatchLayout(rescale_factor=rescale, normalized=False)
        want = dtd_keep_mask(pixel_tokens(pv, (2, 2, 2), layout), tau, "l1", reference)
        assert torch.equal(pixel_keep_mask(pv, (2, 2, 2), tau, "l1", reference, layout=layout), want)


def test_pixel_keep_mask_bad_input():
    pv = torch.zeros(8, 1176)
    with pytest.raises(ValueError, match="reference_steps"):
        pixel_keep_mask(pv, (2, 2, 2), 0.05, reference_steps=2)
    with pytest.raises(ValueError, match="patches"):
        pixel_keep_mask(pv, (3, 2, 2), 0.05)
    pv[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pixel_keep_mask(pv, (2, 2, 2), 0.05)
