"""The code's numerics citations point into the repo, and what they point at exists.

Reads every .py under runner/, cluster/ and tasks/, and docs/numerics.md:

- no comment, docstring or string cites a spec section (``spec §4.4``,
  ``spec ascend.md §2.1``) or ``../shared``: a clone holds neither;
- every trap id the code names (T1.., D1.. in a comment, a docstring, or a string that
  mentions a trap) has its own entry under the doc's ``## Traps``, and each entry names
  the upstream file and line it comes from;
- every ``docs/numerics.md#anchor`` in the code, and every ``(#anchor)`` link inside the
  doc, is the GitHub anchor of one of the doc's headings.

The checks are functions of a list of files, so one owner's files can be checked alone:
``python -c "import sys; sys.path[:0] = ['tests', '.']; import test_numerics_docs as t;
print(t.problems(['tasks/decode.py']))"``.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "numerics.md"
CODE_DIRS = ("runner", "cluster", "tasks")

#: A citation of a section of a document the clone does not hold.
SPEC_SECTION = re.compile(r"\bspec\b(?:\s+[\w.-]+\.md)?\s*§")
SHARED = re.compile(r"\.\./shared\b|\bshared/(?:spec|data)\b")
TRAP_ID = re.compile(r"\b([TD][1-9][0-9]?)\b")
CITED_ANCHOR = re.compile(r"docs/numerics\.md#([\w-]+)")
#: Sections the code relies on (the issue's list); the doc may have more.
REQUIRED_ANCHORS = ("crop-box", "affine", "input", "flip", "decode", "rescoring", "oks-nms", "evaluation",
                    "letterbox", "detector-decode", "detector-nms", "detector-records", "network", "traps")
#: An upstream reference such as ``alphapose/utils/transforms.py:517-521`` or ``nms_cpu.cpp:18``.
UPSTREAM_LINE = re.compile(r"[\w/.-]+\.(?:py|cpp):\d+")


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _read(path: str | Path) -> tuple[str, Path]:
    p = Path(path)
    p = p if p.is_absolute() else REPO / p
    return p.read_text(encoding="utf-8"), p


def prose(path: str | Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring, and of every string that mentions a trap."""
    text, _ = _read(path)
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.add(first.lineno)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING and (tok.start[0] in docstrings or re.search(r"\btraps?\b", tok.string)):
            out.append((tok.start[0], tok.string))
    return out


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_headings(doc: str) -> list[tuple[int, str, str]]:
    """(level, title, anchor) of every heading outside code fences; repeats get -1, -2 as on GitHub."""
    seen: dict[str, int] = {}
    out, fenced = [], False
    for line in doc.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            anchor = github_anchor(m.group(2))
            n = seen.get(anchor, 0)
            seen[anchor] = n + 1
            out.append((len(m.group(1)), m.group(2), anchor if n == 0 else f"{anchor}-{n}"))
    return out


def trap_entries(doc: str) -> dict[str, str]:
    """Trap id -> its entry's text, from the ``## Traps`` section: ``### T3: ...`` or ``- **T3** ...``."""
    section = re.search(r"^## Traps[ \t]*\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
    if not section:
        return {}
    entries: dict[str, str] = {}
    starts = list(re.finditer(r"^(?:#{3,6}\s+|[-*]\s+\*\*)([TD][1-9][0-9]?)\b", section.group(1), re.M))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(section.group(1))
        entries[m.group(1)] = section.group(1)[m.start():end]
    return entries


def spec_citations(files) -> list[str]:
    """``file:line: text`` of every line that cites a spec section or ../shared, anywhere in the file."""
    out = []
    for f in files:
        text, p = _read(f)
        for n, line in enumerate(text.splitlines(), 1):
            if SPEC_SECTION.search(line) or SHARED.search(line):
                out.append(f"{_rel(p)}:{n}: {line.strip()}")
    return out


def named_traps(files) -> dict[str, list[str]]:
    """Trap id -> the ``file:line`` places that name it."""
    out: dict[str, list[str]] = {}
    for f in files:
        _, p = _read(f)
        for line, text in prose(p):
            for i, chunk in enumerate(text.splitlines()):
                for trap in TRAP_ID.findall(chunk):
                    out.setdefault(trap, []).append(f"{_rel(p)}:{line + i}")
    return out


def cited_anchors(files) -> dict[str, list[str]]:
    """Anchor -> the ``file:line`` places that cite ``docs/numerics.md#anchor``."""
    out: dict[str, list[str]] = {}
    for f in files:
        text, p = _read(f)
        for n, line in enumerate(text.splitlines(), 1):
            for anchor in CITED_ANCHOR.findall(line):
                out.setdefault(anchor, []).append(f"{_rel(p)}:{n}")
    return out


def problems(files) -> list[str]:
    """Every problem of the three checks for ``files``, one line each (empty: all hold)."""
    doc = DOC.read_text(encoding="utf-8")
    anchors = {a for _, _, a in doc_headings(doc)}
    entries = trap_entries(doc)
    out = [f"cites what a clone lacks: {c}" for c in spec_citations(files)]
    out += [f"trap {t} has no entry under docs/numerics.md#traps (named at {', '.join(w)})"
            for t, w in sorted(named_traps(files).items()) if t not in entries]
    out += [f"docs/numerics.md#{a} is no heading of the doc (cited at {', '.join(w)})"
            for a, w in sorted(cited_anchors(files).items()) if a not in anchors]
    return out


# ------------------------------------------------------------------ the tests


def test_the_doc_has_the_sections_the_code_cites_and_working_links():
    doc = DOC.read_text(encoding="utf-8")
    anchors = {a for _, _, a in doc_headings(doc)}
    assert not [a for a in REQUIRED_ANCHORS if a not in anchors]
    broken = sorted({a for a in re.findall(r"\]\(#([^)\s]+)\)", doc) if a not in anchors})
    assert not broken, f"links inside docs/numerics.md to no heading: {broken}"


def test_every_trap_entry_says_where_upstream_does_it():
    entries = trap_entries(DOC.read_text(encoding="utf-8"))
    assert {f"T{i}" for i in range(1, 22)} | {f"D{i}" for i in range(1, 23)} <= set(entries)
    thin = [t for t, body in entries.items() if not UPSTREAM_LINE.search(body) or len(body.split()) < 30]
    assert not thin, f"trap entries without an upstream file:line or with almost no text: {thin}"


def test_no_code_cites_a_spec_section_or_shared():
    found = spec_citations(code_files())
    assert not found, ("cite docs/numerics.md#<section> instead (or docs/ascend.md for the Ascend notes):\n"
                       + "\n".join(found))


def test_every_trap_the_code_names_is_explained_in_the_doc():
    entries = trap_entries(DOC.read_text(encoding="utf-8"))
    named = named_traps(code_files())
    assert named, "the code names no trap at all: the scan is broken"
    missing = {t: w for t, w in named.items() if t not in entries}
    assert not missing, f"traps the code names with no entry under docs/numerics.md#traps: {missing}"


def test_every_anchor_the_code_cites_is_a_heading_of_the_doc():
    anchors = {a for _, _, a in doc_headings(DOC.read_text(encoding="utf-8"))}
    cited = cited_anchors(code_files())
    assert cited, "the code cites no docs/numerics.md section at all: the scan is broken"
    unknown = {a: w for a, w in cited.items() if a not in anchors}
    assert not unknown, f"docs/numerics.md anchors cited in the code that no heading makes: {unknown}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Decode (spec §6), data in ../shared; trap T99."""\n'
                   "x = 1  # see docs/numerics.md#no-such-section and trap D1\n", encoding="utf-8")
    found = problems([bad])
    assert len(found) == 3 and "T99" in found[1] and "no-such-section" in found[2], found
    assert github_anchor("T20: numpy version changes the crop box's last bit") \
        == "t20-numpy-version-changes-the-crop-boxs-last-bit"
    assert github_anchor("D13: pad=1 is a flag") == "d13-pad1-is-a-flag"
    assert github_anchor("OKS-NMS") == "oks-nms"
