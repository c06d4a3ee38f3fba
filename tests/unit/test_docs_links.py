"""The README and docs/: every relative link reaches a file, every #anchor a heading of its target (GitHub's
slugs), the README stays short and links every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from conftest import REPO

README_MAX_LINES = 250
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target), the target up to whitespace or ")"; an optional "title" after it
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the Markdown outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text as rendered (code spans, emphasis and links reduced to their
    text), lowercased, every character but letters, digits, spaces, "-" and "_" dropped, spaces to "-"."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose of a Markdown file (code spans left out)."""
    out = []
    for n, line in _prose(path.read_text()):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((n, m.group(1)))
    return out


def broken_links(files: list[Path], root: Path) -> list[str]:
    """Every relative link of ``files`` whose file does not exist under ``root``, or whose #anchor is no
    heading of its target, as 'file:line: target (why)'."""
    problems = []
    for path in files:
        for n, target in links(path):
            if not target or EXTERNAL.match(target):
                continue
            where = f"{path.relative_to(root)}:{n}: {target}"
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{where} (no such file)")
                continue
            try:
                dest.relative_to(root.resolve())
            except ValueError:
                problems.append(f"{where} (outside the repository)")
                continue
            if anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where} (an anchor into a file that is not Markdown)")
                elif unquote(anchor) not in anchors(dest):
                    problems.append(f"{where} (no heading with this anchor in {dest.name})")
    return problems


# -------------------------------------------------------------------------------------------------- the checker


def test_slugs_follow_githubs_rules():
    assert slug("Model families: Qwen2.5-VL, Qwen3-VL, Qwen2-VL") == "model-families-qwen25-vl-qwen3-vl-qwen2-vl"
    assert slug('The motion-compensated reference (`dtd_reference: "motion"`)') == (
        "the-motion-compensated-reference-dtd_reference-motion"
    )
    assert slug("Realtime WebSocket (/v1/realtime)") == "realtime-websocket-v1realtime"
    assert slug("Video preprocessing: the plugin's loader against vLLM's") == (
        "video-preprocessing-the-plugins-loader-against-vllms"
    )
    assert slug("Set-up (`scripts/setup.sh`)") == "set-up-scriptssetupsh"
    assert slug("Soak: a 2-hour stream, accelerated") == "soak-a-2-hour-stream-accelerated"


def test_the_checker_finds_a_broken_file_an_unknown_anchor_and_ignores_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Page A\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n[x](missing-in-code.md)\n```\n"
    )
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#page-a) [ok](docs/a.md#same-1) [ok](#top) [ok](https://example.com/x)\n"
        "[gone](docs/b.md) [bad](docs/a.md#not-a-heading) [bad](#nowhere) [bad](docs/a.md#same-2)\n"
        "`[in code](docs/c.md)` [bad](docs/a.md#not-a-heading-either)\n"
    )
    files = [tmp_path / "README.md", tmp_path / "docs" / "a.md"]
    found = broken_links(files, tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in found] == [
        "docs/b.md",
        "docs/a.md#not-a-heading",
        "#nowhere",
        "docs/a.md#same-2",
        "docs/a.md#not-a-heading-either",
    ], found
    assert "# not a heading" not in str(anchors(tmp_path / "docs" / "a.md"))


# -------------------------------------------------------------------------------------------------- the docs


def test_every_relative_link_and_anchor_of_the_readme_and_docs_resolves():
    problems = broken_links(pages(), REPO)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}: move detail to docs/)"


def test_the_readme_links_every_docs_page():
    linked = {
        (REPO / target.partition("#")[0]).resolve()
        for _, target in links(REPO / "README.md")
        if target and not EXTERNAL.match(target) and not target.startswith("#")
    }
    docs = sorted((REPO / "docs").glob("*.md"))
    assert docs, "docs/ has no pages"
    missing = [str(p.relative_to(REPO)) for p in docs if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
