"""The documentation's links resolve: every relative link and image in the README, the guides in docs/, and the
READMEs of benchmarks/ and examples/ points to a file of the checkout (and an anchor to a heading of it); the tests
that docs/guarantees.md names exist; the README stays a front door."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "examples" / "README.md", *REPO.glob("docs/*.md")]
)
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target) and ![alt](target), the target optionally <...> or followed by a "title"
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
TEST_NAME = re.compile(r"(tests/test_\w+\.py)::(\w+)")


def _prose(text: str) -> str:
    """`text` without fenced code blocks and code spans, where brackets and parentheses are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation removed except hyphens, spaces and
    underscores (GitHub keeps word characters), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading contributes its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The heading anchors of the Markdown file `path`; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list[str]:
    """Every link and image target in `path`, inline or in a reference definition, outside code."""
    prose = _prose(path.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(prose) + REFERENCE_DEFINITION.findall(prose)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` that point to no file, or to no heading of a Markdown file; external ones are not
    checked."""
    broken = []
    for target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {_shown(resolved)}")
    return broken


def _case_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_documents_are_there():
    assert {_case_id(p) for p in DOCUMENTS} >= {"README.md", "docs/README.md", "benchmarks/README.md",
                                                  "examples/README.md"}


@pytest.mark.parametrize("path", DOCUMENTS, ids=_case_id)
def test_relative_links_and_images_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=_case_id)
def test_named_tests_exist(path):
    """A `tests/test_x.py::test_name` in the docs names a test function defined in that file."""
    missing = []
    for file, name in TEST_NAME.findall(path.read_text(encoding="utf-8")):
        test_file = REPO / file
        if not test_file.is_file() or not re.search(rf"^\s*def {name}\(", test_file.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Set up", "set-up"),
        ("Accuracy vs speed on SST-2, with distillation", "accuracy-vs-speed-on-sst-2-with-distillation"),
        ("transformers' own scripts: run_glue.py, run_qa.py", "transformers-own-scripts-run_gluepy-run_qapy"),
        ("`target_speedup` in measured time", "target_speedup-in-measured-time"),
        ("See [the guide](docs/README.md)", "see-the-guide"),
    ],
)
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere) [web](https://example.org/x)\n"
                    "`[code](not-a-link.md)`\n\n```\n[fenced](also-not.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "#nowhere: no heading with the anchor #nowhere in page.md"]
