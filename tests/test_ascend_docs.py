"""docs/ascend.md is what the code cites: every ``docs/ascend.md#anchor`` in runner/, cluster/ and tasks/
is one of its headings, no citation lacks an anchor, and the doc quotes no text only the fakes print."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ascend.md"


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the doc's headings: lower case, spaces to '-', other punctuation but '_' and '-' dropped."""
    out = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def citations() -> list[tuple[str, str]]:
    found = []
    for path in sorted(p for d in ("runner", "cluster", "tasks") for p in (REPO / d).rglob("*.py")):
        for match in re.finditer(r"docs/ascend\.md(#[\w-]+)?", path.read_text()):
            found.append((str(path.relative_to(REPO)), match.group(1) or ""))
    return found


def test_every_citation_is_a_heading_of_the_doc():
    text = DOC.read_text()
    known = anchors(text)
    cited = citations()
    assert cited and all(anchor for _, anchor in cited), [c for c in cited if not c[1]]
    assert sorted({(f, a) for f, a in cited if a[1:] not in known}) == []
    for link in re.findall(r"\]\(#([\w-]+)\)", text):  # the doc's own links
        assert link in known, link
    assert {"device-ids", "ray-pinning", "soc-version", "ais_bench-sessions", "atc", "precision-modes",
            "chip-health", "errors", "send-back"} <= known


def test_the_doc_quotes_no_text_only_the_fakes_print():
    text = DOC.read_text()
    assert "context is null" not in text and "fake:" not in text
