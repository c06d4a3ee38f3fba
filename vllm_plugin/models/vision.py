"""The vision tower in the API-server process: feature-level DTD decides on its outputs.

Feature-level DTD needs the vision encoder's merged outputs BEFORE the prompt is built (the kept
count is the number of placeholder tokens). The API server therefore runs the checkpoint's own vision
tower (transformers' module of the family, only the ``visual.*`` weights are read) and hands the
engine the KEPT outputs as embedding inputs (``video_embeds`` + grid + keep mask): the engine never
encodes that video again. Why this route and not vLLM's encoder disaggregation: README, "Feature-level
DTD: where the encoder runs".

One tower per API-server process, loaded on first use (or at start when the server's default
criterion is ``feature``); ``DTD_FEATURE_ENCODER=off`` disables it (feature requests then get a 400).
``DTD_FEATURE_ENCODER_DEVICE`` puts it on a device (default: ``cuda`` when there is one, else the
CPU); ``DTD_FEATURE_ENCODER_MAX_STEPS`` bounds the temporal steps of one tower call (activation
memory), 16 by default.

Qwen2-VL / Qwen2.5-VL vision attention never crosses temporal steps (window and full attention are
both per frame group), so encoding step by step (streams, on arrival) gives the outputs of encoding
the whole video.
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from vllm_plugin.entrypoints import request_stats

logger = logging.getLogger("vllm.dtd_plugin")
ENV = "DTD_FEATURE_ENCODER"  # "api" (default): a tower in each API-server process; "off": none
DEVICE_ENV = "DTD_FEATURE_ENCODER_DEVICE"
MAX_STEPS_ENV = "DTD_FEATURE_ENCODER_MAX_STEPS"


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


class VisionTower:
    """A family's vision tower with the checkpoint's weights.

    :meth:`encode` maps processed patches to merged outputs, one row per LLM token:
    ``pixel_values`` (grid_t * grid_h * grid_w, C * tps * patch²) and ``grid_thw`` (3,) to
    (grid_t * grid_h/merge * grid_w/merge, hidden) in the tower's dtype, on the CPU, in (t, h, w)
    raster order.
    """

    def __init__(self, module: torch.nn.Module, merge_size: int, device: torch.device, max_steps: int = 16,
                 decision_dim: Optional[int] = None):
        self.module = module.eval()
        self.decision_dim = decision_dim  # leading columns of an output row that DTD compares (None: all)
        self.merge_size = merge_size
        self.device = device
        self.max_steps = max(1, int(max_steps))  # temporal steps per tower call
        self.dtype = next(module.parameters()).dtype
        self._lock = threading.Lock()  # one encode at a time per process (the tower is not re-entrant on GPUs)
        self.steps = 0  # temporal steps encoded by this process
        self.seconds = 0.0

    @classmethod
    def load(cls, spec: VisionTowerSpec, model_path: str, vision_config, dtype: torch.dtype,
             revision: Optional[str] = None, device: Optional[str] = None) -> "VisionTower":
        from safetensors import safe_open

        files = _weight_files(model_path, revision, spec.prefixes)
        tower_cls = spec.load_class()
        config = copy.deepcopy(vision_config)  # vLLM's config object stays as it is
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        dev = torch.device(device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))
        module = tower_cls._from_config(config, dtype=dtype)
        state = {}
        for f in files:
            with safe_open(f, "pt") as sf:
                for key in sf.keys():
                    for p in spec.prefixes:
                        if key.startswith(p):
                            state[key[len(p):]] = sf.get_tensor(key)
                            break
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]  # buffers computed at construction
        if missing or unexpected or not state:
            raise RuntimeError(f"vision tower weights of {model_path} do not fit {spec.cls}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}, found {len(state)}")
        module.to(device=dev)  # weights are in dtype already; float32 buffers (rotary inv_freq) stay float32
        logger.info("DTD: vision tower %s loaded in this API-server process (%s, %s, %.0f M parameters) for feature-level DTD",
                    spec.cls.split(":")[1], dev, dtype, sum(p.numel() for p in module.parameters()) / 1e6)
        decision_dim = int(vision_config.out_hidden_size) if spec.deepstack else None
        return cls(module, int(vision_config.spatial_merge_size), dev, int(os.environ.get(MAX_STEPS_ENV) or 16), decision_dim)

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
            parts += self.encode_many([(pixel_values[a * per_step:(a + k) * per_step], (k, h, w))])
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
            raise RuntimeError(f"vision tower returned {out.shape[0]} rows for grids {grids.tolist()}, expected {sum(sizes)}")
        return list(out.split(sizes))


def _weight_files(model_path: str, revision: Optional[str], prefixes: tuple[str, ...] = ("visual.",)) -> list[str]:
    """The checkpoint's safetensors files that hold vision-tower weights (the index, when there is one,
    says which shards; only those are read, or downloaded for a hub id not in the local cache)."""

    def pick(root: str, names: list[str]) -> list[str]:
        index = os.path.join(root, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = json.load(open(index)).get("weight_map", {})
            names = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
        return [os.path.join(root, n) for n in names]

    if os.path.isdir(model_path):
        files = pick(model_path, sorted(os.path.basename(f) for f in glob.glob(os.path.join(model_path, "*.safetensors"))))
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


_TOWERS: dict[tuple, VisionTower] = {}
_FAILED: dict[tuple, str] = {}
_LOAD_LOCK = threading.Lock()


def enabled(env=os.environ) -> bool:
    value = env.get(ENV, "api").strip().lower()
    if value not in ("api", "off"):
        raise ValueError(f"{ENV} must be 'api' or 'off', got {value!r}")
    return value == "api"


def tower_for(spec: Optional[VisionTowerSpec], model_config) -> VisionTower:
    """This process's vision tower for the served model (loaded once). Raises :class:`EncoderUnavailable`."""
    if spec is None:
        raise EncoderUnavailable("dtd_criterion: 'feature' is not available for this model family (no vision tower is known)")
    if not enabled():
        raise EncoderUnavailable(f"dtd_criterion: 'feature' is disabled on this server ({ENV}=off); use 'pixel'")
    key = (spec.cls, model_config.model, getattr(model_config, "revision", None))
    tower = _TOWERS.get(key)
    if tower is not None:
        return tower
    with _LOAD_LOCK:
        if key in _FAILED:
            raise EncoderUnavailable(f"dtd_criterion: 'feature' is not available: the vision tower did not load ({_FAILED[key]})")
        if key not in _TOWERS:
            dtype = model_config.dtype if isinstance(model_config.dtype, torch.dtype) else torch.float32
            try:
                _TOWERS[key] = VisionTower.load(spec, model_config.model, model_config.hf_config.vision_config, dtype,
                                                revision=getattr(model_config, "revision", None))
            except Exception as e:  # remembered: later requests get a 400 at once, not another load
                logger.error("DTD: the vision tower for feature-level DTD did not load: %s", e)
                _FAILED[key] = str(e)[:300]
                raise EncoderUnavailable(f"dtd_criterion: 'feature' is not available: the vision tower did not load ({e})") from e
        return _TOWERS[key]


def loaded_towers() -> list[VisionTower]:
    return list(_TOWERS.values())
