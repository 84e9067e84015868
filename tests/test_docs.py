"""The documentation checks itself: README.md and docs/*.md.

- every relative link (also docker/README.md's) resolves to a file of the checkout, and an ``#anchor`` into a markdown file
  names one of its headings (GitHub's slugs);
- every ``make TARGET`` they name is a rule of the Makefile, and every ``VAR=`` given to a make command
  is a variable the Makefile uses or an environment variable the code reads;
- README.md stays a landing page (at most 260 lines) and links every page of docs/.

Each checker is a plain function returning the problems it found; the last tests feed them broken
documents to show that they do fail.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 260


def doc_files() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


# ---------------------------------------------------------------- markdown helpers

FENCE = re.compile(r"^\s*(```|~~~)")


def split_fences(text: str) -> tuple[str, list[str]]:
    """(the text outside fenced code blocks, the lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return "\n".join(prose), code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|!\[[^\]]*\]\(\s*([^)\s]+)[^)]*\)")


def links(text: str) -> list[str]:
    prose, _ = split_fences(text)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is not a link
    return [a or b for a, b in LINK.findall(prose)]


def link_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for target in links(text):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text()):
                problems.append(f"{where}: no heading in {dest.name} gives #{anchor}")
    return problems


# ---------------------------------------------------------------- make commands

def makefile_targets(makefile: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, re.M))


def makefile_variables(makefile: str) -> set[str]:
    return set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", makefile)) | set(
        re.findall(r"^([A-Z][A-Z0-9_]*)\s*\?=", makefile, re.M))


def code_read_names() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "pipelines").rglob("*.py")))


def code_snippets(text: str) -> list[str]:
    """Every fenced code line and every inline code span."""
    prose, code = split_fences(text)
    return code + re.findall(r"`([^`\n]+)`", prose)


def make_commands(text: str) -> list[tuple[str | None, list[str], str]]:
    """(target or None, VAR names given, the command) for each `make ...` in the code of a document."""
    found = []
    for snippet in code_snippets(text):
        starts = list(re.finditer(r"(?<![\w/.-])make\s+", snippet))
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(snippet)
            rest = re.split(r"&&|;|\s#\s", snippet[m.end():end])[0].rstrip(" |")
            words = rest.split()
            target = words[0] if words and re.fullmatch(r"[a-z][a-z0-9-]*", words[0]) else None
            variables = re.findall(r"(?:^|[\s\[])([A-Z][A-Z0-9_]*)=", rest)
            found.append((target, variables, ("make " + rest).strip()))
    return found


def make_problems(text: str, where: str, targets: set[str], variables: set[str], code: str) -> list[str]:
    problems = []
    for target, names, command in make_commands(text):
        if target is not None and target not in targets:
            problems.append(f"{where}: `{command}`: no Makefile target {target!r}")
        for name in names:
            if name in variables or re.search(rf"\b{name}\b", code):
                continue
            problems.append(f"{where}: `{command}`: {name}= is neither a Makefile variable nor read by pipelines/")
    return problems


# ---------------------------------------------------------------- the checks

@pytest.mark.parametrize("path", doc_files() + [ROOT / "docker" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert link_problems(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_make_commands_exist(path):
    makefile = (ROOT / "Makefile").read_text()
    problems = make_problems(path.read_text(), str(path.relative_to(ROOT)), makefile_targets(makefile),
                             makefile_variables(makefile), code_read_names())
    assert problems == []


def test_docs_name_make_commands():
    """The make parser finds the commands at all (a parser that finds none would pass everything)."""
    commands = [c for p in doc_files() for c in make_commands(p.read_text())]
    targets = {t for t, _, _ in commands}
    assert {"demo", "test", "data", "config", "train", "eval", "export", "serve", "bento", "prelabel"} <= targets


def test_readme_is_a_landing_page():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/"


def test_every_docs_page_is_linked_from_readme():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no page"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README.read_text())
              if not re.match(r"^(https?:|mailto:)", t)}
    assert [p.name for p in pages if p.resolve() not in linked] == []


# ---------------------------------------------------------------- the checkers fail when they should

def test_slug_follows_github():
    assert slug("The data stage: `make data`") == "the-data-stage-make-data"
    assert slug("Device formats: `make export FORMAT=tflite|onnx`") == "device-formats-make-export-formattfliteonnx"
    assert slug("Pretrained checkpoints (fine-tuning)") == "pretrained-checkpoints-fine-tuning"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_link_checker_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    text = ("[ok](other.md) [ok](other.md#real-heading) [web](https://example.com/x.md#nope)\n"
            "[missing](nothere.md) [bad anchor](other.md#no-such-heading) [self](#nope)\n"
            "```\n[in code](ignored.md)\n```\n")
    problems = link_problems(page, text)
    assert len(problems) == 3, problems
    assert any("nothere.md" in p for p in problems)
    assert any("no-such-heading" in p for p in problems)
    assert any("#nope" in p for p in problems)


def test_make_checker_catches_unknown_targets_and_variables():
    makefile = "RUN ?=\nDATASET ?= sample\ntrain: x\n\t$(PY) --run $(RUN)\ndata:\n\techo $(DATASET)\n"
    targets, variables = makefile_targets(makefile), makefile_variables(makefile)
    assert targets == {"train", "data"} and {"RUN", "DATASET"} <= variables
    text = ("```bash\nmake train RUN=a && make data DATASET=b\nmake fly RUN=a\nmake train RUNS=a\n```\n"
            "Inline: `make data DATASET=NAME [BOGUS_VAR=1]` and `make predict RUN=x`.\n")
    problems = make_problems(text, "t.md", targets, variables, code='os.environ["READ_BY_CODE"]')
    assert len(problems) == 4, problems
    assert any("'fly'" in p for p in problems) and any("'predict'" in p for p in problems)
    assert any("RUNS=" in p for p in problems) and any("BOGUS_VAR=" in p for p in problems)
    assert make_problems("`make train READ_BY_CODE=1`", "t.md", targets, variables,
                         code='os.environ["READ_BY_CODE"]') == []
