"""Reference DTD pipeline on Hugging Face transformers: the oracle the serving plugin is held to.

Qwen2.5-VL generation with DTD applied between the vision encoder and the LLM:

1. the processor turns frames into patches (``pixel_values_videos``, ``video_grid_thw``);
2. the vision encoder + merger give one embedding per LLM token;
3. the keep mask comes from :func:`vllm_plugin.core.decide_steps` on the processed pixels
   (``criterion="pixel"``) or on those embeddings (``criterion="feature"``);
4. M-RoPE positions are computed for the FULL sequence and only the survivors are kept
   (:func:`vllm_plugin.core.mrope_positions`), so survivors keep their original (t, h, w);
5. greedy decoding continues at ``max(position) + 1``.

Positions follow the original Qwen2.5-VL / vLLM convention: text after a video starts at
``max(video positions) + 1``. (transformers 5.x's ``get_rope_index`` restarts it at
``video start + max(H, W)``; the two agree whenever the temporal extent ``t_max`` ≤ ``max(H, W) - 1``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_plugin.core import (
    DTDConfig,
    DTDStats,
    PatchLayout,
    decide_steps,
    keep_at_least_one,
    mask_stats,
    mrope_positions,
    pixel_tokens,
)


@dataclass
class ProcessedVideo:
    """One video as Qwen2.5-VL's processor emits it."""

    pixel_values: torch.Tensor  # (grid_t*grid_h*grid_w, C*tps*ps*ps)
    grid_thw: tuple[int, int, int]  # in patches, before merging
    second_per_grid_t: float
    merge_size: int = 2
    layout: PatchLayout = PatchLayout()  # patch layout and normalization (Qwen3-VL: mean/std 0.5)
    frames: np.ndarray | None = None  # the frames it was made from, uint8 (N, H, W, 3) (Qwen3-VL's prompt needs them)
    fps: float = 1.0

    @property
    def llm_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid_thw
        return t, h // self.merge_size, w // self.merge_size

    @property
    def num_tokens(self) -> int:
        t, h, w = self.llm_grid
        return t * h * w


@dataclass
class Prepared:
    """A prompt after DTD, ready for the LLM."""

    input_ids: torch.Tensor  # long (L,), the kept sequence (video tokens are <|video_pad|>)
    inputs_embeds: torch.Tensor  # (L, hidden)
    position_ids: torch.Tensor  # long (3, L)
    mask: torch.Tensor | None  # bool (T, H, W) for the video, None for text only
    stats: DTDStats | None
    video: ProcessedVideo | None = None
    full_length: int = 0  # prompt length without DTD
    lm_kwargs: dict = field(
        default_factory=dict
    )  # more inputs of the prefill (Qwen3-VL: DeepStack rows and where they go)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Generation:
    token_ids: list[int]
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token
    text: str = ""


def compute_mask(video: ProcessedVideo, dtd: DTDConfig | None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask (T, H, W) of ``video`` under ``dtd`` (all True when disabled).

    ``embeddings`` (num_tokens, C) are required for ``criterion="feature"``.
    """
    T, H, W = video.llm_grid
    if dtd is None or not dtd.enabled:
        return torch.ones((T, H, W), dtype=torch.bool)
    if dtd.criterion == "pixel":
        tokens = pixel_tokens(video.pixel_values, video.grid_thw, video.layout.with_(merge_size=video.merge_size))
    else:
        if embeddings is None:
            raise ValueError("feature-level DTD needs the vision encoder's embeddings")
        tokens = embeddings.reshape(T, H, W, -1)
    return decide_steps(tokens, dtd).mask


class ReferencePipeline:
    """Qwen2.5-VL (transformers) with DTD between the vision encoder and the LLM."""

    model_class = "Qwen2_5_VLForConditionalGeneration"  # transformers' class of the family

    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32, model_class: str | None = None):
        import transformers
        from transformers import AutoProcessor

        self.model_class = model_class or self.model_class  # the family spec's reference_class (reference_pipeline)
        self.model_path = str(model_path)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.model = getattr(transformers, self.model_class).from_pretrained(self.model_path, dtype=dtype).eval()
        self.config = self.model.config
        vc = self.config.vision_config
        self.merge_size = vc.spatial_merge_size
        self.temporal_patch_size = vc.temporal_patch_size
        self.tokens_per_second = float(getattr(vc, "tokens_per_second", 1.0))
        self.tokenizer = self.processor.tokenizer

    # -- inputs ---------------------------------------------------------------------------------
    def chat_text(self, question: str, with_video: bool = True) -> str:
        content = ([{"type": "video"}] if with_video else []) + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def process_video(self, frames: np.ndarray, fps: float) -> ProcessedVideo:
        """Frames uint8 (N, H, W, 3) sampled at ``fps`` -> processed patches (no further sampling)."""
        out = self.processor.video_processor(videos=[np.asarray(frames)], return_tensors="pt", do_sample_frames=False)
        return self._processed(out, fps)

    def _processed(self, out, sampled_fps: float, **fields) -> ProcessedVideo:
        """The video processor's output ``out`` (one video sampled at ``sampled_fps``) as a
        :class:`ProcessedVideo` (``fields``: its other fields)."""
        t, h, w = (int(x) for x in out["video_grid_thw"][0].tolist())
        return ProcessedVideo(
            pixel_values=out["pixel_values_videos"],
            grid_thw=(t, h, w),
            second_per_grid_t=self.temporal_patch_size / float(sampled_fps),
            merge_size=self.merge_size,
            **fields,
        )

    @torch.no_grad()
    def video_embeddings(self, video: ProcessedVideo) -> torch.Tensor:
        """Vision encoder + merger output, (num_tokens, hidden), in (t, h, w) raster order."""
        out = self.model.model.get_video_features(video.pixel_values, torch.tensor([video.grid_thw]), return_dict=True)
        return out.pooler_output[0]

    @torch.no_grad()
    def prepare(
        self,
        question: str,
        frames: np.ndarray | None = None,
        fps: float = 1.0,
        dtd: DTDConfig | None = None,
        video: ProcessedVideo | None = None,
        **processor_kwargs,
    ) -> Prepared:
        """Tokenize the chat prompt, encode the video, apply DTD, keep original positions
        (``processor_kwargs``: more arguments of the family's :meth:`process_video`, which takes
        ``frames``, and of its prompt's processor)."""
        if video is None and frames is not None:
            video = self.process_video(frames, fps, **processor_kwargs)
        text = self.chat_text(question, with_video=video is not None)
        if video is None:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
            pos = torch.arange(ids.shape[0]).expand(3, -1)
            return Prepared(ids, self.model.get_input_embeddings()(ids), pos, None, None, None, int(ids.shape[0]))
        return self._prepare_video(text, video, dtd, **processor_kwargs)

    def _prepare_video(self, text: str, video: ProcessedVideo, dtd: DTDConfig | None, **processor_kwargs) -> Prepared:
        """:meth:`prepare` of a prompt with a video: one grid, positions computed for the full sequence."""
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
        embed = self.model.get_input_embeddings()
        vid_tok = self.config.video_token_id
        (where,) = (ids == vid_tok).nonzero(as_tuple=True)
        if where.numel() != 1:
            raise ValueError("the prompt must contain exactly one video placeholder")
        s0 = int(where[0])
        n = video.num_tokens
        emb = self.video_embeddings(video)
        mask = compute_mask(video, dtd, emb)

        before, after = ids[:s0], ids[s0 + 1 :]
        vid_pos, next_start = mrope_positions(
            mask, start=s0, second_per_grid_t=video.second_per_grid_t, tokens_per_second=self.tokens_per_second
        )
        flat = mask.flatten()
        kept_ids = torch.cat([before, torch.full((int(flat.sum()),), vid_tok, dtype=ids.dtype), after])
        embeds = torch.cat([embed(before), emb[flat].to(embed.weight.dtype), embed(after)])
        positions = torch.cat(
            [torch.arange(s0).expand(3, -1), vid_pos, (torch.arange(after.shape[0]) + next_start).expand(3, -1)], dim=1
        )
        return Prepared(kept_ids, embeds, positions, mask, mask_stats(mask), video, int(ids.shape[0]) - 1 + n)

    # -- model ----------------------------------------------------------------------------------
    def _lm(self, embeds: torch.Tensor, positions: torch.Tensor, cache, **extra):
        out = self.model.model.language_model(
            inputs_embeds=embeds[None],
            position_ids=positions[:, None, :],
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return self.model.lm_head(out.last_hidden_state[0]).float(), out.past_key_values

    @torch.no_grad()
    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Prefill logits, float32 (L, vocab)."""
        from transformers import DynamicCache

        logits, _ = self._lm(
            prepared.inputs_embeds, prepared.position_ids, DynamicCache(config=self.config), **prepared.lm_kwargs
        )
        return logits

    @torch.no_grad()
    def generate(
        self, prepared: Prepared, max_new_tokens: int = 8, top_logprobs: int = 5, stop_at_eos: bool = True
    ) -> Generation:
        """Greedy decoding; records the top-k log-probabilities of every generated step."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        logits, cache = self._lm(prepared.inputs_embeds, prepared.position_ids, cache, **prepared.lm_kwargs)
        next_pos = int(prepared.position_ids.max()) + 1
        eos = self.config.text_config.eos_token_id
        gen = Generation(token_ids=[])
        last = logits[-1]
        for step in range(max_new_tokens):
            logp = torch.log_softmax(last, dim=-1)
            top = torch.topk(logp, top_logprobs)
            gen.top_logprobs.append({int(i): float(v) for i, v in zip(top.indices, top.values)})
            tok = int(torch.argmax(last))
            gen.token_ids.append(tok)
            if stop_at_eos and tok == eos:
                break
            emb = self.model.get_input_embeddings()(torch.tensor([tok]))
            pos = torch.full((3, 1), next_pos + step, dtype=torch.long)
            out, cache = self._lm(emb, pos, cache)
            last = out[-1]
        gen.text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return gen

    @staticmethod
    def _metadata(n: int, fps: float):
        """transformers' metadata of ``n`` frames sampled at ``fps`` (every one of them kept)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=n, fps=fps, duration=n / fps, frames_indices=list(range(n)))

    @torch.no_grad()
    def plain_logits(self, question: str, frames: np.ndarray, fps: float) -> torch.Tensor:
        """Logits of the UNMODIFIED transformers model (its own forward and position ids)."""
        text = self.chat_text(question, with_video=True)
        inputs = self.processor(
            text=[text],
            videos=[np.asarray(frames)],
            video_metadata=[self._metadata(len(frames), fps)],
            return_tensors="pt",
            do_sample_frames=False,
        )
        return self.model(**inputs).logits[0].float()


class Qwen3VLReferencePipeline(ReferencePipeline):
    """Qwen3-VL (transformers; dense, or MoE with ``moe=True``) with DTD between the vision encoder and the LLM.

    The oracle takes everything from transformers: the prompt with its per-step timestamps
    (``Qwen3VLProcessor``), the vision tower's main and DeepStack outputs, and the M-RoPE positions of
    the FULL prompt (``get_rope_index``). DTD then removes the dropped video tokens from the sequence,
    from its positions and from every DeepStack level alike; nothing is recomputed, so survivors and
    all text (timestamps included) keep their original positions. A step that keeps no token keeps
    its timestamp and empty ``<|vision_start|><|vision_end|>``; a video that keeps none keeps its first
    token (as served).
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: torch.dtype = torch.float32,
        moe: bool = False,
        model_class: str | None = None,
    ):
        self.model_class = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
        super().__init__(model_path, dtype, model_class)
        vp = self.processor.video_processor
        self.layout = PatchLayout(
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            image_mean=tuple(vp.image_mean),
            image_std=tuple(vp.image_std),
        )

    def process_video(self, frames: np.ndarray, fps: float, **processor_kwargs) -> ProcessedVideo:
        """Frames uint8 (N, H, W, 3) sampled at ``fps`` -> processed patches (no further sampling;
        ``processor_kwargs`` e.g. ``do_resize=False`` for frames already at their size)."""
        frames = np.asarray(frames)
        out = self.processor.video_processor(
            videos=[frames],
            video_metadata=[self._metadata(len(frames), fps)],
            return_tensors="pt",
            do_sample_frames=False,
            **processor_kwargs,
        )
        return self._processed(out, fps, layout=self.layout, frames=frames, fps=float(fps))

    @torch.no_grad()
    def _features(self, video: ProcessedVideo) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.model.model.get_video_features(video.pixel_values, torch.tensor([video.grid_thw]), return_dict=True)
        # per DeepStack level, one entry per video (here one)
        return out.pooler_output[0], [
            lvl[0] if isinstance(lvl, (tuple, list)) else lvl for lvl in out.deepstack_features
        ]

    @torch.no_grad()
    def video_embeddings(self, video: ProcessedVideo) -> torch.Tensor:
        """The vision tower's main output (num_tokens, hidden), in (t, h, w) raster order."""
        return self._features(video)[0]

    def _prepare_video(self, text: str, video: ProcessedVideo, dtd: DTDConfig | None, **processor_kwargs) -> Prepared:
        """:meth:`prepare` of a prompt with a video: transformers' prompt (timestamps) and positions,
        the dropped tokens removed from both."""
        embed = self.model.get_input_embeddings()
        if video.frames is None:  # the prompt's timestamps come from the frames
            raise ValueError("a ProcessedVideo without its frames: make it with this pipeline's process_video")
        inputs = self.processor(
            text=[text],
            videos=[video.frames],
            video_metadata=[self._metadata(len(video.frames), video.fps)],
            return_tensors="pt",
            do_sample_frames=False,
            return_mm_token_type_ids=True,
            **processor_kwargs,
        )
        if tuple(inputs["video_grid_thw"][0].tolist()) != tuple(video.grid_thw):
            raise ValueError("the processor gave the prompt another grid than the processed video")
        ids = inputs["input_ids"][0]
        full_pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"]
        )
        full_pos = full_pos[:, 0]
        main, deepstack = self._features(video)
        mask = keep_at_least_one(compute_mask(video, dtd, main))
        flat = mask.flatten()
        is_video = ids == self.config.video_token_id
        if int(is_video.sum()) != flat.numel():
            raise ValueError(f"the prompt holds {int(is_video.sum())} video tokens, the grid {flat.numel()}")
        keep = torch.ones_like(is_video)
        keep[is_video.nonzero()[:, 0][~flat]] = False
        kept_ids = ids[keep]
        visual = kept_ids == self.config.video_token_id
        embeds = embed(kept_ids)
        embeds[visual] = main[flat].to(embeds.dtype)
        extra = {
            "visual_pos_masks": visual[None],
            "deepstack_visual_embeds": [d[flat].to(embeds.dtype) for d in deepstack],
        }
        return Prepared(kept_ids, embeds, full_pos[:, keep], mask, mask_stats(mask), video, int(ids.shape[0]), extra)


def reference_pipeline(model_path: str | Path, dtype: torch.dtype = torch.float32) -> ReferencePipeline:
    """The reference pipeline of the checkpoint's model family (from its config.json)."""
    import json

    archs = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    pipeline, model_class = pipeline_for(archs)
    return pipeline(model_path, dtype, model_class=model_class)


def pipeline_for(architectures) -> tuple[type, str]:
    """(reference pipeline class, transformers' model class) of the family serving one of
    ``architectures`` (:func:`vllm_plugin.models.families.family_for_architecture`; its spec's
    ``reference_pipeline`` and ``reference_class``), the default family's when none does."""
    from vllm_plugin.models.families import DEFAULT_FAMILY, family_for_architecture, get_family, load

    found = [s for s in map(family_for_architecture, architectures) if s is not None]
    spec = found[0] if found else get_family(DEFAULT_FAMILY)
    return load(spec.reference_pipeline), spec.reference_class


class Qwen2VLReferencePipeline(ReferencePipeline):
    """Qwen2-VL (transformers): Qwen2.5-VL's pipeline with Qwen2-VL's model class; its temporal
    position is the step index (no ``tokens_per_second``)."""

    model_class = "Qwen2VLForConditionalGeneration"

    def process_video(self, frames: np.ndarray, fps: float) -> ProcessedVideo:
        video = super().process_video(frames, fps)
        video.second_per_grid_t = 1.0  # Qwen2-VL: temporal position = step index
        return video
