"""Plugin pieces that need no running server: options, launcher arguments, registration."""

import json
import subprocess
import sys

import pytest

from vllm_plugin.entrypoints.options import dtd_config_from_kwargs, split_dtd_kwargs
from vllm_plugin.models.families import families
from vllm_plugin.serve import MIDDLEWARE, build_argv


def test_options_defaults_and_overrides():
    c = dtd_config_from_kwargs({})
    assert (c.enabled, c.metric, c.threshold, c.reference, c.criterion) == (True, "l1", 0.05, "previous", "pixel")
    c = dtd_config_from_kwargs({"dtd_metric": "cosine", "max_pixels": 5})
    assert c.metric == "cosine" and c.threshold == 0.98
    c = dtd_config_from_kwargs({"dtd_criterion": "feature"})  # each criterion has its own default metric and tau
    assert (c.criterion, c.metric, c.threshold) == ("feature", "cosine", 0.5)
    assert split_dtd_kwargs({"dtd_threshold": 0.1, "fps": 2}) == ({"dtd_threshold": 0.1}, {"fps": 2})


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"dtd_threshold": 2}, "dtd_threshold"),
        ({"dtd_metric": "x"}, "dtd_metric"),
        ({"dtd_reference": "x"}, "dtd_reference"),
        ({"dtd_enabled": 1}, "dtd_enabled"),
        ({"dtd_criterion": "features"}, "dtd_criterion"),
        ({"dtd_x": 1}, "dtd_x"),
    ],
)
def test_option_errors_start_with_the_field(kw, field):
    with pytest.raises(ValueError) as e:
        dtd_config_from_kwargs(kw)
    assert str(e.value).startswith(field + ":")


def test_launcher_adds_architecture_and_middleware(tiny_model_path):
    argv = build_argv(["--model", str(tiny_model_path), "--port", "1"])
    i = argv.index("--hf-overrides")
    assert json.loads(argv[i + 1]) == {"architectures": ["Qwen2_5_VLDTDForConditionalGeneration"]}
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    mine = build_argv(["--model", str(tiny_model_path), "--hf-overrides", "{}", "--middleware", MIDDLEWARE])
    assert mine.count("--hf-overrides") == 1 and mine.count(MIDDLEWARE) == 1


def test_launcher_serves_an_architecture_without_dtd_stock(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with caplog.at_level("WARNING", logger="vllm.dtd_plugin"):
        argv = build_argv(["--model", str(tmp_path)])
    assert "--hf-overrides" not in argv and MIDDLEWARE in argv
    assert "no DTD class" in caplog.text and "serving it stock" in caplog.text
    with pytest.raises(SystemExit, match="--dtd-streams needs a model family with DTD"):
        build_argv(["--model", str(tmp_path)], streams=True)


@pytest.mark.parametrize(
    "stock, dtd", [(stock, s.dtd_architecture) for s in families() for stock in s.hf_architectures]
)
def test_launcher_picks_the_family_from_the_checkpoint(tmp_path, stock, dtd):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [stock]}))
    argv = build_argv(["--model", str(tmp_path)])
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"architectures": [dtd]}


def test_register_is_idempotent_and_entry_point_is_declared():
    code = (
        "import logging, vllm_plugin\n"
        "from importlib.metadata import entry_points\n"
        "eps = [e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'dtd']\n"
        "assert eps == ['vllm_plugin:register'], eps\n"
        "vllm_plugin.register(); vllm_plugin.register()\n"
        "from vllm import ModelRegistry\n"
        "assert 'Qwen2_5_VLDTDForConditionalGeneration' in ModelRegistry.get_supported_archs()\n"
        "from vllm.renderers import online_renderer as o\n"
        "assert not hasattr(o.validate_request_mm_kwargs, '_vllm_dtd_wrapped')  # register() patches nothing\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_stream_routes_load_only_when_allow_listed(monkeypatch):
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them: with the plugin installed, a
    server gets /v1/streams only from --dtd-streams (VLLM_PLUGINS=dtd,dtd_streams)."""
    from vllm.plugins import load_endpoint_plugins

    from vllm_plugin.streams.routes import DTDStreamPlugin

    for value, loaded in ((None, False), ("dtd", False), ("", False), ("dtd,dtd_streams", True)):
        if value is None:
            monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("VLLM_PLUGINS", value)
        plugins = load_endpoint_plugins(("generate",))
        assert any(isinstance(p, DTDStreamPlugin) for p in plugins) is loaded, value


def test_launcher_refuses_dtd_options_for_an_architecture_without_dtd(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SystemExit, match="sets DTD options"):
        build_argv(["--model", str(tmp_path), "--mm-processor-kwargs", '{"dtd_threshold": 0.1}'])


def test_the_launcher_sizes_the_cpu_kv_cache_only_when_none_is_given(tmp_path):
    from vllm_plugin.serve import cpu_kv_cache

    (tmp_path / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    argv = ["--model", str(tmp_path), "--dtype", "float32"]
    free = 10 << 30
    out, message = cpu_kv_cache(argv, {}, free, on_cpu=True)
    size = int(out[out.index("--kv-cache-memory-bytes") + 1])
    assert size == 4 << 30 and out[: len(argv)] == argv  # half of (10 GiB - 2 MiB), whole GiB
    assert "KV cache 4 GiB" in message and "VLLM_CPU_KVCACHE_SPACE" in message
    assert cpu_kv_cache(argv, {}, 1 << 30, on_cpu=True)[0][-1] == str(1 << 30)  # at least 1 GiB
    for given_argv, env in (
        (argv, {"VLLM_CPU_KVCACHE_SPACE": "2"}),
        ([*argv, "--gpu-memory-utilization", "0.3"], {}),
        ([*argv, "--gpu-memory-utilization=0.3"], {}),
        ([*argv, "--kv-cache-memory-bytes", "123"], {}),
    ):
        assert cpu_kv_cache(given_argv, env, free, on_cpu=True) == (given_argv, None)
    assert cpu_kv_cache(argv, {}, free, on_cpu=False) == (argv, None)  # a GPU: vLLM's own sizing
