"""The docs hold together: every relative link in README.md, docs/*.md and bench/README.md lands on a file
(and, for #anchors, on a heading of that file, by GitHub's slug rules); the README stays short, names the two
commands and lists every stage of pipeline.stages in its stage table."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"])

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks (kept as blank lines) and inline code spans."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # letters, digits, _, - and spaces stay
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(text):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    text = prose(path.read_text())
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not SCHEME.match(t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {_shown(dest)}")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_shown(dest)}")
    return broken


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def test_github_slugs():
    assert slug("The two commands on a fresh machine") == "the-two-commands-on-a-fresh-machine"
    assert slug("Face finder (`data.crop.mode: detect`)") == "face-finder-datacropmode-detect"
    assert slug("Measured (2026-12-01, 2 cores, no GPU, machine quiet)") == \
        "measured-2026-12-01-2-cores-no-gpu-machine-quiet"
    assert slug("What moved the score (demo)") == "what-moved-the-score-demo"
    assert slug("faces.min_face & [the gate](GATE.md)") == "facesmin_face--the-gate"


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-section-with-punctuation) [ok](#here)\n"
                    "[bad](missing.md) [bad](other.md#nowhere) [web](https://example.com/x.md)\n"
                    "`[code](ignored.md)`\n\n```\n[fenced](ignored.md)\n```\n\n## Here\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nowhere"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.exists(), path
    assert broken_links(path) == []


def test_the_readme_is_under_250_lines():
    lines = README.read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines"


def test_the_readme_names_both_commands():
    text = README.read_text()
    commands = {line.split("#", 1)[0].strip() for line in text.splitlines()}
    commands |= {span.strip("`").strip() for span in re.findall(r"`[^`\n]+`", text)}
    assert "./run.sh" in commands and "./run.sh test" in commands


def test_the_readme_stage_table_lists_every_stage():
    text = README.read_text()
    assert "| stage | reads | writes |" in text
    table = text.split("| stage | reads | writes |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    missing = [stage.name for stage in STAGES if stage.name not in listed]
    assert not missing, f"README's stage table lacks {missing}"
