"""The vision tower in the API-server process: feature-level DTD decides on its outputs.

Feature-level DTD needs the vision encoder's merged outputs BEFORE the prompt is built (the kept
count is the number of placeholder tokens). The API server therefore runs the checkpoint's own vision
tower (transformers' module of the family, only the ``visual.*`` weights are read) and hands the
engine the KEPT outputs as embedding inputs (``video_embeds`` + grid + keep mask): the engine never
encodes that video again. Why this route and not vLLM's encoder disaggregation: docs/serving.md, "Feature-level
DTD: where the encoder runs".

One tower per API-server process, loaded on first use (or at start when the server's default
criterion is ``feature``); ``DTD_FEATURE_ENCODER=off`` disables it (feature requests then get a 400).
``DTD_FEATURE_ENCODER_DEVICE`` puts it on a device (default: ``cuda`` when there is one, else the
CPU); ``DTD_FEATURE_ENCODER_MAX_STEPS`` bounds the temporal steps of one tower call (activation
memory), 16 by default.

Qwen2-VL / Qwen2.5-VL vision attention never crosses temporal steps (window and full attention are
both per frame group), so encoding step by step (streams, on arrival) gives the outputs of encoding
the whole video.

Towers inside the budget:

* Only API-server processes load a tower (:func:`vllm_patches.in_api_server_process`: never an
  engine core, a multiprocessing worker or a Ray worker/actor process); elsewhere :func:`tower_for`
  refuses with :class:`EncoderUnavailable`.
* A tower that fails to load is not remembered forever: for ``DTD_FEATURE_ENCODER_RETRY_S`` seconds
  (30 by default; 0: every request tries again) feature requests get the 400 at once, with the reason
  and when the next try is; the first request after that loads again.
* On a CUDA device the tower's memory (weights + ``DTD_FEATURE_ENCODER_MAX_STEPS`` steps of
  activations + a CUDA context, :func:`tower_memory`) must fit in vLLM's front-end GPU carve-out,
  ``--mm-ipc-gpu-memory-gb``, shared by the server's API-server processes (vLLM takes that amount
  out of the KV cache on every worker GPU, so ``--gpu-memory-utilization`` bounds the towers too):
  :func:`gpu_budget_verdict`. Too small: the tower does not load and the message says what to set
  (at start when the server's default criterion is ``feature``, else a 400 and an error log at the
  first feature request). Without GPU video decoding the tower then holds its bytes as a lease of
  vLLM's front-end pool; with it, the tower is only counted (a lease held for good could leave a
  decode waiting forever in vLLM's ``acquire``): give the carve-out room for both.
  ``DTD_FEATURE_ENCODER_MEMORY_CHECK=off`` skips the check (the towers have a GPU of their own).
* Attention runs batched: transformers' Qwen-VL vision attention, with ``sdpa``, calls SDPA once per
  window / frame in a Python loop after a host sync. The plugin's tower registers
  :data:`PACKED_ATTENTION` (transformers' ``AttentionInterface``), which takes the packed sequences
  with their ``cu_seqlens`` and runs ONE maskless SDPA call per distinct sequence length in a layer
  (one per full-attention layer of a video; at most four per window layer: inner, right, bottom and
  corner windows), bit-identical to the per-window loop (checked at load; on a mismatch the stock
  path stays).
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import logging
import math
import multiprocessing
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vllm_plugin import settings
from vllm_plugin.entrypoints import request_stats, vllm_patches

logger = logging.getLogger("vllm.dtd_plugin")
ENV = "DTD_FEATURE_ENCODER"  # "api" (default): a tower in each API-server process; "off": none
DEVICE_ENV = "DTD_FEATURE_ENCODER_DEVICE"
MAX_STEPS_ENV = "DTD_FEATURE_ENCODER_MAX_STEPS"
RETRY_ENV = "DTD_FEATURE_ENCODER_RETRY_S"  # seconds a failed load is answered at once before the next try
MEMORY_CHECK_ENV = "DTD_FEATURE_ENCODER_MEMORY_CHECK"  # "on" (default) | "off": the CUDA budget check
STEP_PATCHES_ENV = "DTD_FEATURE_ENCODER_STEP_PATCHES"  # patches of one temporal step the estimate assumes
GiB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GiB  # a process's CUDA context, cuBLAS workspace and allocator slack (estimate)
ACTIVATION_SLACK = 1.25  # caching-allocator fragmentation and temporaries the per-token count misses
DEFAULT_FRAME_PIXELS = 768 * 28 * 28  # transformers' Qwen2-VL video processor cap, when the checkpoint has none


class EncoderUnavailable(ValueError):
    """Feature-level DTD was asked for where no vision tower can run (a 400 naming ``dtd_criterion``)."""


@dataclass(frozen=True)
class VisionTowerSpec:
    """Where a family's vision tower lives: ``module:Class`` of transformers and the prefixes of its
    weights in the checkpoint (transformers 4.x and 5.x name them differently). ``deepstack``: the
    tower also returns features of intermediate layers (Qwen3-VL's ``deepstack_features``); the
    engine takes them concatenated after the main output, as vLLM's own tower emits them, and DTD
    decides on the main output only."""

    cls: str
    prefixes: tuple[str, ...] = ("visual.", "model.visual.")
    deepstack: bool = False

    def load_class(self):
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module), name)


# -- batched vision attention ------------------------------------------------------------------------------

# transformers' Qwen-VL vision attention (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE; 5.19:
# ``Qwen2_5_VLVisionAttention.forward``) has two paths: an implementation whose name contains "flash"
# (``is_flash_attention_requested``) gets the packed sequences in one call with ``cu_seq_lens_q``
# (transformers' varlen convention); any other ("sdpa") splits q/k/v by ``cu_seqlens.tolist()`` (a host
# sync per layer) and calls SDPA once per window or frame in a Python loop: hundreds of small kernels
# per layer for a video. The name below takes the varlen path with plain SDPA underneath.
PACKED_ATTENTION = "dtd_packed_sdpa_flash_varlen"
_PLANS: dict[
    int, tuple
] = {}  # id(cu_seqlens) -> (weakref to it, plan, device): one host sync per tensor, not per layer
_PLANS_MAX = 16
_PLANS_LOCK = threading.Lock()


def _plan(cu_seqlens: torch.Tensor, device: torch.device) -> tuple[int, list]:
    """(tokens, groups) for packed sequences: per distinct length L, ``(first token, count, L)`` when
    those sequences are contiguous and back to back, else a ``(count, L)`` index tensor into the tokens."""
    with _PLANS_LOCK:
        hit = _PLANS.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[2] == device:
        return hit[1]
    bounds = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            starts.setdefault(b - a, []).append(a)
    groups: list[tuple[int | torch.Tensor, int, int]] = []  # (first token or index tensor, count, length)
    for length, firsts in starts.items():
        if firsts == list(range(firsts[0], firsts[0] + length * len(firsts), length)):
            groups.append((firsts[0], len(firsts), length))
        else:
            index = torch.tensor(firsts, device=device)[:, None] + torch.arange(length, device=device)
            groups.append((index, len(firsts), length))
    plan = (bounds[-1] - bounds[0] if bounds else 0, groups)
    with _PLANS_LOCK:
        for k in [k for k, v in _PLANS.items() if v[0]() is None]:  # the forward that used them is over
            del _PLANS[k]
        while len(_PLANS) >= _PLANS_MAX:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), plan, device)
    return plan


def packed_attention(
    module,
    query,
    key,
    value,
    attention_mask=None,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    is_causal=False,
    **kwargs,
):
    """Non-causal attention within each packed sequence of ``cu_seq_lens_q``: query/key/value (1, H, N, D)
    -> (1, N, H, D). One maskless SDPA call per distinct sequence length (sequences of one length are a
    batch), so each sequence sees exactly the arithmetic of its own SDPA call (the stock per-window loop's,
    bit for bit on the CPU), flash kernels stay eligible on GPUs (no mask) and nothing is padded."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    same_k = cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or not same_k or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q, k, v = query[0], key[0], value[0]  # (H, N, D)
    heads, n, dim = q.shape[0], q.shape[1], v.shape[-1]
    total, groups = _plan(cu_seq_lens_q, q.device)
    if total != n:
        raise RuntimeError(f"cu_seqlens cover {total} tokens, attention got {n}")
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(qq, kk, vv):  # (H, count, L, D) each -> (count, L, H, D)
        out = sdpa(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2)

    if len(groups) == 1 and not isinstance(groups[0][0], torch.Tensor):  # one length, back to back: views only
        first, count, length = groups[0]
        parts = [t[:, first : first + count * length].unflatten(1, (count, length)) for t in (q, k, v)]
        return run(*parts).reshape(1, n, heads, dim), None
    out = q.new_empty(n, heads, dim)
    for where, count, length in groups:
        if isinstance(where, torch.Tensor):
            parts = [t[:, where] for t in (q, k, v)]
            out[where.reshape(-1)] = run(*parts).reshape(-1, heads, dim)
        else:
            span = slice(where, where + count * length)
            parts = [t[:, span].unflatten(1, (count, length)) for t in (q, k, v)]
            out[span] = run(*parts).reshape(-1, heads, dim)
    return out.unsqueeze(0), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(PACKED_ATTENTION) is not packed_attention:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _attention_configs(module: torch.nn.Module) -> list:
    """The config objects the tower and its attention modules read ``_attn_implementation`` from."""
    found = {id(module.config): module.config} if hasattr(module, "config") else {}
    for m in module.modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "config"):
            found[id(m.config)] = m.config
    return list(found.values())


def set_attention(module: torch.nn.Module, name: str) -> None:
    """Point the tower (and its attention modules) at attention implementation ``name``."""
    if name == PACKED_ATTENTION:
        _register_packed_attention()
    for config in _attention_configs(module):
        config._attn_implementation = name


def _probe_inputs(module: torch.nn.Module, device, dtype):
    """Two tiny videos whose attention has sequences of several lengths: unequal windows (a frame
    one merged unit wider than a window) and frames of two sizes."""
    tower: Any = module  # transformers' vision tower: nn.Module types its attributes as Tensor | Module
    config = tower.config
    merge = int(config.spatial_merge_size)
    window = getattr(config, "window_size", None)
    units = int(window) // int(config.patch_size) // merge + 1 if window else 3  # merged units per side
    side = units * merge
    grid = torch.tensor([[2, side, side], [1, merge, 2 * merge]], device=device)
    weight = tower.patch_embed.proj.weight  # Conv3d (hidden, C, tps, p, p) or Linear (hidden, C * tps * p * p)
    in_dim = math.prod(weight.shape[1:])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), in_dim, generator=g).to(device=device, dtype=dtype)
    return pixels, grid


def _probe_outputs(module, pixels, grid) -> torch.Tensor:
    with torch.no_grad():
        raw = module(pixels, grid_thw=grid)
    out = getattr(raw, "pooler_output", raw)
    return out[0] if isinstance(out, (tuple, list)) else out


def install_packed_attention(module: torch.nn.Module) -> str:
    """Run the tower's vision attention batched (:func:`packed_attention`) when it is on ``sdpa``; a
    flash implementation is varlen already and ``eager`` was asked for on purpose: left alone. Checked
    on a tiny probe against the stock path; a mismatch or an error logs a warning and keeps the stock
    path. Returns the implementation in use."""
    current = getattr(module.config, "_attn_implementation", None)
    if current != "sdpa":
        return str(current)
    try:
        pixels, grid = _probe_inputs(module, next(module.parameters()).device, next(module.parameters()).dtype)
        stock = _probe_outputs(module, pixels, grid)
        set_attention(module, PACKED_ATTENTION)
        packed = _probe_outputs(module, pixels, grid)
        tol = 1e-4 if stock.dtype == torch.float32 else 3e-2
        diff = float((packed.float() - stock.float()).abs().max())
        scale = float(stock.float().abs().max()) + 1e-6
        if packed.shape != stock.shape or not diff <= tol * scale:
            raise RuntimeError(f"outputs differ from the stock sdpa path by {diff:.3g} (scale {scale:.3g})")
    except Exception as e:
        set_attention(module, "sdpa")
        logger.warning(
            "DTD: the vision tower's batched attention does not fit this transformers' %s (%s): "
            "keeping transformers' per-window sdpa loop (correct, slower)",
            type(module).__name__,
            e,
        )
        return "sdpa"
    return PACKED_ATTENTION


class VisionTower:
    """A family's vision tower with the checkpoint's weights.

    :meth:`encode` maps processed patches to merged outputs, one row per LLM token:
    ``pixel_values`` (grid_t * grid_h * grid_w, C * tps * patch²) and ``grid_thw`` (3,) to
    (grid_t * grid_h/merge * grid_w/merge, hidden) in the tower's dtype, on the CPU, in (t, h, w)
    raster order.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        merge_size: int,
        device: torch.device,
        max_steps: int = 16,
        decision_dim: int | None = None,
    ):
        self.module = module.eval()
        self.decision_dim = decision_dim  # leading columns of an output row that DTD compares (None: all)
        self.merge_size = merge_size
        self.device = device
        self.max_steps = max(1, int(max_steps))  # temporal steps per tower call
        self.dtype = next(module.parameters()).dtype
        self._lock = threading.Lock()  # one encode at a time per process (the tower is not re-entrant on GPUs)
        self.steps = 0  # temporal steps encoded by this process
        self.seconds = 0.0
        self.attention = str(getattr(getattr(module, "config", None), "_attn_implementation", None))
        self.lease = None  # bytes held in vLLM's front-end GPU pool (CUDA towers inside the carve-out)

    @classmethod
    def load(
        cls,
        spec: VisionTowerSpec,
        model_path: str,
        vision_config,
        dtype: torch.dtype,
        revision: str | None = None,
        device: str | None = None,
        packed_attention: bool = True,
    ) -> VisionTower:
        """The tower with the checkpoint's weights; ``packed_attention``: batched vision attention
        (:func:`install_packed_attention`) instead of transformers' per-window loop."""
        from safetensors import safe_open

        files = _weight_files(model_path, revision, spec.prefixes)
        tower_cls = spec.load_class()
        config = copy.deepcopy(vision_config)  # vLLM's config object stays as it is
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        dev = resolve_device(device)
        module = tower_cls._from_config(config, dtype=dtype)
        state = {}
        for f in files:
            with safe_open(f, "pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (a safetensors safe_open is not iterable)
                    for p in spec.prefixes:
                        if key.startswith(p):
                            state[key[len(p) :]] = sf.get_tensor(key)
                            break
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]  # buffers computed at construction
        if missing or unexpected or not state:
            raise RuntimeError(
                f"vision tower weights of {model_path} do not fit {spec.cls}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, found {len(state)}"
            )
        module.to(device=dev)  # weights are in dtype already; float32 buffers (rotary inv_freq) stay float32
        module.eval()
        attention = install_packed_attention(module) if packed_attention else str(config._attn_implementation)
        logger.info(
            "DTD: vision tower %s loaded in this API-server process (%s, %s, %.0f M parameters, attention %s) "
            "for feature-level DTD",
            spec.cls.split(":")[1],
            dev,
            dtype,
            sum(p.numel() for p in module.parameters()) / 1e6,
            attention,
        )
        decision_dim = int(vision_config.out_hidden_size) if spec.deepstack else None
        return cls(module, int(vision_config.spatial_merge_size), dev, max_steps(), decision_dim)

    def decision_view(self, rows: torch.Tensor) -> torch.Tensor:
        """The columns of output rows (..., C) that DTD compares: the main output, without DeepStack levels."""
        return rows if self.decision_dim is None else rows[..., : self.decision_dim]

    def encode(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """One video, ``max_steps`` temporal steps per tower call (bounded activation memory; attention
        never crosses temporal steps, so the rows are those of one call)."""
        t, h, w = (int(x) for x in torch.as_tensor(grid_thw).reshape(3).tolist())
        per_step = h * w
        parts = []
        for a in range(0, t, self.max_steps):
            k = min(self.max_steps, t - a)
            parts += self.encode_many([(pixel_values[a * per_step : (a + k) * per_step], (k, h, w))])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def encode_many(self, videos: list) -> list[torch.Tensor]:
        """Several videos (or temporal steps of streams) in ONE tower call: ``[(pixel_values, grid_thw)]``
        as for :meth:`encode`, outputs in the same order. Attention never crosses videos (nor steps)."""
        grids = torch.stack([torch.as_tensor(g, dtype=torch.long).reshape(3) for _, g in videos])
        pixels = torch.cat([pv for pv, _ in videos]) if len(videos) > 1 else videos[0][0]
        if pixels.shape[0] != int(grids.prod(-1).sum()):
            raise ValueError(f"{pixels.shape[0]} patches do not fit the grids {grids.tolist()}")
        t0 = time.perf_counter()
        with self._lock:
            raw = self.module(pixels.to(device=self.device, dtype=self.dtype), grid_thw=grids.to(self.device))
            out = getattr(raw, "pooler_output", raw)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if self.decision_dim is not None:  # [main | level 1 | level 2 ...], vLLM's layout of video_embeds
                # transformers 5: an output object; 4.x: a tuple (merged, deepstack features)
                levels = raw.deepstack_features if hasattr(raw, "deepstack_features") else raw[1]
                out = torch.cat([out, *levels], dim=-1)
            out = out.cpu()  # the model's dtype (the engine's too); decisions compute in float32
            seconds = time.perf_counter() - t0
            steps = int(grids[:, 0].sum())
            self.steps += steps
            self.seconds += seconds
        request_stats.record_encoder(steps, seconds)
        sizes = (grids.prod(-1) // self.merge_size**2).tolist()
        if out.shape[0] != sum(sizes):
            raise RuntimeError(
                f"vision tower returned {out.shape[0]} rows for grids {grids.tolist()}, expected {sum(sizes)}"
            )
        return list(out.split(sizes))


def _weight_files(model_path: str, revision: str | None, prefixes: tuple[str, ...] = ("visual.",)) -> list[str]:
    """The checkpoint's safetensors files that hold vision-tower weights (the index, when there is one,
    says which shards; only those are read, or downloaded for a hub id not in the local cache)."""

    def pick(root: str, names: list[str]) -> list[str]:
        index = os.path.join(root, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            names = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
        return [os.path.join(root, n) for n in names]

    if os.path.isdir(model_path):
        files = pick(
            model_path, sorted(os.path.basename(f) for f in glob.glob(os.path.join(model_path, "*.safetensors")))
        )
    else:  # a hub id: the snapshot vLLM itself resolved (local cache first), vision shards only
        from huggingface_hub import snapshot_download

        root = snapshot_download(model_path, revision=revision, allow_patterns=["*.json"])
        names = [os.path.basename(f) for f in pick(root, [])] or ["*.safetensors"]
        root = snapshot_download(model_path, revision=revision, allow_patterns=names)
        files = pick(root, sorted(os.path.basename(f) for f in glob.glob(os.path.join(root, "*.safetensors"))))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise RuntimeError(f"no *.safetensors weights under {model_path}: the vision tower cannot be loaded")
    return files


def resolve_device(device: str | None = None) -> torch.device:
    """Where a tower goes: ``device``, else ``DTD_FEATURE_ENCODER_DEVICE``, else ``cuda`` when there is
    one (the process's current GPU: the first visible one in an API server), else the CPU."""
    return torch.device(device or settings.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))


def max_steps(env=None) -> int:
    return settings.get(MAX_STEPS_ENV, env)


def retry_seconds(env=None) -> float:
    return settings.get(RETRY_ENV, env)


# -- GPU memory: towers inside vLLM's front-end carve-out ---------------------------------------------------


@dataclass(frozen=True)
class TowerMemory:
    """What one tower holds on its GPU (bytes): weights, the activations of one call of ``steps``
    temporal steps (``step_bytes`` each) and the process's CUDA context."""

    param_bytes: int
    step_bytes: int
    steps: int
    context_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.step_bytes * self.steps + self.context_bytes


def step_activation_bytes(vision_config, step_patches: int, itemsize: int) -> int:
    """Peak working set of one temporal step of ``step_patches`` patches in one tower call (no
    gradients, one block at a time): the residual stream and its norm, q/k/v, rotary copies, the
    gathers for attention and its output (~12 hidden-wide rows per patch), the MLP's intermediate
    tensors (~4 rows of ``intermediate_size``) and the input patch, times :data:`ACTIVATION_SLACK`.
    Attention itself runs maskless (flash / memory-efficient kernels on CUDA: no score matrix)."""
    hidden = int(getattr(vision_config, "embed_dim", None) or vision_config.hidden_size)
    inter = int(
        getattr(vision_config, "intermediate_size", None) or hidden * float(getattr(vision_config, "mlp_ratio", 4))
    )
    in_dim = (
        int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
        * int(vision_config.temporal_patch_size)
        * int(vision_config.patch_size) ** 2
    )
    return int(ACTIVATION_SLACK * step_patches * (12 * hidden + 4 * inter + in_dim) * itemsize)


def _checkpoint_json(model_path: str, revision: str | None, name: str) -> dict | None:
    path: object  # a file name, or what the hub cache answers (None, a not-there marker)
    try:
        if os.path.isdir(model_path):
            path = os.path.join(model_path, name)
        else:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model_path, name, revision=revision)
        if isinstance(path, str) and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    except Exception:
        pass
    return None


def _pixel_cap(settings: dict | None) -> int | None:
    if not isinstance(settings, dict):
        return None
    for scope in (settings.get("videos_kwargs"), settings):
        if isinstance(scope, dict):
            size = scope.get("size")
            cap = scope.get("max_pixels") or (size.get("longest_edge") if isinstance(size, dict) else None)
            if cap:
                return int(cap)
    return None


def step_patches(model_config, vision_config, env=None) -> int:
    """Patches of one temporal step the memory estimate assumes: ``DTD_FEATURE_ENCODER_STEP_PATCHES``,
    else the video processor's per-frame pixel cap (the server's ``--mm-processor-kwargs`` ``max_pixels``
    / ``size.longest_edge``, else the checkpoint's video processor config, else transformers' Qwen2-VL
    default) over the patch area. Qwen3-VL's cap is a budget over all frames: an upper bound per frame."""
    given = settings.get(STEP_PATCHES_ENV, env)
    if given is not None:
        return given
    cap = _pixel_cap(getattr(model_config, "mm_processor_kwargs", None))
    path, revision = str(getattr(model_config, "model", "")), getattr(model_config, "revision", None)
    if cap is None:
        processor = _checkpoint_json(path, revision, "processor_config.json") or {}
        cap = _pixel_cap(processor.get("video_processor"))
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if cap is None:
            cap = _pixel_cap(_checkpoint_json(path, revision, name))
    return max(1, (cap or DEFAULT_FRAME_PIXELS) // int(vision_config.patch_size) ** 2)


def _param_bytes(files: list[str], prefixes: tuple[str, ...], itemsize: int) -> int:
    """Bytes of the vision-tower weights in the served dtype, from the safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    numel = 0
    for f in files:
        with safe_open(f, "pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (a safetensors safe_open is not iterable)
                if key.startswith(prefixes):
                    numel += math.prod(sf.get_slice(key).get_shape())
    return numel * itemsize


def tower_memory(spec: VisionTowerSpec, model_config, dtype: torch.dtype, context: bool = True) -> TowerMemory:
    """:class:`TowerMemory` of the served model's tower, estimated before loading it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    vc = model_config.hf_config.vision_config
    files = _weight_files(model_config.model, getattr(model_config, "revision", None), spec.prefixes)
    return TowerMemory(
        param_bytes=_param_bytes(files, spec.prefixes, itemsize),
        step_bytes=step_activation_bytes(vc, step_patches(model_config, vc), itemsize),
        steps=max_steps(),
        context_bytes=CUDA_CONTEXT_BYTES if context else 0,
    )


def gpu_budget_verdict(
    per_tower_bytes: int, budget_gib: float, api_processes: int | None, process_share_bytes: int | None = None
) -> tuple[bool, float]:
    """Do the towers fit in vLLM's front-end carve-out? ``budget_gib``: ``--mm-ipc-gpu-memory-gb``
    (vLLM sequesters that much on each worker GPU, the towers' GPU included, and gives each of the
    ``api_processes`` API-server processes an equal share, ``process_share_bytes`` when known exactly:
    the front-end pool's size). Every API-server process of the server holds a tower on the same device
    (``DTD_FEATURE_ENCODER_DEVICE`` is one value for all), so ``api_processes`` towers share it.
    Returns (fits, the ``--mm-ipc-gpu-memory-gb`` that would fit them, rounded up to 0.1 GiB;
    ``api_processes`` unknown counts 1)."""
    processes = max(1, int(api_processes or 1))
    needed_gib = math.ceil(per_tower_bytes * processes / GiB * 10 - 1e-9) / 10
    share = process_share_bytes if process_share_bytes is not None else int(budget_gib * GiB) // processes
    return per_tower_bytes <= share and budget_gib > 0, needed_gib


def _budget_message(
    memory: TowerMemory, device: torch.device, budget_gib: float, api_processes: int | None, needed_gib: float
) -> str:
    per = memory.total / GiB
    if api_processes:
        what = (
            f"{api_processes} API-server process(es) x {per:.2f} GiB: start the server with "
            f"--mm-ipc-gpu-memory-gb {needed_gib:.1f}"
        )
    else:
        what = (
            f"one tower per API-server process: start the server with --mm-ipc-gpu-memory-gb {needed_gib:.1f} x "
            f"its API-server processes (--api-server-count, which defaults to --data-parallel-size)"
        )
    return (
        f"the vision tower for dtd_criterion 'feature' needs {per:.2f} GiB on {device} (weights "
        f"{memory.param_bytes / GiB:.2f} GiB + {memory.steps} steps x {memory.step_bytes / GiB:.3f} GiB of "
        f"activations + {memory.context_bytes / GiB:.1f} GiB CUDA context) and must fit in vLLM's front-end GPU "
        f"carve-out, --mm-ipc-gpu-memory-gb (now {budget_gib:g} GiB); {what} (plus what GPU video decoding "
        f"needs, if used); or lower {MAX_STEPS_ENV} or the processor's max_pixels; or give the towers a GPU of "
        f"their own ({DEVICE_ENV}=cuda:K) and set {MEMORY_CHECK_ENV}=off"
    )


def _api_process_count(pool, budget_gib: float) -> int | None:
    """This server's API-server processes: from vLLM's front-end pool (its size is the carve-out over
    them), else 1 when this is the main process (a single API server), else unknown."""
    if pool is not None and budget_gib > 0 and getattr(pool, "total_bytes", 0) > 0:
        return max(1, round(int(budget_gib * GiB) / pool.total_bytes))
    return 1 if multiprocessing.current_process().name == "MainProcess" else None


def _front_end_pool():
    """vLLM's front-end GPU memory pool of this process (None when the carve-out is 0)."""
    from vllm.multimodal import gpu_ipc_memory

    return vllm_patches.require(gpu_ipc_memory, "get_mm_gpu_ipc_pool", [])()


def _carve_out_gib(model_config) -> float:
    mm_config = getattr(model_config, "multimodal_config", None)
    if mm_config is None:
        return 0.0
    from vllm.config.multimodal import MultiModalConfig

    vllm_patches.require(MultiModalConfig, "mm_ipc_gpu_memory_gb")
    return float(getattr(mm_config, "mm_ipc_gpu_memory_gb", 0) or 0)


def check_gpu_budget(spec: VisionTowerSpec, model_config, dtype: torch.dtype, device: torch.device):
    """On a CUDA device: refuse (:class:`EncoderUnavailable` saying what to set) a tower that does not
    fit in ``--mm-ipc-gpu-memory-gb``; returns ``(pool, bytes)`` to lease once it is loaded, or None
    (not CUDA, or ``DTD_FEATURE_ENCODER_MEMORY_CHECK=off``)."""
    if device.type != "cuda":
        return None
    if not settings.get(MEMORY_CHECK_ENV):
        return None
    mm_config = getattr(model_config, "multimodal_config", None)
    try:  # vLLM already reserves a CUDA context per API server when videos decode on the GPU
        gpu_decoding = bool(mm_config is not None and mm_config.use_gpu_video_backend())
    except Exception:
        gpu_decoding = False
    memory = tower_memory(spec, model_config, dtype, context=not gpu_decoding)
    budget = _carve_out_gib(model_config)
    pool = _front_end_pool() if budget > 0 else None
    processes = _api_process_count(pool, budget)
    fits, needed = gpu_budget_verdict(memory.total, budget, processes, pool.total_bytes if pool is not None else None)
    if not fits:
        raise EncoderUnavailable(_budget_message(memory, device, budget, processes, needed))
    # GPU video decoding leases from the same pool and vLLM's acquire() waits until bytes are free: a
    # lease held for the tower's lifetime could leave a large decode waiting for good. Then the tower
    # is only counted (above), not leased.
    return (None if gpu_decoding else pool), memory.total


# -- one tower per API-server process ---------------------------------------------------------------------


_TOWERS: dict[tuple, VisionTower] = {}
_FAILED: dict[tuple, tuple[str, float]] = {}  # key -> (reason, monotonic time of the next try)
_LOAD_LOCK = threading.Lock()
_clock = time.monotonic  # tests move time


def enabled(env=None) -> bool:
    return settings.get(ENV, env) == "api"


def _unavailable(reason: str, retry_at: float) -> EncoderUnavailable:
    wait = max(0.0, retry_at - _clock())
    return EncoderUnavailable(
        f"dtd_criterion: 'feature' is not available: the vision tower did not load ({reason}); "
        f"the next feature request after {wait:.0f} s loads it again"
    )


def tower_for(spec: VisionTowerSpec | None, model_config) -> VisionTower:
    """This process's vision tower for the served model (loaded once). Raises :class:`EncoderUnavailable`:
    no tower for the family, towers off, not an API-server process, or a load that failed (answered at
    once for ``DTD_FEATURE_ENCODER_RETRY_S`` seconds, then tried again), including a CUDA tower that
    does not fit vLLM's front-end carve-out (:func:`check_gpu_budget`)."""
    if spec is None:
        raise EncoderUnavailable(
            "dtd_criterion: 'feature' is not available for this model family (no vision tower is known)"
        )
    if not enabled():
        raise EncoderUnavailable(f"dtd_criterion: 'feature' is disabled on this server ({ENV}=off); use 'pixel'")
    key = (spec.cls, model_config.model, getattr(model_config, "revision", None))
    tower = _TOWERS.get(key)
    if tower is not None:
        return tower
    if not vllm_patches.in_api_server_process():
        name = multiprocessing.current_process().name
        logger.error(
            "DTD: a vision tower was asked for in process %r (pid %d), which is not an API-server process; "
            "only API servers load towers",
            name,
            os.getpid(),
        )
        raise EncoderUnavailable(
            f"dtd_criterion: 'feature' is not available in this process ({name!r}): only vLLM's "
            f"API-server processes load the vision tower"
        )
    with _LOAD_LOCK:
        if key in _TOWERS:
            return _TOWERS[key]
        failed = _FAILED.get(key)
        if failed is not None and _clock() < failed[1]:
            raise _unavailable(*failed)
        dtype = model_config.dtype if isinstance(model_config.dtype, torch.dtype) else torch.float32
        try:
            device = resolve_device()
            budget = check_gpu_budget(spec, model_config, dtype, device)
            tower = VisionTower.load(
                spec,
                model_config.model,
                model_config.hf_config.vision_config,
                dtype,
                revision=getattr(model_config, "revision", None),
                device=str(device),
            )
            if budget is not None and budget[0] is not None:  # the carve-out's pool: the tower's bytes stay leased
                tower.lease = budget[0].acquire(budget[1])
        except Exception as e:  # answered at once until the retry time, then loaded again
            reason = str(e)[:600]
            retry_at = _clock() + retry_seconds()
            _FAILED[key] = (reason, retry_at)
            logger.error(
                "DTD: the vision tower for feature-level DTD did not load: %s (feature requests get a 400 "
                "for %.0f s, then the next one tries again; %s)",
                reason,
                retry_at - _clock(),
                RETRY_ENV,
            )
            raise _unavailable(reason, retry_at) from e
        _FAILED.pop(key, None)
        _TOWERS[key] = tower
        return tower


def loaded_towers() -> list[VisionTower]:
    return list(_TOWERS.values())
