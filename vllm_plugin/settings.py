"""Every environment variable (and server option) the plugin and its workbench read: one table.

As vLLM's ``vllm/envs.py``: :data:`SETTINGS` names each one with its type, default, where it
applies and one line of help; the code reads them here, at use (never cached at import unless the
module that asks holds the value for the process's life, e.g. the decode slots)::

    from vllm_plugin import settings

    settings.get("DTD_MAX_VIDEO_TOKENS")          # os.environ, parsed, or the default
    settings.get("DTD_MAX_VIDEO_TOKENS", env)     # another mapping (tests, a child's environment)
    settings.DTD_MAX_VIDEO_TOKENS                 # the same as get(name)

One convention: a variable that is unset or blank has its default; otherwise one parser per type
(:func:`parse_int`, :func:`parse_float`, :func:`parse_bool`, :func:`parse_str`, :func:`parse_list`)
reads it, and a value it cannot take raises :class:`SettingsError` (a ``ValueError``) naming the
variable and the value. All names carry the ``DTD_`` prefix (vLLM warns about unknown ``VLLM_*``
names and refuses them under ``--fail-on-environ-validation``); vLLM's own variables (``VLLM_*``)
are vLLM's and are read where they are used.

    python -m vllm_plugin.settings      # the table of docs/serving.md (:func:`markdown_table`)

This module imports nothing but the standard library: every process may read it cheaply.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "DTD_"
REMOVED_PREFIX = "VLLM_DTD_"  # release 0.1's names: refused at start (check), never read

# where a setting applies (the process that reads it)
LAUNCHER = "launcher"  # python -m vllm_plugin.serve, and vLLM's process that starts the API servers
API_SERVER = "API server"  # each vLLM API-server process (request processing, streams, towers)
ENGINE = "engine"  # vLLM's engine core / GPU workers
TOOLS = "tools"  # analysis/ (tests, benchmarks, CLIs)
NOTEBOOKS = "notebooks"  # notebooks/

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting given a value it cannot take. ``name``: the variable; ``value``: what it was given."""

    def __init__(self, name: str, value: str, message: str):
        super().__init__(message)
        self.name = name
        self.value = value


# -- the parsers: one per type ----------------------------------------------------------------------------


def _at_least(minimum: float | None) -> str:
    return "" if minimum is None else f" >= {minimum:g}"


def parse_int(name: str, raw: str, minimum: int | None = None) -> int:
    """An integer (``minimum`` and above when given)."""
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum):
        raise SettingsError(name, raw, f"{name} must be an integer{_at_least(minimum)}, got {raw!r}")
    return value


def parse_float(name: str, raw: str, minimum: float | None = None) -> float:
    """A number, not NaN (``minimum`` and above when given)."""
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if math.isnan(value) or (minimum is not None and value < minimum):
        raise SettingsError(name, raw, f"{name} must be a number{_at_least(minimum)}, got {raw!r}")
    return value


def parse_bool(name: str, raw: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case)."""
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise SettingsError(name, raw, f"{name} must be one of {'/'.join(TRUE)} or {'/'.join(FALSE)}, got {raw!r}")


def parse_str(name: str, raw: str, choices: tuple[str, ...] = (), aliases: Mapping[str, str] | None = None) -> str:
    """The value, stripped; with ``choices``: one of them (any case, ``aliases`` spelled their way)."""
    value = raw.strip()
    if not choices:
        return value
    key = value.lower()
    key = (aliases or {}).get(key, key)
    if key not in choices:
        raise SettingsError(name, raw, f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return key


def parse_list(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated names, stripped, blanks and repeats left out; at least one."""
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise SettingsError(
            name, raw, f"{name}={raw!r} names nothing: give comma-separated names, or unset it for the default"
        )
    return names


# -- the table ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One environment variable (or, named ``--...``, one option of ``python -m vllm_plugin.serve``)."""

    name: str
    type: type  # int, float, bool, str or list (read as a tuple of names)
    default: Any  # None: unset, the code decides (``shown`` says what)
    help: str
    where: tuple[str, ...]
    minimum: float | None = None  # int / float
    choices: tuple[str, ...] = ()  # str
    aliases: Mapping[str, str] = field(default_factory=dict)  # str: other spellings of a choice
    shown: str | None = None  # the default as the table shows it, when not the value itself

    @property
    def is_option(self) -> bool:
        return self.name.startswith("--")

    def parse(self, raw: str) -> Any:
        if self.type is int:
            return parse_int(self.name, raw, None if self.minimum is None else int(self.minimum))
        if self.type is float:
            return parse_float(self.name, raw, self.minimum)
        if self.type is bool:
            return parse_bool(self.name, raw)
        if self.type is list:
            return parse_list(self.name, raw)
        return parse_str(self.name, raw, self.choices, self.aliases)


MiB, GiB = 1 << 20, 1 << 30
_API = (API_SERVER,)


def _stream(
    field_name: str, type_: type, default, help_: str, shown: str | None = None, where: tuple[str, ...] = _API
) -> Setting:
    """A stream limit: ``DTD_STREAM_<FIELD>`` of :class:`vllm_plugin.streams.session.Limits`."""
    return Setting(
        f"DTD_STREAM_{field_name}", type_, default, help_, where, minimum=1 if type_ is int else 0, shown=shown
    )


_TABLE: tuple[Setting, ...] = (
    # -- the launcher and every vLLM process
    Setting(
        "--dtd-streams",
        bool,
        False,
        "option of `python -m vllm_plugin.serve`: serve the stream routes "
        "(`/v1/streams`; sets `VLLM_PLUGINS=dtd,dtd_streams` and `--limit-mm-per-prompt` from "
        "`DTD_STREAM_MAX_CHUNKS`)",
        (LAUNCHER,),
    ),
    Setting(
        "DTD_ALLOW_ANY_VLLM",
        bool,
        False,
        "run on a vLLM other than the supported release (one warning per "
        "process; hooks vLLM renamed still fail with `VLLMMismatch`)",
        (LAUNCHER, API_SERVER, ENGINE),
    ),
    # -- requests and videos
    Setting(
        "DTD_MAX_VIDEO_TOKENS",
        int,
        131072,
        "tokens of one video item before DTD; more is a 400 naming the "
        "limit (131,072: 1,024 frames of 448², ~10 min at 2 fps)",
        _API,
        minimum=1,
    ),
    Setting(
        "DTD_ENCODER_GROUP_TOKENS",
        int,
        None,
        "merged tokens of one vision-tower call in the engine, when "
        "smaller than vLLM's encoder budget (the tests make groups small)",
        (ENGINE,),
        minimum=1,
        shown="vLLM's encoder budget",
    ),
    Setting(
        "DTD_VIDEO_CODECS",
        list,
        None,
        "video codecs client bytes may use: comma-separated FFmpeg decoder "
        "names (`ffmpeg -decoders`), e.g. `h264,hevc,vp9,av1`; a name this FFmpeg lacks stops the server "
        "at start",
        (API_SERVER, TOOLS),
        shown="the common camera / screen / web codecs this FFmpeg has",
    ),
    Setting(
        "DTD_VIDEO_DECODE_CONCURRENCY",
        int,
        None,
        "video decodes at once per API-server process, the rest wait (read once, at start)",
        _API,
        minimum=1,
        shown="the CPUs this process may use",
    ),
    Setting(
        "DTD_FAST_VIDEO_LOADER",
        bool,
        True,
        "`0`: the plugin's `video_url` loader is not installed and "
        "vLLM's loader decodes every video (behind the same guards)",
        _API,
    ),
    # -- feature-level DTD: the vision tower in the API server
    Setting(
        "DTD_FEATURE_ENCODER",
        str,
        "api",
        "`api`: a vision tower in each API-server process for "
        "`dtd_criterion: feature`; `off`: none (feature requests get a 400)",
        _API,
        choices=("api", "off"),
    ),
    Setting(
        "DTD_FEATURE_ENCODER_DEVICE",
        str,
        None,
        "the tower's torch device, e.g. `cuda:1`",
        _API,
        shown="`cuda` when there is a GPU, else `cpu`",
    ),
    Setting(
        "DTD_FEATURE_ENCODER_MAX_STEPS",
        int,
        16,
        "temporal steps of one tower call (bounds its activation memory; the rows are the same)",
        _API,
        minimum=1,
    ),
    Setting(
        "DTD_FEATURE_ENCODER_RETRY_S",
        float,
        30.0,
        "seconds a failed tower load is answered with a 400 at once before the next try (`0`: every request tries)",
        _API,
        minimum=0,
    ),
    Setting(
        "DTD_FEATURE_ENCODER_MEMORY_CHECK",
        bool,
        True,
        "check that a CUDA tower fits `--mm-ipc-gpu-memory-gb`; "
        "`off` / `0`: no check (the towers have a GPU of their own)",
        _API,
    ),
    Setting(
        "DTD_FEATURE_ENCODER_STEP_PATCHES",
        int,
        None,
        "patches of one temporal step that the tower's memory estimate assumes",
        _API,
        minimum=1,
        shown="the processor's pixel cap / patch area",
    ),
    # -- streams: the limits (over one: 404 / 409 / 413 / 429 with a message naming it)
    _stream("MAX_STREAMS", int, 16, "open streams of the server (429 beyond)"),
    _stream(
        "MAX_FRAMES",
        int,
        7200,
        "frames a stream holds (frames a re-anchor freed do not count): over it "
        "429 + `Retry-After` while an eager stream's frames wait for prefill, 409 for a lazy stream; an append "
        "of more than half of it 413",
    ),
    _stream("MAX_BYTES", int, 4 * GiB, "decoded frame bytes (and kept encoder outputs) a stream holds", "4 GiB"),
    _stream(
        "MAX_CHUNKS",
        int,
        1000,
        "video items in a stream's conversation (a stream re-anchors before); "
        "the launcher sets `--limit-mm-per-prompt` to it",
        where=(LAUNCHER, API_SERVER),
    ),
    _stream("IDLE_SECONDS", float, 600.0, "a stream idle this long is freed (checked every min(30 s, idle/4))"),
    _stream("MAX_UPLOAD_BYTES", int, 64 * MiB, "one append request (413)", "64 MiB"),
    _stream("MAX_FRAMES_PER_APPEND", int, 256, "frames kept from one append, sampled at the stream's fps (413)"),
    _stream("MAX_APPENDS_PER_SECOND", float, 50.0, "appends per stream per second (429)"),
    _stream("MAX_EVENTS", int, 1024, "events a stream keeps for `/events` (older ones go, indices go on)"),
    _stream(
        "MAX_FRAME_PIXELS",
        int,
        4096 * 4096,
        "pixels of one uploaded image or video frame, read from its header before decoding (413)",
        "4096²",
    ),
    _stream(
        "MAX_DECODED_PIXELS",
        int,
        2**28,
        "pixels all frames of one video upload decode to, sampled or not, "
        "checked before decoding and counted while decoding (413)",
        "2²⁸, ≈ 129 frames of 1080p",
    ),
    _stream("MAX_TOTAL_BYTES", int, 8 * GiB, "decoded frame bytes held by all streams of the server (429)", "8 GiB"),
    _stream(
        "MAX_PENDING_ENCODE_STEPS",
        int,
        256,
        "temporal steps of feature streams waiting for the vision tower, per server (429 + `Retry-After`)",
    ),
    _stream("MAX_CHUNK_FRAMES", int, 64, "frames of one video item a stream sends (a request's encoder work)"),
    _stream("MAX_CHUNK_BYTES", int, 64 * MiB, "decoded bytes of one video item a stream sends", "64 MiB"),
    _stream(
        "ENGINE_TIMEOUT_S",
        float,
        300.0,
        "a stream request the engine gives no output for this long is aborted and answered 503 "
        "(an engine node lost under data parallelism: vLLM does not notice a dead remote rank); 0: none",
    ),
    Setting(
        "DTD_STREAM_REALTIME",
        bool,
        True,
        "with `--dtd-streams`: serve streams on OpenAI's Realtime API at `/v1/realtime` (WebSocket); "
        "`0`: not (a server where vLLM's own `/v1/realtime` serves a speech model: the plugin refuses "
        "to start while both would claim the path)",
        _API,
    ),
    Setting(
        "DTD_STREAM_SOCKET_DIR",
        str,
        None,
        "private directory of the API-server processes' peer sockets; "
        "set by the plugin in the process that starts them (not for users)",
        (LAUNCHER, API_SERVER),
        shown="a fresh `mkdtemp` directory",
    ),
    # -- the workbench: tests, tools and notebooks
    Setting(
        "DTD_TEST_DTYPE",
        str,
        None,
        "the dtype the harness serves at and the serving tests compare at (`bf16`, `fp32` accepted)",
        (TOOLS,),
        choices=("float32", "bfloat16"),
        aliases={"fp32": "float32", "float": "float32", "bf16": "bfloat16"},
        shown="`float32` on vLLM's CPU platform, `bfloat16` with CUDA",
    ),
    Setting(
        "DTD_TEST_ENFORCE_EAGER",
        bool,
        False,
        "servers the harness starts with its CPU defaults skip vLLM's compilation (`--enforce-eager`: "
        "~10-15 s less per start on 2 cores) unless their flags say `--enforce-eager` or `--no-enforce-eager`; "
        "the test suite sets it (its main servers pass `--no-enforce-eager`: the compiled path stays tested)",
        (TOOLS,),
    ),
    Setting(
        "DTD_CACHE_DIR",
        str,
        None,
        "where the tiny test checkpoints are built and cached",
        (TOOLS,),
        shown="the repository's `.cache`",
    ),
    Setting(
        "DTD_RESULTS_DIR",
        str,
        None,
        "where tools write, as `<dir>/<tool>` (the tests point it at a temporary directory)",
        (TOOLS, NOTEBOOKS),
        shown="`results/` of the working directory",
    ),
    Setting(
        "DTD_SERVER_URL",
        str,
        "http://127.0.0.1:8000",
        "the server notebooks 03 and 04 use; when nothing "
        "answers there they start an embedded one on the tiny checkpoint",
        (NOTEBOOKS,),
    ),
    Setting(
        "DTD_VIDEO_URL",
        str,
        None,
        "the video notebook 03 sends, as the server sees it",
        (NOTEBOOKS,),
        shown="`file://` of the bundled clip",
    ),
    Setting(
        "DTD_EVAL_DATA",
        str,
        None,
        "notebook 04: a benchmark's question file (with `DTD_EVAL_VIDEOS`)",
        (NOTEBOOKS,),
        shown="a small set on the bundled clips",
    ),
    Setting(
        "DTD_EVAL_FORMAT",
        str,
        "streamingbench",
        "notebook 04: the format of `DTD_EVAL_DATA`",
        (NOTEBOOKS,),
        choices=("streamingbench", "ovobench"),
    ),
    Setting(
        "DTD_EVAL_VIDEOS",
        str,
        None,
        "notebook 04: the directory of the benchmark's videos",
        (NOTEBOOKS,),
        shown="the bundled clips",
    ),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}


def get(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The value of environment variable ``name`` in ``env`` (default ``os.environ``, read now): its
    parsed value, or its default when unset or blank. Raises :class:`SettingsError` for a value it
    cannot take, KeyError for a name not in :data:`SETTINGS`."""
    setting = SETTINGS.get(name)
    if setting is None or setting.is_option:
        raise KeyError(f"{name!r} is not an environment variable of vllm_plugin.settings")
    raw = (os.environ if env is None else env).get(name)
    if raw is None or not raw.strip():
        return setting.default
    return setting.parse(raw)


def check(where: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read every variable (of those read in ``where``, e.g. :data:`API_SERVER`) now: a process calls
    it at start, so that a bad value fails there and not at the first request that reads it.
    Returns name -> value; raises :class:`SettingsError` for the first bad one, or for a variable of
    release 0.1 (``VLLM_DTD_*``) that is still set: it is no longer read, and a deployment relying on it
    would otherwise run on defaults without a word."""
    source = os.environ if env is None else env
    stale = sorted(k for k in source if k.startswith(REMOVED_PREFIX))
    if stale:
        raise SettingsError(
            stale[0],
            str(source[stale[0]]),
            f"{stale[0]} is no longer read (release 0.1's name): use {PREFIX}{stale[0][len(REMOVED_PREFIX) :]} "
            f"(for VLLM_DTD_CACHE: {PREFIX}CACHE_DIR)",
        )
    return {s.name: get(s.name, env) for s in _TABLE if not s.is_option and (where is None or where in s.where)}


def __getattr__(name: str) -> Any:  # settings.DTD_X: read at each access, as vLLM's envs
    if name.startswith(PREFIX) and name in SETTINGS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {n for n in SETTINGS if n.startswith(PREFIX)})


# -- the table of docs/serving.md -------------------------------------------------------------------------


def _default(s: Setting) -> str:
    if s.default is None:
        return s.shown or "unset"
    if s.type is bool:
        value = ("on" if s.default else "off") if s.is_option else str(int(s.default))
    elif s.type is float:
        value = f"{s.default:g}"
    else:
        value = str(s.default)
    return f"`{value}`" + (f" ({s.shown})" if s.shown else "")


def _type(s: Setting) -> str:
    if s.choices:
        return " \\| ".join(f"`{c}`" for c in s.choices)
    if s.is_option:
        return "flag"
    return {int: "integer", float: "number", bool: "bool", list: "list", str: "text"}[s.type] + _at_least(s.minimum)


def markdown_table() -> str:
    """The table of every setting, in Markdown (docs/serving.md has it between ``<!-- settings:begin -->``
    and ``<!-- settings:end -->``; ``python -m vllm_plugin.settings`` prints it)."""
    lines = [
        "Generated from `vllm_plugin/settings.py` (`python -m vllm_plugin.settings`). Unset or blank: the "
        "default. A bool is `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`; a list is comma-separated. A "
        "value a setting cannot take is an error naming the variable; the API server checks all of its own "
        "when it starts.",
        "",
        "| setting | type | default | read by | what |",
        "|---|---|---|---|---|",
    ]
    for s in _TABLE:
        lines.append(f"| `{s.name}` | {_type(s)} | {_default(s)} | {', '.join(s.where)} | {s.help} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def readme_block() -> str:
    """The block of docs/serving.md ("Settings"): :func:`markdown_table` between its markers."""
    return f"{BEGIN}\n{markdown_table()}{END}\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
