"""Feature towers inside the budget, without a server: a failed tower load is retried after a while
(not remembered forever), only API-server processes load towers (never engine cores, multiprocessing
or Ray workers), a CUDA tower must fit vLLM's front-end carve-out (``--mm-ipc-gpu-memory-gb``) or is
refused with what to set, and the tower's vision attention runs batched with the stock outputs."""

from __future__ import annotations

import logging
import math
import multiprocessing
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.models import vision
from vllm_plugin.models.families import families

GiB = 1 << 30
SPECS = {s.name: s.vision_tower for s in families() if s.vision_tower is not None}  # each family's tower


def _checkpoint(family: str):
    from transformers import AutoConfig

    from analysis.harness.tiny_model import ensure_tiny_model

    path = ensure_tiny_model("test", family=family)
    return path, AutoConfig.from_pretrained(path).vision_config


class _Tower:
    lease = None


@pytest.fixture
def clock(monkeypatch):
    """A fresh tower registry on the CPU, with a clock the test moves."""
    now = [1000.0]
    monkeypatch.setattr(vision, "_TOWERS", {})
    monkeypatch.setattr(vision, "_FAILED", {})
    monkeypatch.setattr(vision, "_clock", lambda: now[0])
    monkeypatch.setattr(vision, "resolve_device", lambda device=None: torch.device("cpu"))
    monkeypatch.delenv(vision.RETRY_ENV, raising=False)
    monkeypatch.setattr(multiprocessing.current_process(), "name", "MainProcess")
    return now


def _model_config(model="/models/flaky", **kw):
    return SimpleNamespace(
        model=model,
        revision=None,
        dtype=torch.float32,
        multimodal_config=None,
        mm_processor_kwargs=None,
        hf_config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)),
        **kw,
    )


# --- 1. a failed load is retried later --------------------------------------------------------------------


def _flaky_load(monkeypatch, failures: int = 1):
    calls = []
    tower = _Tower()

    def load(spec, model, vision_config, dtype, revision=None, device=None, packed_attention=True):
        calls.append(model)
        if len(calls) <= failures:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return tower

    monkeypatch.setattr(vision.VisionTower, "load", load)
    return calls, tower


def test_a_failed_load_is_answered_at_once_then_retried_after_the_retry_time(clock, monkeypatch, caplog):
    calls, tower = _flaky_load(monkeypatch)
    spec, mc = SPECS["qwen2_5_vl"], _model_config()
    with (
        caplog.at_level(logging.ERROR, logger="vllm.dtd_plugin"),
        pytest.raises(vision.EncoderUnavailable, match=r"dtd_criterion.*did not load.*out of memory.*after 30 s"),
    ):
        vision.tower_for(spec, mc)
    assert "did not load" in caplog.text and vision.RETRY_ENV in caplog.text
    clock[0] += 20
    with pytest.raises(vision.EncoderUnavailable, match=r"out of memory.*after 10 s"):  # at once: no second load
        vision.tower_for(spec, mc)
    assert len(calls) == 1
    clock[0] += 10.5
    assert vision.tower_for(spec, mc) is tower  # the retry time passed: loaded again, and this time it loads
    assert vision.tower_for(spec, mc) is tower and len(calls) == 2
    assert not vision._FAILED and vision.loaded_towers() == [tower]


def test_retry_zero_tries_every_request_and_the_retry_time_is_validated(clock, monkeypatch):
    calls, tower = _flaky_load(monkeypatch, failures=2)
    monkeypatch.setenv(vision.RETRY_ENV, "0")
    spec, mc = SPECS["qwen2_5_vl"], _model_config()
    for _ in range(2):
        with pytest.raises(vision.EncoderUnavailable, match="did not load"):
            vision.tower_for(spec, mc)
    assert vision.tower_for(spec, mc) is tower and len(calls) == 3
    assert vision.retry_seconds({}) == 30.0 and vision.retry_seconds({vision.RETRY_ENV: "2.5"}) == 2.5
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match=vision.RETRY_ENV):
            vision.retry_seconds({vision.RETRY_ENV: bad})


def test_a_checkpoint_without_tower_weights_fails_each_try_with_its_reason(clock, tmp_path):
    mc = _model_config(str(tmp_path))
    for _ in range(2):
        with pytest.raises(vision.EncoderUnavailable, match="no \\*.safetensors weights"):
            vision.tower_for(SPECS["qwen2_5_vl"], mc)
    clock[0] += 31
    with pytest.raises(vision.EncoderUnavailable, match="after 30 s"):  # tried again: a fresh retry time
        vision.tower_for(SPECS["qwen2_5_vl"], mc)


# --- 2. only API-server processes load towers ------------------------------------------------------------


def _fake_ray(mode):
    ray = types.ModuleType("ray")
    ray.SCRIPT_MODE, ray.WORKER_MODE, ray.LOCAL_MODE = 0, 1, 2
    ray.get_runtime_context = lambda: SimpleNamespace(worker=SimpleNamespace(mode=mode))
    return ray


@pytest.mark.parametrize(
    "name, expected",
    [
        ("MainProcess", True),
        ("ApiServer_0", True),
        ("ApiServer_3", True),
        ("APIServer_DPRank_1", True),
        ("EngineCore_DP0", False),
        ("EngineCore", False),
        ("VllmWorker-0", False),
        ("SpawnProcess-2", False),
    ],
)
def test_api_server_processes_by_name(monkeypatch, name, expected):
    monkeypatch.setattr(multiprocessing.current_process(), "name", name)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(vllm_patches, "_process_title", lambda: "python3 -m vllm serve")
    assert vllm_patches.in_api_server_process() is expected


@pytest.mark.parametrize(
    "mode, title, expected",
    [
        (1, "ray::RayWorkerWrapper.execute_method", False),  # vLLM's Ray GPU worker: MainProcess to multiprocessing
        (1, "VLLM::EngineCore_DP0", False),  # a Ray engine-core actor vLLM retitled: Ray's mode still says worker
        (3, "ray::SPILL_IO", False),  # Ray's IO workers
        (0, "python3 -m vllm serve", True),  # a driver that called ray.init(): vLLM's API server with the Ray executor
        (2, "python3 -m vllm serve", True),  # Ray's local mode runs in the driver
        (None, "ray::IDLE", False),  # ray imported but not connected: Ray's process title decides
        (None, "python3 -m vllm serve", True),
    ],
)
def test_ray_workers_are_not_api_servers(monkeypatch, mode, title, expected):
    monkeypatch.setattr(multiprocessing.current_process(), "name", "MainProcess")
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(mode))
    monkeypatch.setattr(vllm_patches, "_process_title", lambda: title)
    assert vllm_patches.in_ray_worker() is (not expected)
    assert vllm_patches.in_api_server_process() is expected


def test_a_ray_process_title_without_ray_imported_is_a_ray_worker(monkeypatch):
    monkeypatch.setattr(multiprocessing.current_process(), "name", "MainProcess")
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(vllm_patches, "_process_title", lambda: "ray::DPMoEEngineCoreActor")
    assert not vllm_patches.in_api_server_process()


def test_the_process_title_is_read():
    assert vllm_patches._process_title()  # this process's argv[0] (or its setproctitle title)


@pytest.mark.parametrize("name, ray_mode", [("EngineCore_DP0", None), ("VllmWorker-1", None), ("MainProcess", 1)])
def test_towers_load_only_in_api_server_processes(clock, monkeypatch, caplog, name, ray_mode):
    calls, _ = _flaky_load(monkeypatch, failures=0)
    monkeypatch.setattr(multiprocessing.current_process(), "name", name)
    if ray_mode is not None:
        monkeypatch.setitem(sys.modules, "ray", _fake_ray(ray_mode))
    with (
        caplog.at_level(logging.ERROR, logger="vllm.dtd_plugin"),
        pytest.raises(vision.EncoderUnavailable, match=f"not available in this process.*{name}.*API-server"),
    ):
        vision.tower_for(SPECS["qwen2_5_vl"], _model_config())
    assert calls == [] and "not an API-server process" in caplog.text and not vision._FAILED


# --- 3. GPU memory: inside --mm-ipc-gpu-memory-gb ------------------------------------------------------


@pytest.mark.parametrize(
    "per_gib, budget, processes, share, fits, needed",
    [
        (3.0, 0.0, 1, None, False, 3.0),  # no carve-out: never fits
        (3.0, 3.0, 1, None, True, 3.0),
        (3.0, 6.0, 2, None, True, 6.0),  # two API servers: two towers on the one device
        (3.0, 5.9, 2, None, False, 6.0),
        (1.25, 2.0, 3, None, False, 3.8),  # 3.75 GiB rounds up to 0.1
        (1.25, 4.0, 3, None, True, 3.8),
        (2.0, 8.0, 4, 2 * GiB, True, 8.0),  # the pool's exact share
        (2.0, 8.0, 4, 2 * GiB - 1, False, 8.0),
        (2.0, 0.0, None, None, False, 2.0),  # unknown process count: counts one
    ],
)
def test_gpu_budget_verdict(per_gib, budget, processes, share, fits, needed):
    assert vision.gpu_budget_verdict(int(per_gib * GiB), budget, processes, share) == (fits, needed)


def test_step_activation_estimate_of_known_shapes():
    q25 = SimpleNamespace(hidden_size=1280, intermediate_size=3420, in_channels=3, temporal_patch_size=2, patch_size=14)
    per_patch = 12 * 1280 + 4 * 3420 + 3 * 2 * 14 * 14  # 30216 values
    assert vision.step_activation_bytes(q25, 3072, 2) == int(1.25 * 3072 * per_patch * 2)  # ~232 MB per 448x448 step
    # Qwen2-VL names the width embed_dim (its hidden_size is the merger's output) and has mlp_ratio
    q2 = SimpleNamespace(
        embed_dim=1280, hidden_size=3584, mlp_ratio=4, in_chans=3, temporal_patch_size=2, patch_size=14
    )
    assert vision.step_activation_bytes(q2, 100, 4) == int(1.25 * 100 * (12 * 1280 + 4 * 5120 + 1176) * 4)


def test_step_patches_come_from_the_env_the_server_or_the_checkpoint(monkeypatch):
    monkeypatch.delenv(vision.STEP_PATCHES_ENV, raising=False)
    path, vc = _checkpoint("qwen2_5_vl")
    mc = SimpleNamespace(model=str(path), revision=None, mm_processor_kwargs=None)
    assert vision.step_patches(mc, vc) == 200704 // 14**2  # the checkpoint's video processor: size.longest_edge
    mc.mm_processor_kwargs = {"max_pixels": 448 * 448}
    assert vision.step_patches(mc, vc) == 1024
    mc.mm_processor_kwargs = {"videos_kwargs": {"size": {"longest_edge": 224 * 224, "shortest_edge": 56 * 56}}}
    assert vision.step_patches(mc, vc) == 256
    assert vision.step_patches(mc, vc, {vision.STEP_PATCHES_ENV: "77"}) == 77
    q3_path, q3_vc = _checkpoint("qwen3_vl")
    assert vision.step_patches(SimpleNamespace(model=str(q3_path), revision=None), q3_vc) == 786432 // 16**2
    assert (
        vision.step_patches(SimpleNamespace(model="/nonexistent", revision=None), vc)
        == vision.DEFAULT_FRAME_PIXELS // 196
    )


class _Pool:
    def __init__(self, total_bytes):
        self.total_bytes = total_bytes
        self.leases = []

    def acquire(self, nbytes):
        assert nbytes <= self.total_bytes
        self.leases.append(nbytes)
        return ("lease", nbytes)


@pytest.fixture
def cuda_tower(clock, monkeypatch):
    """tower_for as on a GPU server: the tower would go to cuda:0 (its load is faked), the tiny checkpoint's
    real weights and processor config size the estimate."""
    path, vc = _checkpoint("qwen2_5_vl")
    monkeypatch.setattr(vision, "resolve_device", lambda device=None: torch.device("cuda", 0))
    monkeypatch.delenv(vision.MEMORY_CHECK_ENV, raising=False)
    monkeypatch.delenv(vision.STEP_PATCHES_ENV, raising=False)
    monkeypatch.delenv(vision.MAX_STEPS_ENV, raising=False)
    calls, tower = _flaky_load(monkeypatch, failures=0)
    pools = []

    def pool():
        return pools[0] if pools else None

    monkeypatch.setattr(vision, "_front_end_pool", pool)

    def model_config(budget_gib, gpu_decoding=False):
        mm = SimpleNamespace(mm_ipc_gpu_memory_gb=budget_gib, use_gpu_video_backend=lambda: gpu_decoding)
        return SimpleNamespace(
            model=str(path),
            revision=None,
            dtype=torch.bfloat16,
            multimodal_config=mm,
            mm_processor_kwargs=None,
            hf_config=SimpleNamespace(vision_config=vc),
        )

    memory = vision.tower_memory(SPECS["qwen2_5_vl"], model_config(0), torch.bfloat16)
    return SimpleNamespace(calls=calls, tower=tower, pools=pools, model_config=model_config, memory=memory)


def test_the_estimate_of_the_tiny_tower(cuda_tower):
    m = cuda_tower.memory
    with __import__("safetensors").safe_open(str(cuda_tower.model_config(0).model) + "/model.safetensors", "pt") as sf:
        numel = sum(
            math.prod(sf.get_slice(k).get_shape())
            for k in sf.keys()  # noqa: SIM118 (a safetensors safe_open is not iterable)
            if k.startswith(("visual.", "model.visual."))
        )
    assert m.param_bytes == numel * 2  # bf16
    assert m.steps == 16 and m.context_bytes == vision.CUDA_CONTEXT_BYTES
    assert m.total == m.param_bytes + 16 * m.step_bytes + vision.CUDA_CONTEXT_BYTES


def test_a_cuda_tower_without_a_carve_out_is_refused_saying_what_to_set(cuda_tower, caplog):
    mc = cuda_tower.model_config(0)
    needed = math.ceil(cuda_tower.memory.total / GiB * 10) / 10
    with caplog.at_level(logging.ERROR, logger="vllm.dtd_plugin"), pytest.raises(vision.EncoderUnavailable) as e:
        vision.tower_for(SPECS["qwen2_5_vl"], mc)
    msg = str(e.value)
    assert msg.startswith("dtd_criterion") and f"--mm-ipc-gpu-memory-gb {needed:.1f}" in msg
    assert "now 0 GiB" in msg and vision.MEMORY_CHECK_ENV in msg and "cuda:0" in msg
    assert f"--mm-ipc-gpu-memory-gb {needed:.1f}" in caplog.text  # logged as an error too
    assert cuda_tower.calls == []  # nothing was loaded onto the GPU


def test_the_carve_out_is_shared_by_the_api_servers(cuda_tower, monkeypatch):
    """Two API servers (the front-end pool is half the carve-out): the towers need twice one tower."""
    per = cuda_tower.memory.total
    budget = 1.5 * per / GiB  # one tower fits, two do not
    cuda_tower.pools.append(_Pool(int(budget * GiB) // 2))
    monkeypatch.setattr(multiprocessing.current_process(), "name", "ApiServer_1")
    with pytest.raises(vision.EncoderUnavailable, match=r"2 API-server process\(es\)") as e:
        vision.tower_for(SPECS["qwen2_5_vl"], cuda_tower.model_config(budget))
    assert f"--mm-ipc-gpu-memory-gb {math.ceil(2 * per / GiB * 10) / 10:.1f}" in str(e.value)
    assert cuda_tower.calls == [] and cuda_tower.pools[0].leases == []


def test_a_tower_that_fits_loads_and_leases_its_bytes_from_the_front_end_pool(cuda_tower, monkeypatch):
    per = cuda_tower.memory.total
    budget = math.ceil(2 * per / GiB * 10) / 10
    cuda_tower.pools.append(_Pool(int(budget * GiB) // 2))
    monkeypatch.setattr(multiprocessing.current_process(), "name", "ApiServer_0")
    tower = vision.tower_for(SPECS["qwen2_5_vl"], cuda_tower.model_config(budget))
    assert tower is cuda_tower.tower and tower.lease == ("lease", per) and cuda_tower.pools[0].leases == [per]


def test_an_api_server_count_unknown_says_to_multiply(cuda_tower, monkeypatch):
    monkeypatch.setattr(multiprocessing.current_process(), "name", "ApiServer_2")
    with pytest.raises(vision.EncoderUnavailable, match=r"x its API-server processes \(--api-server-count"):
        vision.tower_for(SPECS["qwen2_5_vl"], cuda_tower.model_config(0))


def test_gpu_video_decoding_already_reserves_the_cuda_context(cuda_tower):
    no_context = cuda_tower.memory.total - vision.CUDA_CONTEXT_BYTES
    budget = no_context / GiB * 1.01  # enough without a context of its own
    assert vision.tower_for(SPECS["qwen2_5_vl"], cuda_tower.model_config(budget, gpu_decoding=True)) is cuda_tower.tower
    # decodes lease from the same pool and wait for free bytes: the tower takes no lease for good
    assert cuda_tower.tower.lease is None and all(not p.leases for p in cuda_tower.pools)


def test_the_check_can_be_turned_off_and_a_cpu_tower_is_never_checked(cuda_tower, monkeypatch):
    monkeypatch.setenv(vision.MEMORY_CHECK_ENV, "off")
    assert vision.tower_for(SPECS["qwen2_5_vl"], cuda_tower.model_config(0)) is cuda_tower.tower
    assert (
        vision.check_gpu_budget(SPECS["qwen2_5_vl"], cuda_tower.model_config(0), torch.float32, torch.device("cpu"))
        is None
    )
    monkeypatch.setenv(vision.MEMORY_CHECK_ENV, "maybe")
    with pytest.raises(ValueError, match=vision.MEMORY_CHECK_ENV):
        vision.check_gpu_budget(SPECS["qwen2_5_vl"], cuda_tower.model_config(0), torch.float32, torch.device("cuda"))


def test_fewer_steps_per_call_need_less(cuda_tower, monkeypatch):
    monkeypatch.setenv(vision.MAX_STEPS_ENV, "4")
    small = vision.tower_memory(SPECS["qwen2_5_vl"], cuda_tower.model_config(0), torch.bfloat16)
    assert small.steps == 4 and small.total == cuda_tower.memory.total - 12 * small.step_bytes


def test_vllm_still_has_the_carve_out_this_relies_on():
    from vllm.config.multimodal import MultiModalConfig
    from vllm.multimodal import gpu_ipc_memory

    vllm_patches.require(MultiModalConfig, "mm_ipc_gpu_memory_gb")
    pool = gpu_ipc_memory.maybe_init_mm_gpu_ipc_pool(1.0, 4)
    try:
        assert vision._front_end_pool() is pool and pool.total_bytes == GiB // 4
        assert vision._api_process_count(pool, 1.0) == 4
        lease = pool.acquire(GiB // 8)
        assert pool.available_bytes == GiB // 8
        lease.release()
    finally:
        gpu_ipc_memory.set_mm_gpu_ipc_pool(None)


# --- 4. batched vision attention ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers():
    """Per family: (packed tower, stock sdpa tower) of the tiny checkpoint, float32."""
    out = {}
    for family, spec in SPECS.items():
        path, vc = _checkpoint(family)
        out[family] = (
            vision.VisionTower.load(spec, str(path), vc, torch.float32),
            vision.VisionTower.load(spec, str(path), vc, torch.float32, packed_attention=False),
        )
    return out


def _videos(tower, grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_dim = math.prod(tower.module.patch_embed.proj.weight.shape[1:])
    return [(torch.randn(t * h * w, in_dim, generator=g), (t, h, w)) for t, h, w in grids]


def _encode_counting(tower, videos, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    try:
        return tower.encode_many(videos), len(calls)
    finally:
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("family", list(SPECS))
def test_the_tower_loads_with_batched_attention(towers, family):
    packed, stock = towers[family]
    assert packed.attention == vision.PACKED_ATTENTION and stock.attention == "sdpa"
    assert all(
        m.config._attn_implementation == vision.PACKED_ATTENTION
        for m in packed.module.modules()
        if type(m).__name__.endswith("Attention")
    )


@pytest.mark.parametrize("family", list(SPECS))
def test_one_attention_call_per_layer_for_a_video_of_whole_windows(towers, family, monkeypatch):
    """Frames that tile into whole windows (Qwen2.5-VL: 4x4 merged units; the others attend per frame):
    every sequence in a layer has one length, so one SDPA call per layer, where the stock path makes one
    per window (Qwen2.5-VL) or per frame."""
    packed, stock = towers[family]
    videos = _videos(packed, [(6, 16, 16)])
    got, n_packed = _encode_counting(packed, videos, monkeypatch)
    want, n_stock = _encode_counting(stock, videos, monkeypatch)
    depth = len(packed.module.blocks)
    assert n_packed == depth
    full = len(getattr(packed.module, "fullatt_block_indexes", None) or range(depth))
    windows = 6 * 4 if family == "qwen2_5_vl" else 6  # per window layer: 4 windows per frame
    assert n_stock == full * 6 + (depth - full) * windows
    assert float((got[0] - want[0]).abs().max()) <= 1e-5
    assert torch.equal(got[0], want[0])  # each sequence is computed as by its own SDPA call: bit for bit


@pytest.mark.parametrize("family", list(SPECS))
def test_ragged_windows_and_mixed_videos_give_the_stock_outputs(towers, family, monkeypatch):
    """Edge windows (frames that do not tile), videos of several sizes in one call, a frame over the
    full-attention length of the others: one call per distinct sequence length in a layer, outputs equal."""
    packed, stock = towers[family]
    videos = _videos(packed, [(4, 10, 14), (2, 4, 12), (1, 20, 22), (2, 2, 2)], seed=1)
    got, n_packed = _encode_counting(packed, videos, monkeypatch)
    want, n_stock = _encode_counting(stock, videos, monkeypatch)
    assert n_packed < n_stock
    for a, b in zip(got, want):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    grids = torch.tensor([g for _, g in videos])
    full = set((get_vision_cu_seqlens(grids).diff()).tolist())
    depth = len(packed.module.blocks)
    if family == "qwen2_5_vl":
        vc = packed.module.config
        _, cu_windows = get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        windows = set(cu_windows.diff().tolist())
        n_full = len(vc.fullatt_block_indexes)
        assert n_packed == n_full * len(full) + (depth - n_full) * len(windows)
    else:
        assert n_packed == depth * len(full)


def test_encode_in_steps_equals_one_call_with_batched_attention(towers):
    packed, _ = towers["qwen2_5_vl"]
    pixels, grid = _videos(packed, [(5, 10, 14)], seed=2)[0]
    whole = packed.encode_many([(pixels, grid)])[0]
    packed.max_steps, before = 2, packed.max_steps
    try:
        assert torch.equal(packed.encode(pixels, grid), whole)
    finally:
        packed.max_steps = before


def test_a_batched_attention_that_does_not_match_keeps_the_stock_path(monkeypatch, caplog):
    path, vc = _checkpoint("qwen2_5_vl")
    outputs = iter([torch.zeros(3, 4), torch.ones(3, 4)])  # stock probe, then a "packed" probe that differs
    monkeypatch.setattr(vision, "_probe_outputs", lambda module, pixels, grid: next(outputs))
    with caplog.at_level(logging.WARNING, logger="vllm.dtd_plugin"):
        tower = vision.VisionTower.load(SPECS["qwen2_5_vl"], str(path), vc, torch.float32)
    assert tower.attention == "sdpa" and "keeping transformers' per-window sdpa loop" in caplog.text
    assert all(
        m.config._attn_implementation == "sdpa"
        for m in tower.module.modules()
        if type(m).__name__.endswith("Attention")
    )


def test_an_explicit_attention_implementation_is_left_alone():
    path, vc = _checkpoint("qwen2_5_vl")
    vc = vc.__class__.from_dict(vc.to_dict())
    vc._attn_implementation = "eager"
    tower = vision.VisionTower.load(SPECS["qwen2_5_vl"], str(path), vc, torch.float32)
    assert tower.attention == "eager"


def test_packed_attention_without_sequences_is_plain_sdpa():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, _ = vision.packed_attention(SimpleNamespace(is_causal=False), q, k, v, scaling=8**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=8**-0.5).transpose(1, 2)
    assert torch.allclose(out, ref)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)  # two sequences: attention within each only
    out, _ = vision.packed_attention(SimpleNamespace(), q, k, v, scaling=8**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    parts = [
        torch.nn.functional.scaled_dot_product_attention(*(t[:, :, a:b] for t in (q, k, v)), scale=8**-0.5)
        for a, b in ((0, 3), (3, 5))
    ]
    assert torch.equal(out, torch.cat(parts, dim=2).transpose(1, 2))
