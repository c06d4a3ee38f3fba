"""HTML reports that render offline: plotly.js travels with the report, never from a CDN.

:func:`write_report` writes a page of figures (and optional HTML, e.g. a table) and, beside it, the
``plotly.min.js`` of the installed ``plotly`` package, once per directory; ``inline=True`` puts
plotly.js inside the page instead (one self-contained file, ~4.6 MB).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PLOTLY_JS = "plotly.min.js"


def plotly_js() -> str:
    """The plotly.js bundled with the installed ``plotly`` Python package."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _ensure_js(directory: Path) -> Path:
    js = directory / PLOTLY_JS
    text = plotly_js()
    if not js.is_file() or js.stat().st_size != len(text.encode()):
        js.write_text(text, encoding="utf-8")
    return js


def write_report(path: str | Path, figures: Iterable, title: str, extra_html: str = "", inline: bool = False) -> Path:
    """Write ``path`` (an .html page titled ``title``) with ``figures`` (plotly figures) and then
    ``extra_html``. Returns the page's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if inline:
        head = f"<script>{plotly_js()}</script>"
    else:
        _ensure_js(path.parent)
        head = f'<script src="{PLOTLY_JS}"></script>'
    body = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{head}</head>"
        f"<body><h1>{html.escape(title)}</h1>{body}{extra_html}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path


def write_results(
    out: Path, name: str, result: dict, figures: Iterable, title: str, default: Callable[[Any], Any] = str
) -> Path:
    """A tool's results in ``out``: ``<name>.json`` (``result``, indented; ``default`` converts what
    JSON has no type for) and the report ``<name>.html`` (:func:`write_report`), whose path it returns."""
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=default))
    return write_report(out / f"{name}.html", figures, title)
