"""The interactive DTD explorer behind ``notebooks/01_explore_dtd.ipynb`` (ipywidgets + plotly).

    from analysis.lib.explore import Explorer
    Explorer().widget        # threshold slider, metric / reference / criterion / video pickers, frame slider

Every change recomputes the keep mask (:mod:`vllm_plugin.core`) and redraws the kept-tokens curve and
the kept/dropped overlay on the selected frame. :meth:`Explorer.compute` is the whole logic, without
widgets, so it is unit-tested.
"""

from __future__ import annotations

from analysis.lib.figures import kept_tokens_figure, overlay_figure
from analysis.lib.paths import SAMPLE_VIDEO, SCREEN_VIDEO, shared_videos
from analysis.lib.workbench import VideoTokens, load_tokens, run_dtd, tokens_from_frames
from vllm_plugin.core import CRITERIA, default_threshold, reference_names


def available_videos() -> dict[str, str]:
    """Name -> path: the bundled clips, the synthetic clip, and ../shared/videos when present."""
    videos = {SAMPLE_VIDEO.name: str(SAMPLE_VIDEO), "synthetic (cuts, motion, fade)": "synthetic"}
    if SCREEN_VIDEO.is_file():
        videos[SCREEN_VIDEO.name] = str(SCREEN_VIDEO)
    for p in shared_videos():
        videos.setdefault(p.name, str(p))
    return videos


def figure_output(fig) -> dict:
    """A notebook display_data output holding a plotly figure (JupyterLab renders the plotly mime
    type; plain JSON, so any widget frontend or headless runner can carry it)."""
    import json

    import plotly.io as pio

    spec = json.loads(pio.to_json(fig, validate=False))
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {
            "application/vnd.plotly.v1+json": {**spec, "config": {}},
            "text/plain": spec["layout"].get("title", {}).get("text", "figure"),
        },
    }


class Explorer:
    def __init__(
        self,
        videos: dict[str, str] | None = None,
        fps: float = 1.0,
        max_frames: int = 32,
        model_path: str | None = None,
    ):
        self.videos = videos or available_videos()
        self.fps, self.max_frames, self.model_path = fps, max_frames, model_path
        self._cache: dict[str, VideoTokens] = {}
        self._widget = None

    def load(self, name: str) -> VideoTokens:
        if name not in self._cache:
            src = self.videos[name]
            if src == "synthetic":
                from analysis.lib.synthetic import make_clip

                c = make_clip()
                self._cache[name] = tokens_from_frames(c.frames, c.fps, name=name)
            else:
                self._cache[name] = load_tokens(src, fps=self.fps, max_frames=self.max_frames, name=name)
        return self._cache[name]

    def compute(
        self,
        video: str,
        threshold: float,
        metric: str = "l1",
        reference: str = "previous",
        criterion: str = "pixel",
        step: int = 0,
    ) -> dict:
        """Mask, stats and both figures for one setting."""
        v = self.load(video)
        res = run_dtd(v.tokens(criterion, self.model_path), threshold, metric, reference)
        step = max(0, min(step, v.grid[0] - 1))
        title = (
            f"{video}: {criterion}/{metric} τ={threshold:.2f} ({reference}) — kept {res['kept']}/{res['total']} "
            f"(drop {res['drop_ratio']:.1%})"
        )
        res["curve"] = kept_tokens_figure(res["kept_per_step"], v.tokens_per_step, times=v.step_times, title=title)
        res["overlay"] = overlay_figure(v.frames, res["mask"].numpy(), step=step, step_times=v.step_times)
        res["steps"] = v.grid[0]
        return res

    @property
    def widget(self):
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _build(self):
        import ipywidgets as W

        names = list(self.videos)
        self.w_video = W.Dropdown(options=names, value=names[0], description="video")
        self.w_metric = W.Dropdown(options=["l1", "cosine"], value="l1", description="metric")
        self.w_reference = W.Dropdown(options=list(reference_names()), value="previous", description="reference")
        self.w_criterion = W.Dropdown(options=list(CRITERIA), value="pixel", description="criterion")
        self.w_threshold = W.FloatSlider(
            value=default_threshold("l1", "pixel"),
            min=0.0,
            max=1.0,
            step=0.01,
            description="threshold τ",
            continuous_update=False,
            readout_format=".2f",
        )
        self.w_step = W.IntSlider(value=0, min=0, max=1, description="frame", continuous_update=False)
        self.w_status = W.HTML()
        self.out_curve, self.out_overlay = W.Output(), W.Output()

        def on_metric(change):
            lo = -1.0 if change["new"] == "cosine" else 0.0
            self.w_threshold.min = lo
            self.w_threshold.value = default_threshold(change["new"], self.w_criterion.value)

        self.w_metric.observe(on_metric, names="value")
        for w in (self.w_video, self.w_metric, self.w_reference, self.w_criterion, self.w_threshold, self.w_step):
            w.observe(lambda _change: self.update(), names="value")
        controls = W.VBox(
            [
                W.HBox([self.w_video, self.w_criterion]),
                W.HBox([self.w_metric, self.w_reference]),
                W.HBox([self.w_threshold, self.w_step]),
                self.w_status,
            ]
        )
        box = W.VBox([controls, self.out_curve, self.out_overlay])
        self.update()
        return box

    def update(self) -> dict:
        res = self.compute(
            self.w_video.value,
            self.w_threshold.value,
            self.w_metric.value,
            self.w_reference.value,
            self.w_criterion.value,
            self.w_step.value,
        )
        self.w_step.max = max(1, res["steps"] - 1)
        self.w_status.value = f"<b>drop ratio {res['drop_ratio']:.1%}</b> — DTD decision {res['seconds'] * 1000:.1f} ms"
        for out, fig in ((self.out_curve, res["curve"]), (self.out_overlay, res["overlay"])):
            # Set the widget's outputs directly (the figure's mime bundle): no output capture, which
            # stalls headless runners, and no fig.show(), which may start an external renderer.
            out.outputs = (figure_output(fig),)
        self.last = res
        return res
