"""EVERY place the plugin reaches into vLLM beyond its public extension points, in one module.

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

No public extension point serves these (see the README's "vLLM internals" table).
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

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


def require(owner, name: str, params: Optional[list[str]] = None, returns: Optional[str] = None) -> object:
    """``owner.name``, checked: present, with exactly these parameter names (if given) and a return
    annotation of the container shape ``returns`` (if given, e.g. ``"tuple[list, list]"``). Raises
    :class:`VLLMMismatch` otherwise."""
    where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name}"
    fields = getattr(owner, "__dataclass_fields__", {})
    if not hasattr(owner, name) and name not in fields:
        raise VLLMMismatch(f"vllm_plugin was written for vLLM 0.32 and relies on {where}, which vLLM {_vllm_version()} does not have")
    target = getattr(owner, name, None)
    if params is not None and (got := _params(target)) != params:
        raise VLLMMismatch(f"vllm_plugin was written for vLLM 0.32: {where} takes {params}, "
                           f"in vLLM {_vllm_version()} it takes {got}")
    if returns is not None:
        try:  # a module with postponed annotations gives strings: resolve them
            ann = inspect.signature(target, eval_str=True).return_annotation
        except Exception:
            ann = inspect.signature(target).return_annotation
        if _shape(ann) != returns:
            raise VLLMMismatch(f"vllm_plugin was written for vLLM 0.32: {where} returns {returns}, "
                               f"in vLLM {_vllm_version()} it returns {ann}")
    return target


def require_read(module: str, attribute: str) -> None:
    """vLLM module ``module`` still reads ``attribute`` (for class attributes vLLM looks up with
    ``hasattr``/``getattr``: a rename there would silently ignore ours). Reads the source, without
    importing the module (a GPU runner may not import on this machine)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    source = open(spec.origin, encoding="utf-8").read() if spec and spec.origin else ""
    if attribute not in source:
        raise VLLMMismatch(f"vllm_plugin was written for vLLM 0.32, where {module} reads {attribute!r}; "
                           f"vLLM {_vllm_version()} does not")


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


def in_api_server_process() -> bool:
    """vLLM's API server runs in the main process (one API server), in processes named
    ``ApiServer_<i>`` (``--api-server-count``, vllm/v1/utils.py) or ``APIServer_DPRank_<r>`` (the
    data-parallel supervisor, vllm/entrypoints/launchers/dp_supervisor.py); engine cores are
    ``EngineCore*``, workers ``VllmWorker*``."""
    name = multiprocessing.current_process().name
    return name == "MainProcess" or name.lower().startswith("apiserver")


# -- the run-time patches --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    name: str  # "<vllm module>:<attribute path>"
    why: str
    install: Callable[[], None]


def _wrap_validate(original):
    from vllm.exceptions import VLLMValidationError

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
            except ValueError as e:
                field = str(e).split(":", 1)[0]
                raise VLLMValidationError(f"mm_processor_kwargs.{e}", parameter=f"mm_processor_kwargs.{field}") from None
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

    fn = require(online_renderer, "validate_request_mm_kwargs",
                 ["mm_processor_kwargs", "media_io_kwargs", "trust_request_mm_kwargs"])
    if not getattr(fn, _MARK, False):
        online_renderer.validate_request_mm_kwargs = _wrap_validate(fn)


def _video_hashes(engine_inputs) -> list[str]:
    out = []
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
        R.preprocess_chat = _wrap_preprocess(chat, lambda r: r[1])
    if not getattr(cmpl, _MARK, False):
        R.preprocess_cmpl = _wrap_preprocess(cmpl, lambda r: r)


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
            return video_loader.tag_for_hash(original(self, *args, **kwargs)) if outer else original(self, *args, **kwargs)
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
    Patch("vllm.renderers.online_renderer:validate_request_mm_kwargs",
          "let validated dtd_* request keys through without --trust-request-mm-kwargs", _install_validate),
    Patch("vllm.renderers.online_renderer:OnlineRenderer.preprocess_chat/preprocess_cmpl",
          "file the DTD stats of the request's videos (x-dtd-stats header, log, counters)", _install_preprocess),
    Patch("vllm.multimodal.media.video:VideoMediaIO.load_bytes/load_base64/load_file",
          "unusable videos become HTTP 400 instead of 500", _install_media_io),
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
