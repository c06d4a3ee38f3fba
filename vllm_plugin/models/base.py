"""DTD for vLLM's Qwen-VL style models: the pieces every model family module combines.

* :class:`DTDMultiModalProcessorMixin` (processing time, API server): runs the HF processor, takes
  each video's keep mask (given by the caller in the item's metadata, see :data:`GIVEN_MASK`, or
  decided here: pixel level with :func:`vllm_plugin.core.pixel_decide` on the processed patches,
  feature level with :func:`vllm_plugin.core.decide_steps` on the outputs of this process's vision
  tower, :mod:`vllm_plugin.models.vision`), carries it with the item (:data:`MASK_KEY`, one bool per
  LLM token, ``flat_from_sizes``) and emits only the kept number of video placeholder tokens. Feature
  level also replaces the patches with the kept outputs (``video_embeds``). Prompt length,
  prefix-cache block hashes and the KV cache all see the reduced video.
* :class:`DTDProcessingInfoMixin`: ``dtd_*`` request keys never reach the HF processor loader.
* :class:`DTDModelMixin` (engine): pixel level, runs the vision encoder on the whole video (window
  attention needs every patch) and keeps exactly the masked rows; feature level, takes the API
  server's kept rows as they are; either way survivors get their ORIGINAL (t, h, w) M-RoPE positions
  (:func:`vllm_plugin.core.mrope_positions`).

The hooks overridden here are vLLM's documented processor/model hooks; each is checked against the
installed vLLM by :func:`vllm_plugin.entrypoints.vllm_patches.check_overrides` when a family's classes
are built (:func:`vllm_plugin.models.families.build_classes`; a vLLM upgrade that changes one fails at
startup, naming the version).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import BaseProcessingInfo, ProcessorInputs, PromptReplacement, PromptUpdate
from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig

from vllm_plugin import settings
from vllm_plugin.core import (
    PatchLayout,
    decide_steps,
    keep_at_least_one,
    mask_digest,
    mask_stats,
    mrope_positions,
    pixel_decide,
    video_position_span,
)
from vllm_plugin.core.masks import check_tokens
from vllm_plugin.entrypoints import request_stats, video_loader, vllm_patches
from vllm_plugin.entrypoints.options import (
    GIVEN_EMBEDS,
    GIVEN_MASK,
    GIVEN_TIMES,
    dtd_config_from_kwargs,
    split_dtd_kwargs,
)
from vllm_plugin.models import vision
from vllm_plugin.models.vision import VisionTowerSpec

if TYPE_CHECKING:
    from torch import nn
    from transformers import BatchFeature
    from vllm.config import VllmConfig
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
    from vllm.multimodal.processing import BaseMultiModalProcessor

    # The mixins below are put before vLLM's classes of a family (families.build_classes); to the type
    # checker they extend what they are mixed into: vLLM's base classes, with what the Qwen-VL families'
    # classes add (they share no vLLM base class declaring it).
    class _ProcessingInfoBase(BaseProcessingInfo):
        def get_image_processor(self, **kwargs: object) -> Any:
            raise NotImplementedError

    class _ProcessorBase(BaseMultiModalProcessor[_ProcessingInfoBase]):
        # vLLM's abstract hooks, which the family's processor implements
        def _get_mm_fields_config(
            self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
        ) -> Mapping[str, MultiModalFieldConfig]:
            raise NotImplementedError

        def _get_prompt_updates(
            self,
            mm_items: MultiModalDataItems,
            hf_processor_mm_kwargs: Mapping[str, object],
            out_mm_kwargs: MultiModalKwargsItems,
        ) -> Sequence[PromptUpdate]:
            raise NotImplementedError

    class _ModelBase(nn.Module):
        """What :class:`DTDModelMixin` uses of vLLM's Qwen-VL model classes (Qwen2VLForConditionalGeneration,
        Qwen2_5_VL..., Qwen3VL..., Qwen3VLMoe...), which share no base class declaring it."""

        config: Any  # the checkpoint's HF config
        visual: Any  # the vision tower (spatial_merge_size, dtype)

        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
            raise NotImplementedError

        def get_encoder_cudagraph_config(self) -> EncoderCudaGraphConfig:
            raise NotImplementedError

        def _parse_and_validate_video_input(self, **kwargs: object) -> Any:
            raise NotImplementedError

        def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
            raise NotImplementedError

        def iter_mm_grid_thw(
            self, mm_features: list[MultiModalFeatureSpec]
        ) -> Iterator[tuple[int, int, int, int, float]]:
            raise NotImplementedError
else:
    _ProcessorBase = _ProcessingInfoBase = _ModelBase = object

# read by the DTD decision: what the HF processor is asked to do, as vLLM resolves it per scope
vllm_patches.require(BaseProcessingInfo, "_merge_and_resolve_mm_processor_kwargs", ["mm_kwargs"])

MASK_KEY = "video_dtd_mask"  # processed field: the flat keep mask of a video item
# Every DTD model class's M-RoPE table holds max_position_embeddings × this many positions: survivors keep
# their full-prompt positions, as with vLLM's own video pruning, for which vLLM sizes the table the same
# (vllm/model_executor/models/qwen3_vl.py ``mrope_positions_factor``; Qwen2-VL/2.5-VL: get_rope's default).
ROPE_POSITIONS_FACTOR = 4
GROUP_TOKENS_ENV = "DTD_ENCODER_GROUP_TOKENS"  # smaller vision-tower calls than vLLM profiled (never larger)
MAX_VIDEO_TOKENS_ENV = "DTD_MAX_VIDEO_TOKENS"  # a video item's tokens before DTD: more is a 400


def max_video_tokens(env=None) -> int:
    return settings.get(MAX_VIDEO_TOKENS_ENV, env)


class VideoTooLargeError(VLLMValidationError, ValueError):
    """A video item with more tokens before DTD than the server encodes per item (HTTP 400)."""


class PositionLimitError(VLLMValidationError, ValueError):
    """A request whose M-RoPE positions would pass the model's rotary table (HTTP 400): refused in the
    API server, before the engine, where a position past the table aborts the worker for every client."""


def rope_positions(hf_config) -> int:
    """Positions the rotary table of a DTD model class holds (:data:`ROPE_POSITIONS_FACTOR`)."""
    return int(hf_config.get_text_config().max_position_embeddings) * ROPE_POSITIONS_FACTOR


class _ItemExtras:
    """Per video item (by its multimodal hash): positions it spans beyond its placeholder tokens.
    Recorded when the item is processed; a request served from vLLM's processor cache (no data in the
    API server) reads it here. Bounded (oldest first)."""

    def __init__(self, size: int = 65536):
        self.size = size
        self._by_hash: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, mm_hash: str, extra: int) -> None:
        with self._lock:
            self._by_hash[mm_hash] = extra
            self._by_hash.move_to_end(mm_hash)
            while len(self._by_hash) > self.size:
                self._by_hash.popitem(last=False)

    def lookup(self, mm_hash: str) -> int | None:
        with self._lock:
            if mm_hash not in self._by_hash:
                return None
            self._by_hash.move_to_end(mm_hash)  # in use: kept as long as vLLM's cache keeps the item
            return self._by_hash[mm_hash]


ITEM_EXTRA_POSITIONS = _ItemExtras()
_TIMING = threading.local()  # seconds of the DTD decision and of the vision tower in the current apply() of this thread


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("vllm.dtd_plugin").warning("DTD: %s", message)


def kept_steps(pixel_values: torch.Tensor, steps: int, mask: torch.Tensor) -> torch.Tensor:
    """The patches of the temporal steps that keep at least one token, in order: ``pixel_values``
    (steps * h * w, C), ``mask`` bool (steps, ...). The engine encodes exactly these steps
    (:meth:`DTDModelMixin._dtd_encode_kept`; a step's vision attention never reaches another step)."""
    keep = mask.reshape(steps, -1).any(1)
    if bool(keep.all()):
        return pixel_values
    return pixel_values.reshape(steps, -1, pixel_values.shape[-1])[keep].reshape(-1, pixel_values.shape[-1])


def tokens_per_video(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    return grid_thw.prod(-1) // (merge * merge)


def _given(given, shape: tuple[int, int, int], feature: bool):
    """(mask bool (T, H, W) or None, kept embeddings (kept, hidden) or None) from a caller's item
    metadata; None where they do not fit the processed video (decided again)."""
    if given is None:
        return None, None
    mask, embeds, _ = given
    mask = torch.as_tensor(np.asarray(mask))
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"{GIVEN_MASK} must be a bool array of shape (T, H, W), got {mask.dtype} {tuple(mask.shape)}")
    if tuple(mask.shape) != shape:
        # The processor did not keep the caller's frames as they were (e.g. a per-frame pixel cap
        # that depends on the number of frames): decide on what it produced.
        _warn_once(
            f"{GIVEN_MASK} of shape {tuple(mask.shape)} does not fit the processed video {shape} "
            "(the processor resized or resampled its frames): DTD decided again on the processed patches"
        )
        return None, None
    mask = mask.clone()
    if not feature or embeds is None:
        return mask, None
    embeds = torch.as_tensor(embeds)
    if embeds.dim() != 2 or embeds.shape[0] != int(mask.sum()) or not embeds.is_floating_point():
        raise ValueError(
            f"{GIVEN_EMBEDS} must be float (kept tokens, hidden) for the {int(mask.sum())} kept tokens, "
            f"got {embeds.dtype} {tuple(embeds.shape)}"
        )
    return mask, embeds


class DTDMultiModalProcessorMixin(_ProcessorBase):
    """Adds the DTD keep mask to Qwen-VL style processors (at processing time, pixel or feature level).

    A video item may carry, in its metadata under :data:`GIVEN_MASK`, the keep mask its caller
    already decided (a stream decides each temporal step causally when its frames arrive, with the
    previous chunk's last step as reference; the prompt then uses exactly that mask), and at feature
    level under :data:`GIVEN_EMBEDS` the kept outputs it already encoded (then the tower does not run
    again), and under :data:`GIVEN_TIMES` its steps' times (families that write them into the
    prompt, Qwen3-VL, use them). They must match the processed grid; they are taken out of the
    metadata before the HF processor sees them.
    """

    vision_tower: VisionTowerSpec | None = None  # set from the family's spec: feature-level DTD

    def __init__(self, *args, **kwargs):
        # vLLM builds the processor in the API server's renderer (and in engine cores, for profiling,
        # where apply() does nothing): the patches follow the DTD architecture into the API server.
        vllm_patches.apply("serving a DTD architecture")
        super().__init__(*args, **kwargs)
        mm_config = self.info.ctx.get_mm_config()
        if mm_config.is_multimodal_pruning_enabled():  # both would shorten the same placeholders
            raise ValueError(
                "DTD and vLLM's fixed-rate video pruning (--video-pruning-rate, EVS / VidCom2) both drop "
                "video tokens: serve a DTD architecture without --video-pruning-rate"
            )
        if vllm_patches.in_api_server_process():
            model_config = self.info.ctx.model_config
            server = dtd_config_from_kwargs(model_config.mm_processor_kwargs)  # bad server defaults fail at start
            settings.check(settings.API_SERVER)  # a bad DTD_* value of the API server fails at start too
            if server.enabled and server.criterion == "feature":  # the server's default: load the tower now
                vision.tower_for(self.vision_tower, model_config)
            vp = getattr(self.info.get_hf_processor(), "video_processor", None)
            if vp is not None:  # video_url requests: decode only the sampled frames, at the processor's size
                video_loader.install(model_config, vp, dict(model_config.mm_processor_kwargs or {}))

    def _get_hf_mm_inputs(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        videos = mm_items.get("video")
        for item in videos.data if videos is not None else ():
            video_loader.check_request(item, hf_kwargs)
        return super()._get_hf_mm_inputs(mm_items, hf_kwargs)

    @staticmethod
    def _dtd_take_given(mm_items: MultiModalDataItems) -> tuple[MultiModalDataItems, list]:
        """The items without the callers' masks (the HF processor must not see them), and per video
        the given ``(mask, embeds, step times)`` or None."""
        videos = mm_items.get("video")
        given: list = []
        if videos is None:
            return mm_items, given
        data = []
        for item in videos.data:
            if isinstance(item, tuple) and isinstance(item[1], Mapping) and GIVEN_MASK in item[1]:
                meta = dict(item[1])
                given.append((meta.pop(GIVEN_MASK), meta.pop(GIVEN_EMBEDS, None), meta.pop(GIVEN_TIMES, None)))
                item = (item[0], meta)
            else:
                given.append(None)
            data.append(item)
        if any(g is not None for g in given):
            # items with metadata are VideoProcessorItems (vllm/multimodal/parse.py: a (frames, metadata) tuple)
            video_items = cast(VideoProcessorItems, videos)
            mm_items = MultiModalDataItems({**mm_items, "video": type(video_items)(data, video_items.metadata)})
        return mm_items, given

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        """vLLM's processing of the items (whatever the family does: one HF call, or one per video as
        Qwen3-VL), then the DTD decision on the processed patches."""
        mm_items, given = self._dtd_take_given(mm_items)
        _, rest = split_dtd_kwargs(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, rest)
        if "pixel_values_videos" not in processed:
            return processed
        return self._dtd_apply(processed, hf_kwargs, given)

    def _dtd_apply(self, processed, hf_kwargs: Mapping[str, object], given: list):
        merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        config = dtd_config_from_kwargs(merged)
        vc = self.info.get_hf_config().vision_config
        merge, tps = vc.spatial_merge_size, vc.temporal_patch_size
        grids = processed["video_grid_thw"]
        patches = list(processed["pixel_values_videos"].split((grids.prod(-1)).tolist()))
        given = given or [None] * len(patches)
        vp = getattr(self.info.get_hf_processor(), "video_processor", None) or self.info.get_image_processor()
        # vLLM may leave rescale+normalize to the vision tower (mm_device_do_normalize): then the
        # patches are raw pixel values. Read what the HF processor was actually asked to do: the
        # video scope first (vLLM routes flat keys there; Qwen3-VL's cached path passes them
        # resolved, scoped only), then the flat keys, then the processor's default.
        scoped = self.info._merge_and_resolve_mm_processor_kwargs(hf_kwargs).get("videos_kwargs") or {}

        def asked(name: str) -> bool:
            return bool(scoped[name] if name in scoped else merged.get(name, getattr(vp, name)))

        normalized = asked("do_normalize")
        if normalized != asked("do_rescale"):
            raise ValueError("DTD needs do_rescale and do_normalize both on or both off")
        layout = PatchLayout(
            merge_size=merge,
            temporal_patch_size=tps,
            image_mean=tuple(vp.image_mean),
            image_std=tuple(vp.image_std),
            normalized=normalized,
            rescale_factor=vp.rescale_factor,
        )
        feature = config.enabled and config.criterion == "feature"
        tower = vision.tower_for(self.vision_tower, self.info.ctx.model_config) if feature else None
        masks, kept_embeds, kept_pixels = [], [], []
        encoding = 0.0  # the vision tower's share of the loop (counted as encoder time, not decision)
        t0 = time.perf_counter()
        cap = max_video_tokens()
        for pv, grid, g in zip(patches, grids, given):
            shape = (int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge)
            # the engine encodes the steps that keep a token: with DTD its work is bounded by the tokens before DTD
            # (vLLM admits a request by its kept tokens); without DTD every token is in the prompt, admitted by vLLM
            if config.enabled and shape[0] * shape[1] * shape[2] > cap:
                raise VideoTooLargeError(
                    f"video: {shape[0] * shape[1] * shape[2]} video tokens before DTD ({shape[0]} temporal steps of "
                    f"{shape[1]}x{shape[2]}); this server encodes at most {cap} per video ({MAX_VIDEO_TOKENS_ENV}): "
                    "send fewer or smaller frames",
                    parameter="video",
                )
            mask, embeds = _given(g, shape, feature)
            if mask is not None and not mask.any():
                embeds = None  # the one token kept below is not among the given rows
            if embeds is None and tower is not None:  # tower: feature level
                t_enc = time.perf_counter()
                encoded = tower.encode(pv if normalized else layout.normalize(pv), grid)
                encoding += time.perf_counter() - t_enc
                if mask is None:
                    # NaN/inf encoder outputs are a 400, never served (check_tokens)
                    mask = decide_steps(check_tokens(tower.decision_view(encoded).view(*shape, -1)), config).mask
            if mask is None and not config.enabled:
                mask = torch.ones(shape, dtype=torch.bool)
            elif mask is None:
                mask = pixel_decide(pv, grid, config, layout=layout).mask
            mask = keep_at_least_one(mask)
            if feature and embeds is None:
                embeds = encoded[mask.flatten()]
            masks.append(mask.flatten())
            kept_embeds.append(embeds)
            if not feature:  # the engine gets the patches of the steps that keep a token only (kept_steps)
                kept_pixels.append(kept_steps(pv, shape[0], mask))
        _TIMING.decision = getattr(_TIMING, "decision", 0.0) + time.perf_counter() - t0 - encoding
        _TIMING.encoding = getattr(_TIMING, "encoding", 0.0) + encoding
        if "timestamps" in processed:  # the family writes each step's time into the prompt (Qwen3-VL)
            for i, g in enumerate(given):
                if g is not None and g[2] is not None:
                    times = [float(x) for x in g[2]]
                    if len(times) != len(processed["timestamps"][i]):
                        raise ValueError(
                            f"{GIVEN_TIMES} has {len(times)} times for {len(processed['timestamps'][i])} steps"
                        )
                    processed["timestamps"][i] = times
        processed[MASK_KEY] = torch.cat(masks)
        if feature:  # the engine gets the kept outputs and never encodes these videos again
            processed["video_embeds"] = torch.cat(kept_embeds)
            del processed["pixel_values_videos"]
        else:
            processed["pixel_values_videos"] = torch.cat(kept_pixels)
        return processed

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        """vLLM's cached processing; when the processor cache loses an item this request counted on
        (vLLM 0.32 asserts "Expected a cached item": its sender cache evicted it between the lookup and
        the merge, e.g. under another request's or this prompt's own items), the request's items are
        dropped from the cache and processed again from the data the request carries: a cache miss
        costs time, never the request (a stream's conversation sends every item each time)."""
        cache = inputs.cache
        if cache is not None:  # a cached video whose position record is gone: processed again (it is in the request)
            for mm_hash in self._get_mm_hashes(inputs).get("video", []):
                if ITEM_EXTRA_POSITIONS.lookup(mm_hash) is None and cache.is_cached_item(mm_hash):
                    cache.invalidate(mm_hash)
        try:
            return super()._cached_apply_hf_processor(inputs, timing_ctx)
        except AssertionError as e:
            if (
                cache is None
                or "cached item" not in str(e)
                or any(item is None for items in inputs.mm_data_items.values() for item in items.get_all())
            ):
                raise
            for hashes in self._get_mm_hashes(inputs).values():
                for mm_hash in hashes:
                    cache.invalidate(mm_hash)
            _warn_once(
                "vLLM's multimodal processor cache lost an item a request counted on: its items were processed "
                "again (a larger --mm-processor-cache-gb avoids the work)"
            )
            return super()._cached_apply_hf_processor(inputs, timing_ctx)

    def _get_mm_fields_config(
        self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if MASK_KEY in hf_inputs:
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            sizes = tokens_per_video(hf_inputs.get("video_grid_thw", torch.empty((0, 3))), merge)
            fields[MASK_KEY] = MultiModalFieldConfig.flat_from_sizes("video", sizes, keep_on_cpu=True)
            if "pixel_values_videos" in hf_inputs:  # the steps that keep a token (kept_steps)
                grids = hf_inputs["video_grid_thw"]
                steps = [
                    int(m.view(int(g[0]), -1).any(1).sum())
                    for m, g in zip(hf_inputs[MASK_KEY].split(sizes.tolist()), grids)
                ]
                patches = torch.tensor(steps, dtype=torch.long) * grids[:, 1] * grids[:, 2] if len(steps) else sizes
                fields["pixel_values_videos"] = MultiModalFieldConfig.flat_from_sizes("video", patches)
            if "video_embeds" in hf_inputs:  # kept rows only: one per kept token
                kept = (
                    torch.stack([m.sum() for m in hf_inputs[MASK_KEY].split(sizes.tolist())]) if len(sizes) else sizes
                )
                fields["video_embeds"] = MultiModalFieldConfig.flat_from_sizes("video", kept)
        return fields

    def _get_prompt_updates(
        self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs
    ) -> Sequence[PromptUpdate]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))

        def with_dtd(update: PromptUpdate) -> PromptReplacement:
            full_replacement = update.content  # a PromptReplacement's replacement

            def replacement(item_idx: int):
                out_item = out_mm_kwargs["video"][item_idx]
                elem = out_item.get(MASK_KEY)
                if elem is None:  # resolved as vLLM does (PromptUpdate._resolve_content): a callable or the tokens
                    return full_replacement(item_idx) if callable(full_replacement) else full_replacement
                t, h, w = (int(x) for x in out_item["video_grid_thw"].data.tolist())
                merge = self.info.get_hf_config().vision_config.spatial_merge_size
                return self._dtd_replacement(elem.data.reshape(t, h // merge, w // merge).bool(), out_item)

            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [with_dtd(u) if u.modality == "video" else u for u in updates]

    def _dtd_replacement(self, mask: torch.Tensor, out_item):
        """The prompt of a video after DTD from its keep mask (bool (T, H, W)); the family's full
        replacement is never built. Qwen2-VL / Qwen2.5-VL: one run of video placeholders, one per kept token."""
        return [self.info.get_hf_config().video_token_id] * int(mask.sum())

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> ProcessorInputs:
        """Profiling inputs keep every video token.

        vLLM 0.32 profiles the encoder and the encoder cache with a constant dummy video
        (vllm/multimodal/processing/processor.py ``get_dummy_mm_inputs`` -> ``get_dummy_inputs`` ->
        ``apply``; vllm/multimodal/processing/dummy_inputs.py ``_get_dummy_videos``). DTD would keep its
        first temporal step only, so the profiled encoder outputs (vllm/v1/worker/gpu_model_runner.py
        ``profile_run``) would be ~T times too small. ``dtd_enabled: false`` goes in as a request-level
        processor kwarg (it overrides ``--mm-processor-kwargs``) and is part of the item's cache hash, so
        a real constant video never gets this item from the processor cache.
        """
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(
            inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, "dtd_enabled": False}
        )

    def apply(self, inputs, timing_ctx):
        _TIMING.decision = _TIMING.encoding = 0.0
        t0 = time.perf_counter()
        result = super().apply(inputs, timing_ctx)
        if _TIMING.decision:  # videos were processed (not all from the processor cache)
            # preprocessing = decoding + processor + decision; the tower's time is vllm_dtd_encoder_seconds
            request_stats.record_timing(
                decision_s=_TIMING.decision, preprocess_s=time.perf_counter() - t0 - _TIMING.encoding
            )
        # Remember each freshly processed video's stats under its multimodal hash (the request
        # task looks them up after preprocessing; cached items were recorded when first seen).
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        for item, mm_hash in zip(result["mm_kwargs"].get("video", []), result["mm_hashes"].get("video", [])):
            if item is None or item.get(MASK_KEY) is None:
                continue
            t, h, w = (int(x) for x in item["video_grid_thw"].data.tolist())
            mask = item[MASK_KEY].data.reshape(t, h // merge, w // merge)
            request_stats.record(mm_hash, mask_stats(mask), mask_digest(mask))
        try:
            self._dtd_check_positions(result)
        except PositionLimitError:
            # the refused request's items entered vLLM's processor cache, which the engine never receives
            # (its mirror would expect them): drop them, so that nothing counts on them
            if inputs.cache is not None:
                for hashes in result["mm_hashes"].values():
                    for mm_hash in hashes:
                        inputs.cache.invalidate(mm_hash)
            raise
        return result

    # -- positions ----------------------------------------------------------------------------------
    def _dtd_t_factor(self, seconds_per_step: float | None) -> float:
        """The temporal M-RoPE step of a video (vLLM's ``iter_mm_grid_thw``: seconds per temporal step ×
        the vision config's ``tokens_per_second``; 1 without ``second_per_grid_ts``, as Qwen2-VL)."""
        vc = self.info.get_hf_config().vision_config
        return float(seconds_per_step or 1.0) * float(getattr(vc, "tokens_per_second", 1.0))

    def _dtd_position_span(self, steps: int, h: int, w: int, t_factor: float, text_tokens: int) -> int:
        """Positions one video item of ``steps`` × ``h`` × ``w`` merged tokens takes, with ``text_tokens``
        text tokens in its placeholder (Qwen2-VL / Qwen2.5-VL: none), whatever DTD keeps."""
        return int(text_tokens) + video_position_span(steps, h, w, t_factor)

    def _dtd_stream_t_factor(self, fps: float) -> float:
        """The temporal M-RoPE step of a stream's chunk: a video sampled at ``fps`` (Qwen2.5-VL's
        ``second_per_grid_ts`` = temporal_patch_size / fps)."""
        vc = self.info.get_hf_config().vision_config
        return self._dtd_t_factor(vc.temporal_patch_size / fps if hasattr(vc, "tokens_per_second") else None)

    def _dtd_item_extra(self, item) -> int:
        """Positions one processed video item spans beyond its placeholder tokens: the family's span of
        its full grid less its kept tokens (text tokens take one position each, so they cancel)."""
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        t, h, w = (int(x) for x in item["video_grid_thw"].data.tolist())
        elem = item.get(MASK_KEY)
        kept = int(elem.data.sum()) if elem is not None else t * (h // merge) * (w // merge)
        seconds = item.get("second_per_grid_ts")
        t_factor = self._dtd_t_factor(float(seconds.data.item()) if seconds is not None else None)
        return self._dtd_position_span(t, h // merge, w // merge, t_factor, 0) - kept

    def _merge_mm_kwargs(self, cache, mm_hashes, mm_is_cached, mm_missing_kwargs, mm_missing_prompt_updates):
        """vLLM's merge of processed and cached items; first, each freshly processed video's position
        span is recorded under its hash (a cache entry holds no data in the API server: the check of a
        later request that hits it reads the record)."""
        fresh = iter(mm_missing_kwargs.get("video", []))
        for mm_hash, cached in zip(mm_hashes.get("video", []), mm_is_cached.get("video", [])):
            if not cached:
                ITEM_EXTRA_POSITIONS.record(mm_hash, self._dtd_item_extra(next(fresh)))
        return super()._merge_mm_kwargs(cache, mm_hashes, mm_is_cached, mm_missing_kwargs, mm_missing_prompt_updates)

    def _dtd_check_positions(self, result) -> None:
        """Refuse (:class:`PositionLimitError`) a prompt whose M-RoPE positions could pass the rotary
        table: the largest is at most ``max_model_len - 1`` plus what every video item spans beyond its
        tokens (DTD keeps full-prompt positions; frames far apart in time span more, DTD or not). An item
        without data here (from vLLM's processor cache, or a shared-memory reference) is read from its
        record; one with no record is refused (its cache entry is dropped: sent again, it is processed)."""
        videos = result["mm_kwargs"].get("video") or []
        if not videos:
            return
        extra = 0
        for item, mm_hash in zip(videos, result["mm_hashes"].get("video", [])):
            if item is not None and "video_grid_thw" in item:
                e = self._dtd_item_extra(item)
                ITEM_EXTRA_POSITIONS.record(mm_hash, e)
            else:
                recorded = ITEM_EXTRA_POSITIONS.lookup(mm_hash)
                if recorded is None:
                    raise PositionLimitError(
                        "video: this video's M-RoPE positions could not be checked (its record left this "
                        "server's memory while vLLM's processor cache kept it): send the request again",
                        parameter="video",
                    )
                e = recorded
            extra += e
        limit = rope_positions(self.info.get_hf_config())
        max_len = int(self.info.ctx.model_config.max_model_len)
        largest = max(len(result["prompt_token_ids"]), max_len) - 1 + max(0, extra)
        if largest >= limit:
            raise PositionLimitError(
                f"video: this request's M-RoPE positions could reach {largest} ({max_len} tokens of context plus "
                f"{extra} positions its videos span beyond their tokens: frames far apart in time, or DTD keeping few "
                f"tokens of many steps, whose survivors keep their original positions), past the model's rotary table "
                f"of {limit} positions (max_position_embeddings x {ROPE_POSITIONS_FACTOR}): send fewer or more closely "
                "spaced frames",
                parameter="video",
            )


class DTDProcessingInfoMixin(_ProcessingInfoBase):
    """``dtd_*`` keys never reach the HF processor loader.

    vLLM 0.32 passes a request's ``mm_processor_kwargs`` to ``get_hf_processor(**kwargs)`` (e.g. from
    ``_get_prompt_updates`` and ``get_image_processor``), which loads through an LRU keyed by those
    kwargs (vllm/transformers_utils/processor.py ``cached_get_processor``): every distinct
    ``dtd_threshold`` would reload processor and tokenizer. The DTD decision reads the request's keys
    itself (:meth:`DTDMultiModalProcessorMixin._dtd_apply`).
    """

    def get_hf_processor(self, **kwargs: object):
        _, rest = split_dtd_kwargs(kwargs)
        return super().get_hf_processor(**rest)


class DTDModelMixin(_ModelBase):
    """Model side: keep the masked encoder outputs; survivors keep their original M-RoPE positions."""

    # vllm/v1/worker/gpu_model_runner.py (0.32) encodes a batch of videos one at a time when the model
    # has this attribute, the mitigation vLLM applies to EVS pruning for the same reason: the scheduler
    # charges an item's placeholder count (DTD: the kept tokens) to the encoder budget, while the encoder
    # runs on every patch. One video per encoder call bounds the peak to one full video.
    requires_sequential_video_encoding = True

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        # vLLM reads these parameter names to call a model class (model_loader/utils.py initialize_model)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        # merged tokens of one vision-tower call: what vLLM's start-up profiling ran the encoder on at least
        # (vllm/v1/core/encoder_cache_manager.py compute_mm_encoder_budget: max(this, the largest item))
        budget = int(vllm_config.scheduler_config.max_num_encoder_input_tokens)
        smaller = settings.get(GROUP_TOKENS_ENV) or 0  # tests make groups small, to check they are exact
        self.dtd_encoder_group_tokens = max(1, min(budget, smaller) if smaller > 0 else budget)
        # the processor refuses prompts whose positions pass this (DTDMultiModalProcessorMixin._dtd_check_positions)
        vllm_patches.size_rotary_tables(self, rope_positions(self.config))

    def get_encoder_cudagraph_config(self) -> EncoderCudaGraphConfig:
        """Videos never take the encoder CUDA graph path.

        vLLM 0.32 replays a captured graph of the bare vision tower for the modalities listed here
        (vllm/v1/worker/gpu_model_runner.py ``_execute_mm_encoder``, vllm/v1/worker/gpu/mm/encoder_runner.py
        ``execute_mm_encoder``: ``supports_modality``), bypassing ``_process_video_input`` and so the DTD
        mask. Same opt-out as Qwen2.5-VL's own EVS pruning (vllm/model_executor/models/qwen2_5_vl.py
        ``get_encoder_cudagraph_config``): drop the modality, one frame per item. Images keep their graphs.
        """
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(
            config,
            modalities=[m for m in config.modalities if m != "video"],
            max_frames_per_video=1,
        )

    def _parse_and_validate_video_input(self, **kwargs: object):
        mask = kwargs.pop(MASK_KEY, None)
        video_input = super()._parse_and_validate_video_input(**kwargs)
        if video_input is not None and mask is not None:
            video_input.dtd_mask = mask  # TensorSchema: attribute access, .get() works
        return video_input

    def _process_video_input(self, video_input) -> tuple[torch.Tensor, ...]:
        mask = video_input.get("dtd_mask")
        grid = video_input["video_grid_thw"]
        if mask is not None and video_input["type"] == "video_embeds":
            # feature-level DTD: the API server encoded the video and sent the kept rows only
            masks = (
                list(mask.split(tokens_per_video(grid, self.visual.spatial_merge_size).tolist()))
                if isinstance(mask, torch.Tensor)
                else list(mask)
            )
            embeds = video_input["video_embeds"].type(self.visual.dtype)
            sizes = [int(m.sum()) for m in masks]
            if sum(sizes) != embeds.shape[0]:
                raise ValueError(f"DTD kept embeddings {embeds.shape[0]} do not match the masks' kept counts {sizes}")
            return tuple(embeds.split(sizes))
        if mask is None or video_input["type"] != "pixel_values_videos":
            return tuple(super()._process_video_input(video_input))
        # Pixel-level DTD: the encoder runs on the temporal steps that keep a token, in groups of at most
        # what vLLM profiled at start-up, each group masked as it comes; only kept rows stay. Exact: the
        # vision attention (window or full) and its positions never cross temporal steps. The scheduler
        # charged only the kept tokens, so without this one static video could encode thousands of
        # steps at once (V1 and V2 runners both call this; V2 batches a group's videos into one input).
        merge = self.visual.spatial_merge_size
        sizes = tokens_per_video(grid, merge).tolist()
        masks = list(mask.split(sizes)) if isinstance(mask, torch.Tensor) else list(mask)
        if [m.numel() for m in masks] != sizes:
            raise ValueError(f"DTD mask sizes {[m.numel() for m in masks]} do not match video token counts {sizes}")
        pixels = video_input["pixel_values_videos"]
        # per video: the patches of its steps that keep a token (what the processor sends), or all of them
        sent = [int(m.reshape(int(g[0]), -1).any(1).sum()) * int(g[1]) * int(g[2]) for m, g in zip(masks, grid)]
        patches = pixels.split(sent if pixels.shape[0] == sum(sent) else grid.prod(-1).tolist())
        return tuple(
            self._dtd_encode_kept(pv, [int(x) for x in g.tolist()], m.bool()) for pv, g, m in zip(patches, grid, masks)
        )

    def _dtd_encode_kept(self, pixel_values: torch.Tensor, grid: list[int], mask: torch.Tensor) -> torch.Tensor:
        """Kept encoder rows of one video: ``pixel_values`` (t*h*w patches, C; or only the steps that keep
        a token, :func:`kept_steps`), ``grid`` [t, h, w], ``mask`` flat bool (t * h/merge * w/merge) ->
        (kept, hidden)."""
        t, h, w = grid
        per_step = mask.reshape(t, -1)
        # a step that keeps nothing is never encoded (none kept at all: one step, for the rows' width)
        steps = per_step.any(1).nonzero().flatten().tolist() or [0]
        by_step = pixel_values.reshape(-1, h * w, pixel_values.shape[-1])
        # the processor sends the patches of those steps only (kept_steps); the full video is accepted too
        where = {s: i for i, s in enumerate(steps)} if by_step.shape[0] == len(steps) < t else {s: s for s in steps}
        if by_step.shape[0] not in (t, len(steps)):
            raise ValueError(
                f"{by_step.shape[0]} temporal steps of patches for a video of {t} steps ({len(steps)} keep a token)"
            )
        group = max(1, self.dtd_encoder_group_tokens // per_step.shape[1])
        rows = []
        for i in range(0, len(steps), group):
            sel = steps[i : i + group]
            pv = by_step[[where[x] for x in sel]].reshape(len(sel) * h * w, -1)
            g = torch.tensor([[len(sel), h, w]], dtype=torch.long, device=pixel_values.device)
            (out,) = super()._process_video_input(
                {"type": "pixel_values_videos", "pixel_values_videos": pv, "video_grid_thw": g}
            )
            rows.append(out[per_step[sel].flatten().to(out.device)])
            del out
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        parts: list[np.ndarray] = []
        st = 0  # index in input_tokens after the last placed item
        next_pos = 0  # position id of the next text token
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset = feature.mm_position.offset
            text_len = offset - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            start = next_pos + text_len
            ((_, t, h, w, t_factor),) = self.iter_mm_grid_thw([feature])
            elem = feature.data.get(MASK_KEY) if feature.modality == "video" else None
            mask = elem.data.reshape(t, h, w).bool() if elem is not None else torch.ones((t, h, w), dtype=torch.bool)
            pos, next_pos = mrope_positions(mask, start=start, second_per_grid_t=t_factor, tokens_per_second=1.0)
            parts.append(pos.numpy())
            st = offset + pos.shape[1]
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        positions = np.concatenate(parts, axis=1).reshape(3, -1)
        if positions.shape[1] != len(input_tokens):
            raise ValueError(f"M-RoPE positions cover {positions.shape[1]} tokens, the prompt has {len(input_tokens)}")
        return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max() + 1 - len(input_tokens))
