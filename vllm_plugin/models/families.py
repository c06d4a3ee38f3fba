"""Model families: one :class:`FamilySpec` per family, declared and registered by the family's own
module (``vllm_plugin/models/<name>.py``, the family's one canonical name); everything else asks
this registry: vLLM's registration (:func:`vllm_plugin.models.register_with_vllm`), the launcher
(stock → DTD architecture), the tiny checkpoints (``analysis/harness/tiny_model.py``), the
reference pipeline (``analysis/lib/reference.py``) and the tests.

A spec says which checkpoints the family serves (their HF architectures) and the DTD architecture
registered with vLLM for them, vLLM's classes the DTD classes are built on, the vision tower
(feature-level DTD), the patch layout, the prompt and position rules, the recipe of the family's tiny
test checkpoint, and the transformers class (and reference pipeline) its serving is held to.

Neither this module nor a family module imports vLLM: the analysis tools, the launcher and the unit
tests read specs without vLLM's start-up cost. A family's DTD classes are built from its spec the
first time they are asked for (:func:`lazy_classes`; vLLM's ``ModelRegistry`` resolves
``"<module>:<DTD architecture>"`` when it needs the model): :mod:`vllm_plugin.models.base`'s mixins
on vLLM's classes, the family's rules, the processor registered with ``MULTIMODAL_REGISTRY`` and
every override checked against the installed vLLM (:func:`build_classes`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_plugin.core import PatchLayout, video_position_span

if TYPE_CHECKING:
    from vllm_plugin.models.vision import VisionTowerSpec

DEFAULT_FAMILY = "qwen2_5_vl"  # the tiny checkpoints' default; the reference of a checkpoint no family serves
# modules of vllm_plugin.models that are not families (discovery imports every other one)
SHARED_MODULES = frozenset({"base", "vision", "families"})


class UnknownFamily(ValueError):
    """A family name no module registered."""


def load(path: str) -> Any:
    """The object a ``"module:Name"`` path names (imported now)."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)


# -- position rules ----------------------------------------------------------------------------------
# (steps, h, w, t_factor, text_tokens) -> positions one video item of steps x h x w merged tokens takes,
# with text_tokens text tokens in its placeholder, whatever DTD keeps: the processor's position check
# and the stream geometry read it (DTDMultiModalProcessorMixin._dtd_position_span)
PositionSpan = Callable[[int, int, int, float, int], int]


def mrope_span(steps: int, h: int, w: int, t_factor: float, text_tokens: int) -> int:
    """Qwen2-VL / Qwen2.5-VL: one grid, temporal position = step x ``t_factor``
    (:func:`vllm_plugin.core.video_position_span`); the text tokens take one position each."""
    return int(text_tokens) + video_position_span(steps, h, w, t_factor)


# -- the spec ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLLMClasses:
    """vLLM's classes of a family (``"module:Class"``), which its DTD classes subclass."""

    processing_info: str
    processor: str
    dummy_inputs: str
    model: str

    @classmethod
    def named(cls, module: str, stem: str) -> VLLMClasses:
        """vLLM's usual names in ``module``: ``<stem>ProcessingInfo``, ``<stem>MultiModalProcessor``,
        ``<stem>DummyInputsBuilder``, ``<stem>ForConditionalGeneration``."""
        return cls(
            f"{module}:{stem}ProcessingInfo",
            f"{module}:{stem}MultiModalProcessor",
            f"{module}:{stem}DummyInputsBuilder",
            f"{module}:{stem}ForConditionalGeneration",
        )


@dataclass(frozen=True)
class TinyContext:
    """What ``analysis/harness/tiny_model.py`` hands a family's recipe: the parts every family's tiny
    checkpoint shares (tokenizer, special tokens, the LLM's common config fields, the pixel budgets)."""

    tokenizer: Any
    token_ids: Mapping[str, int]  # special token -> id
    tokens: Mapping[str, int]  # image_token_id, video_token_id, vision_start_token_id, vision_end_token_id
    text: Mapping[str, Any]  # the text config's fields: vocab_size, max_position_embeddings, ... and the size's
    head_dim: int
    mrope_section: list[int]  # (t, h, w) split of the rotary half
    chat_template: str
    image_pixels: tuple[int, int]  # (min, max) pixels of an image
    video_pixels: tuple[int, int]  # (min, max) pixels of a frame (processors with a per-frame budget)


@dataclass(frozen=True)
class TinyRecipe:
    """How ``analysis/harness/tiny_model.py`` builds the family's tiny random-weight checkpoint.

    ``sizes``: per size name, the shape the checkpoint is made from (``text``, ``vision``,
    ``vocab_words``, more keys the family's builders read); it is part of the content hash, so a change
    makes new checkpoints. ``config(shape, context)`` → the transformers config; ``processor(shape,
    context)`` → the transformers processor. ``legacy_hash``: the checkpoints hash and are named as
    before families existed (no family in either)."""

    sizes: Mapping[str, Mapping[str, Any]]
    config: Callable[[Mapping[str, Any], TinyContext], Any]
    processor: Callable[[Mapping[str, Any], TinyContext], Any]
    legacy_hash: bool = False

    @staticmethod
    def vision_patches(patch_size: int = 14, layout: PatchLayout | None = None) -> dict[str, int]:
        """A vision config's patch geometry, under transformers' names, from the family's
        ``patch_size`` and ``patch_layout`` (default: Qwen2-VL's), so that its checkpoints agree with its spec."""
        layout = layout or PatchLayout()
        return dict(
            in_channels=layout.channels,
            patch_size=patch_size,
            spatial_merge_size=layout.merge_size,
            temporal_patch_size=layout.temporal_patch_size,
        )


@dataclass(frozen=True)
class FamilySpec:
    """Everything the plugin, the analysis tools and the tests know about one model family.

    Fields:
        name: the family's one name: its module (``vllm_plugin/models/<name>.py``), ``--family`` of the tools.
        hf_architectures: the stock architectures (``config.json``) of the checkpoints the family serves.
        dtd_architecture: the architecture registered with vLLM for them (``--hf-overrides``), also the
            name of the DTD model class.
        vllm: vLLM's classes the DTD classes subclass.
        vision_tower: transformers' vision tower for feature-level DTD in the API server (None: none).
        patch_layout: how the family's processor lays out and normalizes patches (its defaults).
        patch_size: pixels of a patch side (a token covers ``patch_size * merge_size`` pixels).
        position_span: the positions one video item spans (:data:`PositionSpan`).
        prompt_replacement: ``(processor, mask, out_item) -> token ids`` of a video's placeholder after
            DTD; None: one video token per kept token (Qwen2-VL / Qwen2.5-VL).
        model_mixins: engine-side rules put before :class:`~vllm_plugin.models.base.DTDModelMixin`
            (Qwen3-VL: its M-RoPE positions); vLLM-free classes of the family module.
        processor_requires: attributes of vLLM's processor class the family's rules call (checked when
            the classes are built).
        tiny: the tiny checkpoint's recipe (None: the family has no tiny checkpoint).
        reference_class: transformers' model class of the family (the reference and the tiny checkpoint).
        reference_pipeline: ``"module:Class"`` of the reference pipeline that holds the family's serving
            to transformers (named, never imported by the plugin).
        module: the module whose DTD classes these are (default ``vllm_plugin.models.<name>``).
    """

    name: str
    hf_architectures: tuple[str, ...]
    dtd_architecture: str
    vllm: VLLMClasses
    vision_tower: VisionTowerSpec | None
    reference_class: str
    patch_layout: PatchLayout = PatchLayout()
    patch_size: int = 14
    position_span: PositionSpan = mrope_span
    prompt_replacement: Callable[..., list[int]] | None = None
    model_mixins: tuple[type, ...] = ()
    processor_requires: tuple[str, ...] = ()
    tiny: TinyRecipe | None = None
    reference_pipeline: str = "analysis.lib.reference:ReferencePipeline"
    module: str = ""

    @classmethod
    def named(cls, name: str, stem: str, vision_tower: VisionTowerSpec | None, **fields: Any) -> FamilySpec:
        """A family named as transformers and vLLM name most: checkpoints of
        ``<stem>ForConditionalGeneration`` (also transformers' class, the reference's), the DTD
        architecture ``<stem>DTDForConditionalGeneration``, vLLM's classes :meth:`VLLMClasses.named` in
        ``vllm.model_executor.models.<name>``. ``fields``: the spec's other fields (``vllm`` too, where
        vLLM names its classes otherwise)."""
        architecture = f"{stem}ForConditionalGeneration"
        fields.setdefault("vllm", VLLMClasses.named(f"vllm.model_executor.models.{name}", stem))
        return cls(
            name=name,
            hf_architectures=(architecture,),
            dtd_architecture=f"{stem}DTDForConditionalGeneration",
            vision_tower=vision_tower,
            reference_class=architecture,
            **fields,
        )

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"a family's name is a module name, got {self.name!r}")
        if isinstance(self.hf_architectures, str) or not self.hf_architectures:
            raise ValueError(f"{self.name}: hf_architectures is a non-empty tuple of architecture names")
        if not self.module:
            object.__setattr__(self, "module", f"vllm_plugin.models.{self.name}")

    @property
    def model_class(self) -> str:
        """``"module:Class"`` of the DTD model class, as vLLM's ``ModelRegistry`` takes it."""
        return f"{self.module}:{self.dtd_architecture}"

    @property
    def token_px(self) -> int:
        """Pixels of a token's side: ``patch_size * merge_size``."""
        return self.patch_size * self.patch_layout.merge_size

    @property
    def class_names(self) -> tuple[str, str, str]:
        """Names of the DTD processing info, multimodal processor and model classes (vLLM's names
        with a ``DTD`` prefix; the model's is :attr:`dtd_architecture`)."""
        stem = self.vllm.model.partition(":")[2].removesuffix("ForConditionalGeneration")
        return f"DTD{stem}ProcessingInfo", f"DTD{stem}MultiModalProcessor", self.dtd_architecture


# -- the registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, FamilySpec] = {}
_LOCK = threading.Lock()
_discovered = False


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` (a family module does, at import). A name or an architecture another family
    already has is refused; the same module registering again (a reload) replaces its spec."""
    with _LOCK:
        old = _REGISTRY.get(spec.name)
        if old is not None and old.module != spec.module:
            raise ValueError(f"family {spec.name!r} is already registered by {old.module}")
        mine = {*spec.hf_architectures, spec.dtd_architecture}
        for other in _REGISTRY.values():
            taken = mine & {*other.hf_architectures, other.dtd_architecture}
            if other.name != spec.name and taken:
                raise ValueError(f"family {spec.name!r}: {sorted(taken)} already served by family {other.name!r}")
        _REGISTRY[spec.name] = spec
    return spec


def unregister_family(name: str) -> None:
    """Remove a family (tests that register a toy one clean up with this)."""
    with _LOCK:
        _REGISTRY.pop(name, None)
        _BUILT.pop(name, None)


def _discover() -> None:
    """Import every family module of :mod:`vllm_plugin.models` (each registers its spec), once."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("vllm_plugin.models")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in SHARED_MODULES:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def families() -> tuple[FamilySpec, ...]:
    """Every registered family, by name."""
    _discover()
    with _LOCK:
        return tuple(sorted(_REGISTRY.values(), key=lambda s: s.name))


def family_names() -> tuple[str, ...]:
    return tuple(s.name for s in families())


def get_family(name: str) -> FamilySpec:
    """The family called ``name`` (:class:`UnknownFamily`, a ``ValueError``, names the known ones)."""
    _discover()
    with _LOCK:
        spec = _REGISTRY.get(name)
    if spec is None:
        raise UnknownFamily(f"unknown model family {name!r}: one of {list(family_names())}")
    return spec


def family_for_architecture(architecture: str) -> FamilySpec | None:
    """The family serving a stock or DTD architecture name, or None."""
    for spec in families():
        if architecture in spec.hf_architectures or architecture == spec.dtd_architecture:
            return spec
    return None


# -- the DTD classes (vLLM) --------------------------------------------------------------------------

_BUILT: dict[str, tuple[FamilySpec, dict[str, type]]] = {}
_BUILD_LOCK = threading.RLock()


def build_classes(spec: FamilySpec) -> dict[str, type]:
    """Make the family's DTD classes now (imports vLLM): processing info, multimodal processor and
    model, each vLLM's class of the family with :mod:`vllm_plugin.models.base`'s mixin and the
    family's rules; the processor registered for the model with ``MULTIMODAL_REGISTRY``. Every
    override is checked against the installed vLLM (``VLLMMismatch`` names what changed). Each call
    makes new classes: :func:`vllm_classes` keeps one set per process."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig

    from vllm_plugin.entrypoints import vllm_patches
    from vllm_plugin.models.base import DTDModelMixin, DTDMultiModalProcessorMixin, DTDProcessingInfoMixin

    # fields the mixins read or replace
    vllm_patches.require(EncoderCudaGraphConfig, "modalities")
    vllm_patches.require(EncoderCudaGraphConfig, "max_frames_per_video")
    vllm_patches.require(ProcessorInputs, "hf_processor_mm_kwargs")
    vllm_patches.check_sequential_video_encoding()  # DTDModelMixin.requires_sequential_video_encoding

    info_base, processor_base, dummy_inputs, model_base = (
        load(p) for p in (spec.vllm.processing_info, spec.vllm.processor, spec.vllm.dummy_inputs, spec.vllm.model)
    )
    for name in spec.processor_requires:
        vllm_patches.require(processor_base, name)
    info_name, processor_name, model_name = spec.class_names

    def make(name: str, bases: tuple, doc: str, **attrs) -> type:
        body = {"__module__": spec.module, "__qualname__": name, "__doc__": doc, **attrs}
        return types.new_class(name, bases, exec_body=lambda ns: ns.update(body))

    info = make(info_name, (DTDProcessingInfoMixin, info_base), f"{info_base.__name__} with DTD ({spec.name}).")
    rules: dict[str, Any] = {"vision_tower": spec.vision_tower, "_dtd_position_span": staticmethod(spec.position_span)}
    if spec.prompt_replacement is not None:
        rules["_dtd_replacement"] = spec.prompt_replacement
    processor = make(
        processor_name,
        (DTDMultiModalProcessorMixin, processor_base),
        f"{processor_base.__name__} with DTD ({spec.name}).",
        **rules,
    )
    model = make(
        model_name,
        (*spec.model_mixins, DTDModelMixin, model_base),
        f"{model_base.__name__} whose video prompts carry only the tokens that survive DTD.",
    )
    model = MULTIMODAL_REGISTRY.register_processor(processor, info=info, dummy_inputs=dummy_inputs)(model)
    vllm_patches.check_overrides(info, info_base)
    vllm_patches.check_overrides(processor, processor_base)
    vllm_patches.check_overrides(model, model_base)
    return {info_name: info, processor_name: processor, model_name: model}


def vllm_classes(spec: FamilySpec) -> dict[str, type]:
    """The family's DTD classes (:func:`build_classes`), built once per process and set on the
    family's module (so that they pickle, and later lookups are plain attributes)."""
    with _BUILD_LOCK:
        built = _BUILT.get(spec.name)
        if built is None or built[0] is not spec:
            classes = build_classes(spec)
            module = sys.modules.get(spec.module)
            if module is not None:
                vars(module).update(classes)
            _BUILT[spec.name] = built = (spec, classes)
        return built[1]


def lazy_classes(spec: FamilySpec) -> Callable[[str], type]:
    """A family module's ``__getattr__``: its DTD classes (:attr:`FamilySpec.class_names`), built on
    first use; any other missing name is an ``AttributeError`` (and imports nothing)."""
    names = frozenset(spec.class_names)

    def __getattr__(name: str) -> type:
        if name not in names:
            raise AttributeError(f"module {spec.module!r} has no attribute {name!r}")
        return vllm_classes(spec)[name]

    return __getattr__
