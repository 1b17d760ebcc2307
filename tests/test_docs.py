"""The README and docs/: the generated CLI reference is current, the README stays a landing page, every
relative link leads to a file, and the README's first code block still holds the commands CI runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REGENERATE = "python -m ulsexport.cli.reference > docs/cli.md"

# [text](target) and ![alt](target), target up to a space (an optional "title" follows) or the closing ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1", re.S)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def links(text: str) -> list[str]:
    """The link targets of Markdown text, code blocks and code spans left out."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens,
    -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_cli_reference_is_current():
    from ulsexport.cli.reference import render

    path = DOCS / "cli.md"
    assert path.exists(), f"docs/cli.md is missing: run `{REGENERATE}`"
    assert path.read_text(encoding="utf-8") == render(), (
        f"docs/cli.md is out of date with the commands' options: run `{REGENERATE}`")


def test_cli_reference_names_every_command_and_option():
    from ulsexport.cli import main
    from ulsexport.cli.reference import render

    text = render()
    assert REGENERATE in text
    for name, command in main.commands.items():
        assert f"\n## ulsexport {name}\n" in text
        for param in command.params:
            if not getattr(param, "hidden", False) and hasattr(param, "opts") and param.opts[0].startswith("-"):
                assert f"`{param.opts[0]}`" in text, (name, param.opts)
    assert not re.search(r"at 0x[0-9a-fA-F]+", text)  # no object addresses
    assert str(ROOT) not in text  # no machine paths


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/ (at most 200)"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(page: Path):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http(s), mailto: not checked here
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
            continue
        anchor = target.split("#", 1)[1] if "#" in target else ""
        linked = (page.parent / path) if path else page
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files or headings: {broken}"


def test_link_finder():
    text = "[a](x.md) ![b](img/y.png \"t\") [c](https://e.org) `[d](not-a-link.md)`\n```\n[e](nor.md)\n```\n"
    assert links(text) == ["x.md", "img/y.png", "https://e.org"]


def test_anchors():
    text = "# Top\n## H200, 7B-shaped model (uncaptured)\n```\n# not a heading\n```\n## Top\n### `--speculative`: K\n"
    assert anchors(text) == {"top", "h200-7b-shaped-model-uncaptured", "top-1", "--speculative-k"}


def test_readme_first_code_block_keeps_the_ci_commands():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S)
    assert match, "README.md has no ```bash block"
    block = match.group(1)
    assert "ulsexport run recipes/kjv16-demo.yaml" in block
    assert "python -m pytest -q" in block
