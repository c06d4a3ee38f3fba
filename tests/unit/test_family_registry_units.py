"""The model family registry (``vllm_plugin.models.families``), without a server: the registry holds
what the family modules declare, every spec resolves to vLLM classes built from it, architectures
map to their family both ways, specs are read without vLLM, and a family registered in one place (a
toy one here) reaches vLLM's registration, the launcher, the tiny checkpoints and the reference
pipeline with no other file touched."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_plugin.models
from vllm_plugin.models import families as registry
from vllm_plugin.models.families import (
    FamilySpec,
    UnknownFamily,
    families,
    family_for_architecture,
    family_names,
    get_family,
    load,
    register_family,
    unregister_family,
)

REPO = Path(__file__).resolve().parents[2]
TOY = "toy_vl"


class ToyPipeline:
    """The toy family's reference pipeline: records how the reference lookup builds it."""

    def __init__(self, model_path, dtype, model_class=None):
        self.model_path, self.dtype, self.model_class = model_path, dtype, model_class


def _family_modules():
    """Every module of vllm_plugin.models that is not one of the shared ones, imported."""
    pkg = vllm_plugin.models
    return [
        importlib.import_module(f"{pkg.__name__}.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name not in registry.SHARED_MODULES
    ]


def test_the_registry_holds_what_the_family_modules_declare():
    modules = _family_modules()
    assert modules, "no family module found"
    declared = {m.__name__.rsplit(".", 1)[1]: m.SPEC for m in modules}
    assert set(declared) == set(family_names())
    for stem, spec in declared.items():
        assert spec.name == stem and spec.module == f"vllm_plugin.models.{stem}"
        assert get_family(stem) is spec
    # one name per family, one family per architecture
    archs = [a for s in families() for a in (*s.hf_architectures, s.dtd_architecture)]
    assert len(archs) == len(set(archs))
    with pytest.raises(UnknownFamily, match="qwen2_5_vl"):  # the error names the known families
        get_family("llava")


def test_specs_are_read_without_vllm():
    """The launcher's mapping, the tiny checkpoints' recipes and the reference lookup need no vLLM
    (only vLLM's registry, resolving a class, builds the DTD classes)."""
    code = (
        "import sys, vllm_plugin\n"
        "from vllm_plugin.models.families import families\n"
        "from analysis.harness import tiny_model\n"
        "from analysis.lib import reference\n"
        "assert vllm_plugin.DTD_ARCHITECTURES and tiny_model.FAMILIES\n"
        "for s in families():\n"
        "    tiny_model.content_hash('test', 0, s.name)\n"
        "    reference.pipeline_for(s.hf_architectures)\n"
        "import vllm_plugin.models.qwen3_vl as q\n"
        "q.step_text_lens([3, 7, 4], [1], 3, 7)\n"
        "assert not hasattr(q, 'no_such_name')\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("family", family_names())
def test_every_spec_resolves_to_classes_built_from_it(family):
    """vLLM's registry resolves the family's DTD architecture to the class its module builds: vLLM's
    class of the family with the DTD mixin and the family's rules, its processor registered."""
    import transformers
    from vllm import ModelRegistry

    import vllm_plugin
    from vllm_plugin.models.base import DTDModelMixin, DTDMultiModalProcessorMixin, DTDProcessingInfoMixin

    spec = get_family(family)
    vllm_plugin.register()
    model = ModelRegistry._try_load_model_cls(spec.dtd_architecture)
    module = importlib.import_module(spec.module)
    info_name, processor_name, model_name = spec.class_names
    assert model is load(spec.model_class) is getattr(module, model_name)
    assert model.__name__ == spec.dtd_architecture and model.__module__ == spec.module
    assert issubclass(model, load(spec.vllm.model)) and issubclass(model, DTDModelMixin)
    assert all(issubclass(model, mixin) for mixin in spec.model_mixins)
    processor, info = getattr(module, processor_name), getattr(module, info_name)
    assert issubclass(processor, load(spec.vllm.processor)) and issubclass(processor, DTDMultiModalProcessorMixin)
    assert issubclass(info, load(spec.vllm.processing_info)) and issubclass(info, DTDProcessingInfoMixin)
    factories = model.__dict__["_processor_factory"]
    assert factories.processor is processor and factories.info is info
    assert factories.dummy_inputs is load(spec.vllm.dummy_inputs)
    # the family's rules are the processor's
    assert processor.vision_tower == spec.vision_tower
    assert processor._dtd_position_span(3, 4, 5, 2.0, 7) == spec.position_span(3, 4, 5, 2.0, 7)
    if spec.prompt_replacement is not None:
        assert processor._dtd_replacement is spec.prompt_replacement
    # and the classes the spec names outside vLLM exist
    assert spec.vision_tower is None or isinstance(spec.vision_tower.load_class(), type)
    assert isinstance(getattr(transformers, spec.reference_class), type)
    assert isinstance(load(spec.reference_pipeline), type)


def test_the_classes_are_built_once_and_pickle_by_name():
    import pickle

    spec = get_family("qwen2_vl")
    module = importlib.import_module(spec.module)
    cls = getattr(module, spec.dtd_architecture)
    assert registry.vllm_classes(spec)[spec.dtd_architecture] is cls is module.__dict__[spec.dtd_architecture]
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_building_a_family_runs_the_vllm_checks(monkeypatch):
    """Every family's classes are checked against the installed vLLM when built: the runner still
    honours sequential video encoding, and every override still overrides a vLLM hook."""
    from vllm_plugin.entrypoints import vllm_patches

    class Stop(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Stop

    checked: list[tuple[type, type]] = []
    for spec in families():
        with monkeypatch.context() as m:
            m.setattr(vllm_patches, "check_sequential_video_encoding", refuse)
            with pytest.raises(Stop):
                registry.build_classes(spec)
        with monkeypatch.context() as m:
            m.setattr(vllm_patches, "check_overrides", lambda cls, base: checked.append((cls, base)))
            built = registry.build_classes(spec)
        assert (built[spec.dtd_architecture], load(spec.vllm.model)) in checked
        assert (built[spec.class_names[1]], load(spec.vllm.processor)) in checked
        assert (built[spec.class_names[0]], load(spec.vllm.processing_info)) in checked


def test_family_for_architecture_round_trips(tmp_path):
    from vllm_plugin.serve import dtd_architecture

    for spec in families():
        for arch in (*spec.hf_architectures, spec.dtd_architecture):
            assert family_for_architecture(arch) is spec
        for stock in spec.hf_architectures:
            assert vllm_plugin.models.dtd_architectures()[stock] == spec.dtd_architecture
            (tmp_path / "config.json").write_text(json.dumps({"architectures": [stock]}))
            assert dtd_architecture(str(tmp_path)) == spec.dtd_architecture  # the launcher's choice
    assert family_for_architecture("LlamaForCausalLM") is None


# -- a family added in one place -------------------------------------------------------------------


@pytest.fixture
def toy():
    """A copy of Qwen2-VL's spec under a new name and architecture (a smaller vocabulary, one size,
    its own reference pipeline), registered here only; gone afterwards."""
    base = get_family("qwen2_vl")
    spec = dataclasses.replace(
        base,
        name=TOY,
        hf_architectures=("ToyVLForConditionalGeneration",),
        dtd_architecture="ToyVLDTDForConditionalGeneration",
        module=__name__,
        reference_pipeline=f"{__name__}:ToyPipeline",
        tiny=dataclasses.replace(base.tiny, sizes={"test": {**base.tiny.sizes["test"], "vocab_words": 512}}),
    )
    yield register_family(spec)
    unregister_family(TOY)


def test_a_toy_family_reaches_vllm_the_launcher_the_tiny_checkpoints_and_the_reference(toy, tmp_path, monkeypatch):
    import torch

    import vllm_plugin
    from analysis.harness import tiny_model
    from analysis.lib.reference import reference_pipeline

    assert TOY in family_names() and get_family(TOY) is toy
    assert family_for_architecture("ToyVLForConditionalGeneration") is toy

    # vLLM's registration and the launcher
    registered = {}
    fake = type(
        "Registry",
        (),
        {
            "get_supported_archs": lambda self: set(),
            "register_model": lambda self, arch, target: registered.__setitem__(arch, target),
        },
    )()
    vllm_plugin.models.register_with_vllm(fake)
    assert registered["ToyVLDTDForConditionalGeneration"] == f"{__name__}:ToyVLDTDForConditionalGeneration"
    assert vllm_plugin.DTD_ARCHITECTURES["ToyVLForConditionalGeneration"] == "ToyVLDTDForConditionalGeneration"

    # the tiny checkpoints: its recipe, its hash and cache name, the tools' --family
    shape = tiny_model.spec_for("test", 0, TOY)
    assert shape["family"] == TOY and shape["vocab_words"] == 512
    assert tiny_model.content_hash("test", 0, TOY) != tiny_model.content_hash("test", 0, "qwen2_vl")
    with pytest.raises(ValueError, match="size must be one of"):
        tiny_model.spec_for("bench", 0, TOY)
    assert TOY in tiny_model.FAMILIES
    monkeypatch.setattr(tiny_model, "build", lambda out, **kw: Path(out))
    path = tiny_model.ensure_tiny_model("test", cache_dir=tmp_path, family=TOY)
    assert path.name == f"{TOY}-test-{tiny_model.content_hash('test', 0, TOY)[:12]}"
    ap = argparse.ArgumentParser()
    tiny_model.add_model_arguments(ap, "test")
    assert ap.parse_args(["--family", TOY]).family == TOY

    # the reference pipeline of a checkpoint whose config names the toy architecture
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ToyVLForConditionalGeneration"]}))
    pipe = reference_pipeline(tmp_path, torch.bfloat16)
    assert isinstance(pipe, ToyPipeline) and pipe.model_class == "Qwen2VLForConditionalGeneration"
    assert pipe.model_path == tmp_path and pipe.dtype == torch.bfloat16

    # the registry refuses a second family claiming its architecture, or its name from another module
    with pytest.raises(ValueError, match="already served"):
        register_family(dataclasses.replace(toy, name="toy_vl2"))
    with pytest.raises(ValueError, match="already registered"):
        register_family(dataclasses.replace(toy, module="elsewhere"))

    unregister_family(TOY)
    assert TOY not in family_names() and family_for_architecture("ToyVLForConditionalGeneration") is None
    with pytest.raises(ValueError):
        tiny_model.spec_for("test", 0, TOY)


def test_a_spec_is_checked_when_made():
    base = get_family("qwen2_vl")
    with pytest.raises(ValueError, match="module name"):
        dataclasses.replace(base, name="toy-vl", module="")
    with pytest.raises(ValueError, match="hf_architectures"):
        dataclasses.replace(base, name=TOY, hf_architectures="ToyVLForConditionalGeneration", module="")
    assert (
        FamilySpec(
            name=TOY,
            hf_architectures=("A",),
            dtd_architecture="B",
            vllm=base.vllm,
            vision_tower=None,
            reference_class="C",
        ).module
        == f"vllm_plugin.models.{TOY}"
    )
