"""vllm_plugin/settings.py: the one table of environment variables (and server options), its parsers,
and the copy of its table in docs/serving.md."""

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_plugin import settings
from vllm_plugin.settings import SETTINGS, SettingsError

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bDTD_[A-Z0-9_]+")
OPTION = re.compile(r"--dtd-[a-z0-9-]+")
VARIABLES = {n for n, s in SETTINGS.items() if not s.is_option}
OPTIONS = {n for n, s in SETTINGS.items() if s.is_option}


def _strings(source: str) -> tuple[list[str], set[str]]:
    """The string literals of a module (docstrings and f-string parts included) and the Python
    names it binds, uses or exports (``DTD_ARCHITECTURES`` is a dict, not a variable)."""
    tree = ast.parse(source)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):  # settings.DTD_X reads DTD_X; any other attribute is Python's
            (strings.append if isinstance(n.value, ast.Name) and n.value.id == "settings" else names.add)(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name for a in n.names}
        elif isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets):
            names |= {e.value for e in ast.walk(n.value) if isinstance(e, ast.Constant)}
    return strings, names


def _sources():
    """(path, source) of every module of vllm_plugin/ and analysis/ but the settings module itself,
    and of every notebook's code cells (their IPython magics left out)."""
    for root in ("vllm_plugin", "analysis"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path != REPO / "vllm_plugin" / "settings.py":
                yield path, path.read_text()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        lines = [line for cell in code for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))]
        yield path, "\n".join(lines)


def _found() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Every ``DTD_*`` name and ``--dtd-*`` option in a string literal: name -> the files that have it.
    A name that is a Python name anywhere in the code (bound, used, exported) is not a variable."""
    scanned = [(str(path.relative_to(REPO)), *_strings(source)) for path, source in _sources()]
    python_names = set().union(*(bound for _, _, bound in scanned))
    names: dict[str, set[str]] = {}
    options: dict[str, set[str]] = {}
    for where, strings, _ in scanned:
        for s in strings:
            for n in NAME.findall(s):
                if n not in python_names:
                    names.setdefault(n, set()).add(where)
            for o in OPTION.findall(s):
                options.setdefault(o, set()).add(where)
    return names, options


def _stream_limits() -> set[str]:
    """The names :meth:`Limits.from_env` builds: ``DTD_STREAM_<FIELD>``."""
    from vllm_plugin.streams.session import ENV_PREFIX, Limits

    return {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Limits)}


# ----------------------------------------------------------------------------------- the table is complete


def test_every_name_in_the_source_is_in_the_table_and_no_entry_is_stale():
    names, options = _found()
    whole = {n for n in names if not n.endswith("_")}
    prefixes = {n for n in names if n.endswith("_")}  # "DTD_STREAM_" + field
    missing = {n: sorted(names[n]) for n in whole - VARIABLES}
    assert not missing, f"read or named in the source but not in vllm_plugin/settings.py: {missing}"
    assert all(any(v.startswith(p) for v in VARIABLES) for p in prefixes), prefixes
    stale = VARIABLES - whole - _stream_limits()
    assert not stale, f"in the table but nowhere in vllm_plugin/, analysis/ or notebooks/: {sorted(stale)}"
    assert set(options) == OPTIONS, (sorted(options), sorted(OPTIONS))


def test_the_scan_sees_literals_and_not_python_names():
    strings, bound = _strings(
        '"""Set ``DTD_A``."""\nfrom m import DTD_B\nx = f"{y} DTD_C=1"\n'
        '__all__ = ["DTD_B", "DTD_D"]\nif name == "DTD_D": pass\nz = settings.DTD_E + m.DTD_F\n'
    )
    found = {n for s in strings for n in NAME.findall(s) if n not in bound}
    assert found == {"DTD_A", "DTD_C", "DTD_E"}


def test_stream_limits_have_the_dataclass_defaults_and_types():
    from vllm_plugin.streams.session import ENV_PREFIX, Limits

    for f in dataclasses.fields(Limits):
        s = SETTINGS[ENV_PREFIX + f.name.upper()]
        assert (s.type, s.default) == (type(f.default), f.default), f.name
    assert Limits.from_env({}) == Limits()


def test_choices_follow_the_code_that_uses_them():
    from analysis.eval.formats import FORMATS
    from analysis.harness.checks import TOLERANCES

    assert SETTINGS["DTD_EVAL_FORMAT"].choices == FORMATS
    assert set(SETTINGS["DTD_TEST_DTYPE"].choices) == set(TOLERANCES)


def test_entries_are_well_formed():
    places = {settings.LAUNCHER, settings.API_SERVER, settings.ENGINE, settings.TOOLS, settings.NOTEBOOKS}
    for s in SETTINGS.values():
        assert s.name.startswith("DTD_") or s.name.startswith("--dtd-"), s.name
        assert s.help and "\n" not in s.help and "|" not in s.help, s.name
        assert s.where and set(s.where) <= places, s.name
        assert s.type in (int, float, bool, str, list), s.name
        if s.default is not None:
            assert type(s.default) is s.type, s.name
            assert not s.choices or s.default in s.choices, s.name
        else:
            assert s.shown, f"{s.name}: a computed default says what it is"
        assert set(s.aliases.values()) <= set(s.choices), s.name


# ----------------------------------------------------------------------------------- reading and parsing


def test_unset_or_blank_is_the_default_and_values_parse(monkeypatch):
    for name in ("DTD_MAX_VIDEO_TOKENS", "DTD_FEATURE_ENCODER_RETRY_S", "DTD_FAST_VIDEO_LOADER", "DTD_VIDEO_CODECS"):
        monkeypatch.delenv(name, raising=False)
        assert settings.get(name) == SETTINGS[name].default
        assert settings.get(name, {name: "  "}) == SETTINGS[name].default
    assert settings.get("DTD_MAX_VIDEO_TOKENS", {"DTD_MAX_VIDEO_TOKENS": " 255 "}) == 255
    assert settings.get("DTD_FEATURE_ENCODER_RETRY_S", {"DTD_FEATURE_ENCODER_RETRY_S": "2.5"}) == 2.5
    for raw, want in [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("no", False),
        (" off ", False),
    ]:
        assert settings.get("DTD_FAST_VIDEO_LOADER", {"DTD_FAST_VIDEO_LOADER": raw}) is want, raw
    assert settings.get("DTD_VIDEO_CODECS", {"DTD_VIDEO_CODECS": " h264 , vp9,,h264 "}) == ("h264", "vp9")
    assert settings.get("DTD_TEST_DTYPE", {"DTD_TEST_DTYPE": " BF16 "}) == "bfloat16"
    assert settings.get("DTD_FEATURE_ENCODER", {"DTD_FEATURE_ENCODER": "OFF"}) == "off"
    assert settings.get("DTD_CACHE_DIR", {"DTD_CACHE_DIR": " /tmp/x "}) == "/tmp/x"


def test_read_at_use_not_at_import(monkeypatch):
    monkeypatch.setenv("DTD_FEATURE_ENCODER_MAX_STEPS", "3")
    assert settings.DTD_FEATURE_ENCODER_MAX_STEPS == 3 == settings.get("DTD_FEATURE_ENCODER_MAX_STEPS")
    monkeypatch.setenv("DTD_FEATURE_ENCODER_MAX_STEPS", "5")
    assert settings.DTD_FEATURE_ENCODER_MAX_STEPS == 5
    monkeypatch.delenv("DTD_FEATURE_ENCODER_MAX_STEPS")
    assert settings.DTD_FEATURE_ENCODER_MAX_STEPS == 16
    assert "DTD_FEATURE_ENCODER_MAX_STEPS" in dir(settings)


def test_unknown_names_and_options_are_not_read():
    with pytest.raises(KeyError, match="DTD_NO_SUCH"):
        settings.get("DTD_NO_SUCH")
    with pytest.raises(KeyError):
        settings.get("--dtd-streams")  # an option of the launcher, not a variable
    with pytest.raises(KeyError):
        settings.get("VLLM_CPU_KVCACHE_SPACE")  # vLLM's own
    with pytest.raises(AttributeError):
        settings.DTD_NO_SUCH  # noqa: B018


BAD = [
    ("DTD_MAX_VIDEO_TOKENS", "many"),
    ("DTD_MAX_VIDEO_TOKENS", "0"),
    ("DTD_MAX_VIDEO_TOKENS", "1.5"),
    ("DTD_STREAM_MAX_STREAMS", "-1"),
    ("DTD_VIDEO_DECODE_CONCURRENCY", "two"),
    ("DTD_FEATURE_ENCODER_RETRY_S", "soon"),
    ("DTD_FEATURE_ENCODER_RETRY_S", "-1"),
    ("DTD_FEATURE_ENCODER_RETRY_S", "nan"),
    ("DTD_STREAM_IDLE_SECONDS", "10m"),
    ("DTD_FAST_VIDEO_LOADER", "maybe"),
    ("DTD_ALLOW_ANY_VLLM", "2"),
    ("DTD_FEATURE_ENCODER_MEMORY_CHECK", "maybe"),
    ("DTD_FEATURE_ENCODER", "gpu"),
    ("DTD_TEST_DTYPE", "float16"),
    ("DTD_EVAL_FORMAT", "mvbench"),
    ("DTD_VIDEO_CODECS", ","),
    ("DTD_VIDEO_CODECS", " , ,"),
]


@pytest.mark.parametrize("name, raw", BAD)
def test_each_parser_refuses_a_bad_value_naming_the_variable(name, raw):
    with pytest.raises(SettingsError) as e:
        settings.get(name, {name: raw})
    assert isinstance(e.value, ValueError)
    assert (e.value.name, e.value.value) == (name, raw)
    assert name in str(e.value) and repr(raw) in str(e.value), str(e.value)


def test_every_type_has_a_bad_value_tested():
    assert {SETTINGS[n].type for n, _ in BAD} == {int, float, bool, str, list}


@pytest.mark.parametrize(
    "parse, raw",
    [
        (settings.parse_int, "x"),
        (settings.parse_float, "x"),
        (settings.parse_bool, "x"),
        (settings.parse_list, ","),
        (lambda name, raw: settings.parse_str(name, raw, ("a", "b")), "c"),
    ],
)
def test_the_parsers_themselves(parse, raw):
    with pytest.raises(SettingsError, match=f"DTD_X.*{re.escape(repr(raw))}"):
        parse("DTD_X", raw)


def test_the_modules_read_through_the_table(monkeypatch):
    """The plugin's readers raise the table's error for a bad value (one convention everywhere)."""
    from analysis.harness import server
    from analysis.lib.paths import results_dir
    from vllm_plugin.entrypoints import vllm_patches
    from vllm_plugin.media import video_codecs
    from vllm_plugin.models import base, vision

    cases = [
        ("DTD_MAX_VIDEO_TOKENS", "x", base.max_video_tokens),
        ("DTD_FEATURE_ENCODER_MAX_STEPS", "0", vision.max_steps),
        ("DTD_FEATURE_ENCODER", "on", vision.enabled),
        ("DTD_VIDEO_CODECS", ",", video_codecs),
        ("DTD_TEST_DTYPE", "fp16", server.served_dtype),
        ("DTD_ALLOW_ANY_VLLM", "perhaps", lambda: vllm_patches.check_vllm_version("0.33.0")),
    ]
    for name, raw, read in cases:
        monkeypatch.setenv(name, raw)
        with pytest.raises(SettingsError, match=name):
            read()
        monkeypatch.delenv(name)
    monkeypatch.setenv("DTD_RESULTS_DIR", "/tmp/dtd-results")
    assert results_dir("sweep") == Path("/tmp/dtd-results/sweep")


def test_check_reads_every_setting_of_a_place():
    env = {"DTD_STREAM_MAX_EVENTS": "lots"}
    with pytest.raises(SettingsError, match="DTD_STREAM_MAX_EVENTS"):
        settings.check(settings.API_SERVER, env)
    assert "DTD_STREAM_MAX_EVENTS" not in settings.check(settings.TOOLS, env)
    values = settings.check(settings.API_SERVER, {"DTD_FEATURE_ENCODER_MAX_STEPS": "4"})
    assert values["DTD_FEATURE_ENCODER_MAX_STEPS"] == 4 and values["DTD_STREAM_MAX_STREAMS"] == 16
    assert "DTD_CACHE_DIR" not in values and "--dtd-streams" not in settings.check()


def test_the_api_server_checks_its_settings_at_start(tiny_model_path, monkeypatch):
    """A bad value of a setting the API server reads only later (here a stream limit) stops the
    DTD processor's construction, which vLLM runs at the API server's start."""
    from conftest import DTD_ARCH, mm_processor

    monkeypatch.setenv("DTD_STREAM_MAX_EVENTS", "lots")
    with pytest.raises(SettingsError, match="DTD_STREAM_MAX_EVENTS must be an integer >= 1, got 'lots'"):
        mm_processor(tiny_model_path, DTD_ARCH)


# ----------------------------------------------------------------------------------- the 0.1 shims are gone


def test_release_0_1_names_are_not_read(monkeypatch):
    from analysis.harness.tiny_model import default_cache_dir
    from vllm_plugin.core import mask_stats
    from vllm_plugin.entrypoints.request_stats import header_entry
    from vllm_plugin.streams.session import Limits

    monkeypatch.delenv("DTD_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLLM_DTD_CACHE", "/tmp/old-cache")
    assert default_cache_dir() == REPO / ".cache"
    monkeypatch.setenv("DTD_CACHE_DIR", "/tmp/new-cache")
    assert default_cache_dir() == Path("/tmp/new-cache")
    assert Limits.from_env({"VLLM_DTD_STREAM_MAX_STREAMS": "3"}).max_streams == Limits().max_streams
    import torch

    entry = header_entry(mask_stats(torch.tensor([[[True, True]], [[True, False]]])), "d")
    assert entry["kept_per_step"] == [2, 1] and not {"kept_per_frame", "tokens_per_frame"} & set(entry)
    # ... and a server that still sets one refuses to start, naming its new name (never silently on defaults)
    with pytest.raises(
        settings.SettingsError, match="VLLM_DTD_STREAM_MAX_STREAMS is no longer read.*DTD_STREAM_MAX_STREAMS"
    ):
        settings.check(settings.API_SERVER, {"VLLM_DTD_STREAM_MAX_STREAMS": "3"})
    settings.check(settings.API_SERVER, {"DTD_STREAM_MAX_STREAMS": "3"})


# ------------------------------------------------------------------------ the table in docs/serving.md


def test_the_table_renders_every_setting_once():
    table = settings.markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(SETTINGS)
    assert all(r.count(" | ") == 4 for r in rows), [r for r in rows if r.count(" | ") != 4]
    assert "| `DTD_MAX_VIDEO_TOKENS` | integer >= 1 | `131072` | API server |" in table
    assert "| `DTD_STREAM_MAX_BYTES` | integer >= 1 | `4294967296` (4 GiB) |" in table


def test_python_dash_m_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_plugin.settings"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == settings.markdown_table()


def test_the_docs_have_the_generated_table_verbatim():
    page = (REPO / "docs" / "serving.md").read_text()
    assert page.count(settings.BEGIN) == 1 and page.count(settings.END) == 1, (
        "docs/serving.md lacks the settings markers: paste `python -m vllm_plugin.settings` between them"
    )
    assert settings.readme_block() in page, (
        "the settings table of docs/serving.md is stale: paste `python -m vllm_plugin.settings` between its markers"
    )
