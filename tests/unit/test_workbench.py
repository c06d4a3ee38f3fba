"""analysis/ workbench functions (what the notebooks and the sweep CLI call)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.lib.explore import Explorer
from analysis.lib.figures import (
    kept_tokens_figure,
    overlay_figure,
    overlay_image,
    serving_figure,
    stream_ttft_figure,
    threshold_figure,
)
from analysis.lib.video import SAMPLE_VIDEO
from analysis.lib.workbench import cell_key, load_tokens, parse_range, sweep, tokens_from_frames
from conftest import REPO, renders_offline
from vllm_plugin.core import dtd_keep_mask, pixel_tokens


def test_parse_range():
    assert parse_range("0.5:1.0:0.05") == [round(0.5 + 0.05 * i, 10) for i in range(11)]
    assert parse_range("0.1,0.2") == [0.1, 0.2]
    for bad in ("1:0:0.1", "0:1:0", "0:1"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_tokens_match_the_processor(reference, synthetic_clip):
    v = tokens_from_frames(synthetic_clip.frames, synthetic_clip.fps, name="syn")
    processed = reference.process_video(v.frames, v.fps)
    assert torch.allclose(v.pixel, pixel_tokens(processed.pixel_values, processed.grid_thw), atol=1e-6)
    assert v.step_times[:3] == [0.0, 1.0, 2.0]


def test_load_tokens_resizes_and_pads():
    v = load_tokens(SAMPLE_VIDEO, fps=1.0, max_frames=5)
    assert len(v.frames) == 6 and v.grid == (3, 12, 21) and v.frames.shape[1:3] == (336, 588)
    assert np.array_equal(v.frames[5], v.frames[4])  # padded with the last frame, like the processor


def test_sweep_grid_skip_and_feature_criterion(synthetic_clip):
    v = tokens_from_frames(synthetic_clip.frames, synthetic_clip.fps, name="syn")
    rows = sweep([v], [0.01, 0.5, 1.5], metrics=["l1", "cosine"], references=["previous", "last_kept"], progress=False)
    assert len(rows) == 2 * 2 + 2 * 3 - 2  # l1 skips 1.5 (out of range); cosine keeps all three
    r = next(r for r in rows if r["metric"] == "l1" and r["threshold"] == 0.01 and r["reference"] == "previous")
    assert r["kept_per_step"] == synthetic_clip.expected_kept_per_step() and r["seconds"] >= 0
    again = sweep(
        [v],
        [0.01, 0.5],
        metrics=["l1"],
        references=["previous"],
        progress=False,
        skip={cell_key("syn", "pixel", "l1", "previous", 0.01)},
    )
    assert [x["threshold"] for x in again] == [0.5]
    feat = sweep([v], [0.9], metrics=["cosine"], references=["previous"], criteria=["feature"], progress=False)
    assert feat[0]["criterion"] == "feature" and feat[0]["kept_per_step"][0] == 64
    assert all(feat[0]["kept_per_step"][s] == 0 for s in synthetic_clip.static_steps)


def test_sweep_cli_writes_tables_report_and_skips_on_rerun(tmp_path, request):
    cmd = [
        sys.executable,
        "-m",
        "analysis.cli.sweep",
        "--video",
        str(SAMPLE_VIDEO),
        "--thresholds",
        "0.5:1.0:0.25",
        "--metric",
        "cosine,l1",
        "--reference",
        "previous,last_kept",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "12 cells run, 0 already" in first.stdout
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert len(df) == 12 and set(df.metric) == {"cosine", "l1"} and df.drop_ratio.between(0, 1).all()
    assert (tmp_path / "results.csv").is_file() and "DTD sweep" in (tmp_path / "report.html").read_text()
    renders_offline(request, tmp_path / "report.html", expected_plots=5)  # drop ratio + one per (metric, reference)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "0 cells run, 12 already" in again.stdout
    bad = subprocess.run(
        cmd[:-4] + ["--metric", "dot", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--metric" in bad.stderr


def test_figures(synthetic_clip):
    mask = dtd_keep_mask(tokens_from_frames(synthetic_clip.frames, 2.0).pixel, 0.05, "l1")
    img = overlay_image(synthetic_clip.frames[24], mask[12].numpy())
    assert img.shape == (224, 224, 3) and np.array_equal(img, synthetic_clip.frames[24])  # a cut: all kept
    img = overlay_image(synthetic_clip.frames[2], mask[1].numpy())
    assert (img < synthetic_clip.frames[2]).any()  # a static step: all dropped, shaded
    assert len(overlay_figure(synthetic_clip.frames, mask.numpy()).frames) == 24
    assert "0/64 kept" in overlay_figure(synthetic_clip.frames, mask.numpy(), step=1).layout.title.text
    fig = kept_tokens_figure([64, 0, 2], 64, times=[0, 1, 2], events=[1.0])
    assert list(fig.data[0].y) == [64, 0, 2] and len(fig.layout.shapes) == 1
    rows = [
        {
            "video": "v",
            "criterion": "pixel",
            "metric": "l1",
            "reference": "previous",
            "threshold": t,
            "drop_ratio": t / 2,
        }
        for t in (0.2, 0.1)
    ]
    assert list(threshold_figure(rows).data[0].x) == [0.1, 0.2]
    assert (
        len(
            serving_figure(
                [
                    {"threshold": None, "latency_s": 1, "prompt_tokens": 9},
                    {"threshold": 0.1, "latency_s": 0.5, "prompt_tokens": 5},
                ]
            ).data
        )
        == 2
    )
    assert (
        len(stream_ttft_figure([{"time_s": 1, "ttft_s": 0.1}], [{"time_s": 1, "ttft_s": 1.0}], events=[0.5]).data) == 2
    )


def test_explorer_logic_and_widgets():
    e = Explorer(fps=1.0, max_frames=8)
    r = e.compute("synthetic (cuts, motion, fade)", 0.05, "l1", step=12)
    assert r["kept_per_step"][12] == 64 and "drop 70.1%" in r["curve"].layout.title.text
    w = e.widget
    before = e.last["drop_ratio"]
    e.w_threshold.value = 0.4
    assert e.last["drop_ratio"] > before  # the slider recomputes
    e.w_metric.value = "cosine"
    assert e.w_threshold.min == -1.0 and e.last["curve"].layout.title.text.split(":")[1].startswith(" pixel/cosine")
    e.w_video.value = "synthetic (cuts, motion, fade)"
    e.w_step.value = 3
    assert e.w_step.max == 23 and "t=" in e.last["overlay"].layout.title.text
    assert w is e.widget


def test_held_error_hand_computed():
    from analysis.lib.workbench import held_error

    tokens = torch.zeros(3, 1, 2, 1)
    tokens[1, 0, 0] = 1.0  # token (0,0) changes at t=1 and back at t=2
    tokens[2, 0, 1] = 0.5  # token (0,1) changes at t=2
    keep_all = torch.ones(3, 1, 2, dtype=torch.bool)
    assert held_error(tokens, keep_all) == 0.0
    first_only = torch.zeros(3, 1, 2, dtype=torch.bool)
    first_only[0] = True
    # t=1: |1-0| on one of 2 tokens -> 0.5; t=2: |0.5-0| on one of 2 -> 0.25; mean over 3 steps
    assert held_error(tokens, first_only) == pytest.approx((0.5 + 0.25) / 3)
    # keeping the changed token at t=1 makes t=2's (0,0) differ from the held 1.0
    m = first_only.clone()
    m[1, 0, 0] = True
    assert held_error(tokens, m) == pytest.approx((0 + (1.0 + 0.5) / 2) / 3)
    with pytest.raises(ValueError):
        held_error(tokens, torch.zeros(3, 1, 2, dtype=torch.bool))


def test_held_error_dtd_beats_uniform_at_equal_budget_on_the_synthetic_clip(synthetic_clip):
    from analysis.lib.workbench import held_error

    vt = tokens_from_frames(synthetic_clip.frames, 2.0)
    mask = dtd_keep_mask(vt.pixel, 0.05, metric="l1")
    steps = max(1, round(int(mask.sum()) / vt.tokens_per_step))
    uniform = torch.zeros_like(mask)
    uniform[np.linspace(0, vt.grid[0] - 1, steps).round().astype(int)] = True
    assert held_error(vt.pixel, mask) < held_error(vt.pixel, uniform)


def test_held_error_is_zero_for_a_compensated_pan_and_not_for_previous():
    from analysis.lib.workbench import held_error
    from vllm_plugin.core import DTDConfig, decide_steps

    g = torch.Generator().manual_seed(0)
    big = torch.rand(30, 30, 6, generator=g)
    tokens = torch.stack([big[10 - t : 20 - t, 10 + t : 20 + t] for t in range(4)])  # content moves (+1, -1) per step
    motion = decide_steps(tokens, DTDConfig(reference="motion", threshold=0.01))
    assert motion.offsets[1:] == ((1, -1),) * 3 and held_error(tokens, motion.mask, motion.offsets) == 0.0
    # the same mask held at the SAME place (no compensation) misses most of every frame
    assert held_error(tokens, motion.mask) > 0.1
    with pytest.raises(ValueError, match="no compensated reference"):
        held_error(
            tokens, torch.zeros(4, 10, 10, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True), motion.offsets
        )


def test_reference_comparison_verdicts_and_the_explorer_widget():
    import pandas as pd

    from analysis.lib.sweeps import reference_comparison, reference_explorer

    def row(video, ref, kept, held, offsets=((0, 0),)):
        return {
            "video": video,
            "criterion": "pixel",
            "metric": "l1",
            "reference": ref,
            "threshold": 0.05,
            "kept": kept,
            "total": 100,
            "drop_ratio": 1 - kept / 100,
            "seconds": 0.0,
            "held_error": held,
            "tokens_per_step": 50,
            "frames": 4,
            "fps": 1.0,
            "kept_per_step": [50, kept - 50],
            "offsets": [list(o) for o in offsets],
        }

    df = pd.DataFrame(
        [
            row("moviepy_airplane.mp4", "previous", 80, 0.010),
            row("moviepy_airplane.mp4", "motion", 65, 0.009, ((0, 0), (1, 0))),
            row("sam2_02_cups.mp4", "previous", 60, 0.002),
            row("sam2_02_cups.mp4", "motion", 61, 0.002),
            row("other.mp4", "previous", 60, 0.002),
            row("other.mp4", "motion", 90, 0.002),
        ]
    )
    rows = {r["video"]: r for r in reference_comparison(df, 0.05)}
    assert (
        rows["moviepy_airplane.mp4"]["motion_drop_ratio_vs_previous"] == 35 / 20 and rows["moviepy_airplane.mp4"]["met"]
    )
    assert (
        rows["sam2_02_cups.mp4"]["motion_drop_ratio_vs_previous"] == 39 / 40 and not rows["sam2_02_cups.mp4"]["met"]
    )  # 2.5% off
    assert "met" not in rows["other.mp4"]
    worse = df.copy()
    worse.loc[1, "held_error"] = 0.011  # more dropped, but a higher held error: not met
    assert not reference_comparison(worse, 0.05)[0]["met"]

    box = reference_explorer(df)
    controls, label, kept, shift = box.children
    w_video, w_ref = controls.children[:2]
    w_video.value, w_ref.value = "moviepy_airplane.mp4", "motion"
    assert "held error 0.0090" in label.value
    dy = shift.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["y"]
    assert list(dy) == [0, 1]  # the estimated translation per step, plotted


def test_translation_bound_finds_the_pan_and_bounds_motion():
    from analysis.lib.workbench import translation_bound
    from vllm_plugin.core import DTDConfig, decide_steps

    g = torch.Generator().manual_seed(2)
    big = torch.rand(30, 30, 6, generator=g)
    tokens = torch.stack([big[10 - 2 * t : 20 - 2 * t, 10:20] for t in range(4)])  # (+2, 0) per step
    bound = translation_bound(tokens, 0.01, "l1", max_shift=3)
    assert bound["shifts"] == [(0, 0), (2, 0), (2, 0), (2, 0)] and bound["drop_ratio"] == 3 * 80 / 400
    motion = decide_steps(tokens, DTDConfig(reference="motion", threshold=0.01))
    assert 1 - motion.mask.float().mean().item() <= bound["drop_ratio"] + 1e-9
