"""The served dtype and its tolerances (analysis/harness/server.py ``served_dtype``,
analysis/harness/checks.py ``tolerances``), without a server: float32 here, bf16 where CUDA serves."""

from types import SimpleNamespace

import pytest
import torch

from analysis.harness import server
from analysis.harness.checks import (
    TOLERANCES,
    assert_rows_close,
    assert_same_greedy,
    assert_same_kept,
    assert_same_mask,
    assert_same_tokens,
    assert_same_top_logprobs,
    near_threshold_per_step,
    tolerances,
)
from vllm_plugin.core import DTDConfig, mask_digest


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(server.DTYPE_ENV, raising=False)
    monkeypatch.delenv(server.EAGER_ENV, raising=False)


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setenv(server.DTYPE_ENV, "bfloat16")


def test_served_dtype_is_float32_here_and_bf16_with_cuda(no_env, monkeypatch):
    assert not torch.cuda.is_available()
    assert server.served_dtype() == "float32" and server.served_torch_dtype() is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(server, "_vllm_cpu_build", lambda: False)
    assert server.served_dtype() == "bfloat16" and server.served_torch_dtype() is torch.bfloat16
    monkeypatch.setattr(server, "_vllm_cpu_build", lambda: True)  # vllm-cpu serves on vLLM's CPU platform
    assert server.served_dtype() == "float32"


def test_the_installed_vllm_is_the_cpu_build_here():
    assert server._vllm_cpu_build()


@pytest.mark.parametrize(
    "value, want", [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("float32", "float32"), (" FP32 ", "float32")]
)
def test_the_environment_overrides_the_dtype(monkeypatch, value, want):
    monkeypatch.setenv(server.DTYPE_ENV, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(server, "_vllm_cpu_build", lambda: False)
    assert server.served_dtype() == want


def test_an_unknown_dtype_is_refused(monkeypatch):
    monkeypatch.setenv(server.DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match="DTD_TEST_DTYPE"):
        server.served_dtype()


def _args(tmp_path, extra=(), cpu_defaults=True):
    return server.VLLMServer("/m", list(extra), log_path=tmp_path / "log", cpu_defaults=cpu_defaults).args


def test_servers_get_the_served_dtype_on_every_platform(no_env, tmp_path, monkeypatch):
    # here: exactly the flags of before (float32 and the CPU defaults, in that order)
    args = _args(tmp_path)
    i = args.index("--dtype")
    assert args[i:] == ["--dtype", "float32", "--max-model-len", "16384", "--max-num-batched-tokens", "16384"]
    assert args.count("--dtype") == 1 and _args(tmp_path, ["--dtype", "float16"]).count("--dtype") == 1
    assert _args(tmp_path, ["--dtype=float16"]).count("--dtype") == 0
    assert _args(tmp_path, cpu_defaults=False)[i:] == ["--dtype", "float32"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(server, "_vllm_cpu_build", lambda: False)
    assert _args(tmp_path, cpu_defaults=False)[i:] == ["--dtype", "bfloat16"]


def test_the_suite_s_servers_skip_compilation_unless_their_flags_say(no_env, tmp_path, monkeypatch):
    """DTD_TEST_ENFORCE_EAGER (set by tests/conftest.py): CPU-default servers get ``--enforce-eager``; one
    whose flags name it either way keeps them, and a server without the CPU defaults (a GPU) never gets it."""
    assert "--enforce-eager" not in _args(tmp_path)  # unset: vLLM's default (compiled)
    monkeypatch.setenv(server.EAGER_ENV, "1")
    assert _args(tmp_path).count("--enforce-eager") == 1
    assert "--enforce-eager" not in _args(tmp_path, ["--no-enforce-eager"])
    assert _args(tmp_path, ["--enforce-eager"]).count("--enforce-eager") == 1
    assert "--enforce-eager" not in _args(tmp_path, cpu_defaults=False)
    monkeypatch.setenv(server.EAGER_ENV, "0")
    assert "--enforce-eager" not in _args(tmp_path)
    monkeypatch.setenv(server.EAGER_ENV, "maybe")
    with pytest.raises(ValueError, match="DTD_TEST_ENFORCE_EAGER"):
        _args(tmp_path)


def test_the_table_has_both_dtypes_and_follows_the_served_one(no_env, monkeypatch):
    assert set(TOLERANCES) == {"float32", "bfloat16"}
    f32, b16 = tolerances("float32"), tolerances(torch.bfloat16)
    assert tolerances() is f32 and f32.logprob_atol == 1e-4 and f32.exact_tokens and f32.score_atol == 0
    assert (f32.rows_rtol, f32.rows_atol) == (0, 0)
    assert b16.logprob_atol == 5e-2 and not b16.exact_tokens and b16.tie_gap == 2 * b16.logprob_atol
    monkeypatch.setenv(server.DTYPE_ENV, "bf16")
    assert tolerances() is b16
    with pytest.raises(ValueError, match="float16"):
        tolerances(torch.float16)


TOP = [{1: -1.0, 2: -1.5, 3: -2.0, 4: -3.0, 5: -4.0}, {6: -0.5, 7: -2.5, 8: -3.0, 9: -3.5, 10: -4.0}]


def _moved(top, by):
    return [{k: v + by for k, v in t.items()} for t in top]


def test_logprob_tolerance_is_the_served_dtypes(no_env, monkeypatch):
    assert_same_top_logprobs(TOP, _moved(TOP, 9e-5))
    with pytest.raises(AssertionError):
        assert_same_top_logprobs(TOP, _moved(TOP, 2e-4))  # float32: 1e-4
    monkeypatch.setenv(server.DTYPE_ENV, "bfloat16")
    assert_same_top_logprobs(TOP, _moved(TOP, 4e-2))
    with pytest.raises(AssertionError):
        assert_same_top_logprobs(TOP, _moved(TOP, 6e-2))
    # a token may leave one top-5 only when it ties with the 5th (within the tolerance)
    other = [dict(TOP[0]), TOP[1]]
    del other[0][5]
    other[0][11] = -4.03
    assert_same_top_logprobs(TOP, other)
    other[0].pop(11)
    other[0][12] = -3.5
    with pytest.raises(AssertionError):
        assert_same_top_logprobs(TOP, other)


def test_float32_greedy_is_exact(no_env):
    assert assert_same_greedy([1, 6], TOP, [1, 6], _moved(TOP, 5e-5)) is None
    with pytest.raises(AssertionError):
        assert_same_greedy([1, 6], TOP, [1, 7], TOP)
    with pytest.raises(AssertionError):
        assert_same_greedy([1], TOP[:1], [1, 6], TOP)
    assert assert_same_tokens([1, 6], [1, 6], TOP) is None
    with pytest.raises(AssertionError):
        assert_same_tokens([1, 6], [1, 7], TOP)


def test_bf16_greedy_may_part_at_a_near_tie_only(bf16):
    near = [{1: -1.0, 2: -1.05, 3: -2.0}, {6: -0.5, 7: -2.5}]  # step 0: top-2 gap 0.05 <= 0.1
    served = [{2: -1.02, 1: -1.03, 3: -2.0}, {9: -0.1, 7: -3.0}]  # picked 2, then another context
    assert assert_same_greedy([2, 9], served, [1, 6], near) == 0
    assert assert_same_tokens([2, 9], [1, 6], near) == 0
    assert assert_same_greedy([1, 6], TOP, [1, 6], _moved(TOP, 3e-2)) is None
    with pytest.raises(AssertionError, match="near tie"):
        assert_same_greedy([1, 7], TOP, [1, 6], TOP)  # step 1's gap is 2.0
    with pytest.raises(AssertionError, match="near tie"):
        assert_same_tokens([1, 7], [1, 6], TOP)
    with pytest.raises(AssertionError):  # up to the divergence, logprobs still within the tolerance
        assert_same_greedy([2, 9], [{2: -1.02, 1: -1.2, 3: -2.0}, {}], [1, 6], near)
    with pytest.raises(AssertionError, match="stopped"):
        assert_same_greedy([1], TOP[:1], [1, 6], TOP)


def test_rows_bit_equal_in_float32_close_in_bf16(no_env, monkeypatch):
    a = torch.randn(8, 16)
    assert_rows_close(a, a.clone())
    with pytest.raises(AssertionError):
        assert_rows_close(a, a + 1e-6)
    monkeypatch.setenv(server.DTYPE_ENV, "bfloat16")
    assert_rows_close(a, a.to(torch.bfloat16).float())
    with pytest.raises(AssertionError):
        assert_rows_close(a, a + 1.0)


def _feature_case(threshold=0.9):
    """Tokens (T=3, 1, 2, C=2) whose cosine scores against the previous step are known, and a
    ``prepared`` / ``reference`` pair as the serving checks read them."""
    tokens = torch.tensor(
        [
            [[[1.0, 0.0], [1.0, 0.0]]],
            [[[1.0, 0.0], [0.9, 0.436]]],  # cos 1.0 (dropped), ~0.9 (near the threshold)
            [[[0.0, 1.0], [0.9, 0.436]]],
        ]
    )  # cos 0 (kept), 1.0 (dropped)
    cfg = DTDConfig(criterion="feature", metric="cosine", threshold=threshold)
    from vllm_plugin.core import dtd_keep_mask

    mask = dtd_keep_mask(tokens, cfg.threshold, cfg.metric)
    video = SimpleNamespace(llm_grid=(3, 1, 2))
    prepared = SimpleNamespace(mask=mask, video=video)
    reference = SimpleNamespace(video_embeddings=lambda v: tokens.reshape(6, 2))
    return tokens, cfg, prepared, reference


def test_feature_masks_may_differ_in_near_threshold_tokens_in_bf16_only(no_env, monkeypatch):
    tokens, cfg, prepared, reference = _feature_case()
    want = prepared.mask.flatten(1).sum(1).tolist()
    assert near_threshold_per_step(tokens, cfg, tolerances("bfloat16")) == [0, 1, 0]
    assert near_threshold_per_step(tokens, cfg, tolerances("float32")) == [0, 0, 0]
    flipped = [want[0], want[1] + (1 if want[1] < 2 else -1), want[2]]
    assert assert_same_kept(want, reference, prepared, cfg)
    with pytest.raises(AssertionError):
        assert_same_kept(flipped, reference, prepared, cfg)  # float32: equal only
    stats = {"mask_sha256": mask_digest(prepared.mask), "kept_per_step": want}
    assert assert_same_mask(stats, reference, prepared, cfg)
    with pytest.raises(AssertionError):
        assert_same_mask({"mask_sha256": "0" * 64, "kept_per_step": flipped}, reference, prepared, cfg)
    monkeypatch.setenv(server.DTYPE_ENV, "bfloat16")
    assert not assert_same_kept(flipped, reference, prepared, cfg)
    assert not assert_same_mask({"mask_sha256": "0" * 64, "kept_per_step": flipped}, reference, prepared, cfg)
    with pytest.raises(AssertionError):  # step 2 has no near-threshold token
        assert_same_kept([want[0], want[1], want[2] + 1], reference, prepared, cfg)
    with pytest.raises(AssertionError):  # pixel-level masks stay exact at any dtype
        assert_same_mask({"mask_sha256": "0" * 64, "kept_per_step": flipped}, reference, prepared, DTDConfig())


def test_served_references_are_the_float32_references_here(
    served_reference, reference, served_qwen3_reference, qwen3_reference
):
    """The serving tests' reference pipelines run at the served dtype: float32 here (the fixtures the
    unit tests use), bf16 on CUDA (tests/conftest.py ``served_reference``)."""
    assert served_reference is reference and next(reference.model.parameters()).dtype is torch.float32
    assert served_qwen3_reference is qwen3_reference and next(qwen3_reference.model.parameters()).dtype is torch.float32
