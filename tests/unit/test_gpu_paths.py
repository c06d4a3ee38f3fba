"""vLLM 0.32 GPU code paths that must not bypass or misjudge DTD, checked without a GPU or a server.

* encoder CUDA graphs never take videos (they would skip the DTD mask);
* videos are encoded one at a time (the scheduler charges the kept count, the encoder runs on all);
* the encoder cache holds exactly the charged (kept) rows;
* profiling's dummy video keeps every token;
* per-request ``dtd_*`` keys do not reload the HF processor.

The processors are built in-process from a ``ModelConfig`` of the tiny checkpoint, as vLLM's
renderer does (``MULTIMODAL_REGISTRY.create_processor``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


def _video_request(processor, frames: np.ndarray, **mm_kwargs):
    meta = {
        "fps": 2.0,
        "duration": len(frames) / 2.0,
        "total_num_frames": len(frames),
        "frames_indices": list(range(len(frames))),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    items = processor.info.parse_mm_data({"video": [(frames, meta)]})
    prompt = processor.dummy_inputs.get_dummy_text({"video": 1})
    return processor(prompt, items, hf_processor_mm_kwargs=mm_kwargs)


def _full_tokens(item, merge: int = 2) -> int:
    return int(item["video_grid_thw"].data.prod()) // (merge * merge)


# --- A: encoder CUDA graphs --------------------------------------------------------------------


def _cudagraph_config(cls):
    """The config ``EncoderCudaGraphManager`` reads (vllm/v1/worker/encoder_cudagraph.py), from a
    model object carrying only what ``get_encoder_cudagraph_config`` touches (no weights, no GPU)."""
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.is_multimodal_pruning_enabled = False
    model.visual = SimpleNamespace(attn_backend=None, out_hidden_size=64)
    model.get_max_frames_per_video = lambda: 8
    return model.get_encoder_cudagraph_config()


def _manager_supports(config, modality: str) -> bool:
    # the runner's check: gpu_model_runner.py `encoder_cudagraph_manager.supports_modality(modality)`
    from vllm.v1.worker.encoder_cudagraph import EncoderCudaGraphManager

    manager = EncoderCudaGraphManager.__new__(EncoderCudaGraphManager)
    manager.config = config
    return manager.supports_modality(modality)


def test_encoder_cudagraphs_exclude_dtd_videos():
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from vllm_plugin.models.qwen2_5_vl import Qwen2_5_VLDTDForConditionalGeneration

    stock = _cudagraph_config(Qwen2_5_VLForConditionalGeneration)
    assert _manager_supports(stock, "video") and _manager_supports(stock, "image")
    dtd = _cudagraph_config(Qwen2_5_VLDTDForConditionalGeneration)
    assert not _manager_supports(dtd, "video"), dtd.modalities
    assert _manager_supports(dtd, "image")
    assert dtd.max_frames_per_video == 1  # image-format capture grids, as with EVS
    assert dtd.buffer_keys == stock.buffer_keys and dtd.out_hidden_size == stock.out_hidden_size


# --- B: encoder budget and cache ---------------------------------------------------------------


class _Input(SimpleNamespace):  # vLLM's TensorSchema: attributes, `[]` and `.get` read them
    def get(self, key, default=None):
        return getattr(self, key, default)

    def __getitem__(self, key):
        return getattr(self, key)


class _Tower:
    """Stands in for Qwen2.5-VL's encoder (``_process_video_input`` of vLLM's class): the whole
    batch in one call, one row per LLM token, row value = index of the token in its video."""

    calls: list

    def _parse_and_validate_video_input(self, **kwargs):
        return _Input(
            type="pixel_values_videos",
            pixel_values_videos=kwargs["pixel_values_videos"],
            video_grid_thw=kwargs["video_grid_thw"],
        )

    def _process_video_input(self, video_input):
        grid = video_input["video_grid_thw"]
        self.calls.append(len(grid))
        sizes = (grid.prod(-1) // 4).tolist()
        return tuple(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4) for n in sizes)


def _dtd_model():
    from vllm_plugin.models.base import DTDModelMixin

    class Model(DTDModelMixin, _Tower):
        pass

    model = object.__new__(Model)  # the engine-side mixin without a vLLM model under it (no rotary tables)
    model.calls = []
    model.visual = SimpleNamespace(spatial_merge_size=2)
    model.dtd_encoder_group_tokens = 10**9  # what __init__ reads from vLLM's scheduler config
    return model


def _encoded_index(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """What the stand-in tower's rows hold for the kept tokens: their index among the tokens of the
    steps that were encoded (steps keeping no token are skipped)."""
    per_step = mask.view(steps, -1)
    encoded = per_step.any(1).nonzero().flatten()
    n = per_step.shape[1]
    return torch.cat([i * n + per_step[s].nonzero().flatten() for i, s in enumerate(encoded.tolist())])


def test_videos_are_encoded_one_at_a_time(dtd_processor):
    """Whatever the runner batches (vLLM 0.32's V2 GPU runner sends every video of a step in one
    call), the DTD model encodes one video per call; V1 reads `requires_sequential_video_encoding`."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from vllm_plugin.models.base import MASK_KEY
    from vllm_plugin.models.qwen2_5_vl import Qwen2_5_VLDTDForConditionalGeneration

    assert not hasattr(Qwen2_5_VLForConditionalGeneration, "requires_sequential_video_encoding")
    assert Qwen2_5_VLDTDForConditionalGeneration.requires_sequential_video_encoding is True
    items = []
    for change in (2, 6):
        frames = np.zeros((8, 56, 56, 3), dtype=np.uint8)
        frames[change:, :28] = 255
        items.append(_video_request(dtd_processor, frames)["mm_kwargs"]["video"][0])
    grid = torch.cat([it["video_grid_thw"].data[None] for it in items])
    pixels = torch.cat([it["pixel_values_videos"].data for it in items])
    mask = torch.cat([it[MASK_KEY].data.bool() for it in items])
    model = _dtd_model()
    video_input = model._parse_and_validate_video_input(
        pixel_values_videos=pixels, video_grid_thw=grid, **{MASK_KEY: mask}
    )
    rows = model._process_video_input(video_input)
    assert model.calls == [1, 1]
    for r, it in zip(rows, items):
        m = it[MASK_KEY].data.bool()
        assert torch.equal(r[:, 0].long(), _encoded_index(m, int(it["video_grid_thw"].data[0])))


def test_encoder_cache_holds_the_charged_rows(dtd_processor):
    """The scheduler charges and the encoder cache sizes an item by `mm_position.get_num_embeds()`
    (vllm/v1/request.py get_num_encoder_embeds); `_process_video_input`'s output is what is cached."""
    from vllm_plugin.models.base import MASK_KEY

    frames = np.zeros((8, 56, 56, 3), dtype=np.uint8)
    frames[4:, :28] = 255  # a change halfway: some tokens kept after step 0
    out = _video_request(dtd_processor, frames)
    item, (placeholder,) = out["mm_kwargs"]["video"][0], out["mm_placeholders"]["video"]
    mask = item[MASK_KEY].data.bool()
    full = _full_tokens(item)
    assert mask.numel() == full and 0 < int(mask.sum()) < full
    model = _dtd_model()
    video_input = model._parse_and_validate_video_input(
        pixel_values_videos=item["pixel_values_videos"].data,
        video_grid_thw=item["video_grid_thw"].data[None],
        **{MASK_KEY: mask},
    )
    (rows,) = model._process_video_input(video_input)
    assert rows.shape[0] == placeholder.get_num_embeds() == placeholder.length == int(mask.sum())
    assert torch.equal(rows[:, 0].long(), _encoded_index(mask, int(item["video_grid_thw"].data[0])))


# --- C: profiling --------------------------------------------------------------------------------


def test_profiling_dummy_video_keeps_every_token(dtd_processor, stock_processor):
    from vllm_plugin.models.base import MASK_KEY

    out = dtd_processor.get_dummy_mm_inputs({"video": 1})
    item, (placeholder,) = out["mm_kwargs"]["video"][0], out["mm_placeholders"]["video"]
    full = _full_tokens(item)
    assert int(item["video_grid_thw"].data[0]) > 1  # a multi-step video: DTD would drop steps 1..T-1
    assert bool(item[MASK_KEY].data.all()) and item[MASK_KEY].data.numel() == full
    assert placeholder.get_num_embeds() == full
    (stock_placeholder,) = stock_processor.get_dummy_mm_inputs({"video": 1})["mm_placeholders"]["video"]
    assert stock_placeholder.get_num_embeds() == full


def test_a_real_constant_video_is_still_reduced(dtd_processor):
    """The profiling switch is per dummy input, not global."""
    out = _video_request(dtd_processor, np.full((8, 56, 56, 3), 255, dtype=np.uint8))
    item, (placeholder,) = out["mm_kwargs"]["video"][0], out["mm_placeholders"]["video"]
    assert placeholder.length == _full_tokens(item) // int(item["video_grid_thw"].data[0])


# --- D: per-request dtd_* keys -----------------------------------------------------------------


def test_dtd_keys_do_not_reload_the_hf_processor(dtd_processor):
    from vllm.transformers_utils.processor import cached_get_processor

    info = dtd_processor.info
    base = info.get_hf_processor()
    size = cached_get_processor.cache_info().currsize
    a = info.get_hf_processor(dtd_threshold=0.11)
    b = info.get_hf_processor(dtd_threshold=0.12, dtd_metric="l1")
    assert a is base and b is base
    assert info.get_image_processor(dtd_threshold=0.13) is base.image_processor

    frames = np.zeros((8, 56, 56, 3), dtype=np.uint8)
    frames[4:] = 255
    kept = []
    for kwargs in ({"dtd_threshold": 0.21}, {"dtd_threshold": 0.22}, {"dtd_enabled": False}):
        (placeholder,) = _video_request(dtd_processor, frames, **kwargs)["mm_placeholders"]["video"]
        kept.append(placeholder.length)
    assert cached_get_processor.cache_info().currsize == size
    # the DTD decision still sees the request's keys
    assert kept[0] == kept[1] < kept[2]
