"""The docs cannot rot silently: README.md and docs/*.md are parsed (markdown-it-py, CommonMark + tables) and checked
against the repository and the code.

- every relative link and image between them points at a file that exists, and every `#anchor` at a heading of its
  target, as GitHub renders heading slugs (or an explicit HTML id); every docs page is linked from the README;
- every FISH_* setting that fishmp/config.py declares (read from its dataclasses' field metadata and its string
  literals, never from a list kept here) is listed in a table of docs/configuration.md;
- every file under scripts/, benchmarks/, tests/, fishmp/, docs/ or .ci/ that the docs name exists; every
  `python -m fishmp COMMAND --option` they show is a real subcommand and option; every `--option` given to a
  benchmarks/ script is defined in that script.
HTML comments are skipped: they hold the lead's placeholders for pages still being written.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import unicodedata
from functools import cache

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

import fishmp.config as config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PAGE = os.path.join(ROOT, "docs", "configuration.md")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
HTML_REF = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HTML_ID = re.compile(r"""\b(?:id|name)\s*=\s*["']([^"']+)["']""")
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|benchmarks|tests|fishmp|docs|\.ci)/[\w.*/-]*[\w*])")
# files named relative to the package folder, as the layer pages do (`worker/lanes.py`)
PACKAGE_PATH = re.compile(r"(?<![\w./-])((?:job|planning|engines|worker|backends|running|server)/\w+\.py)\b")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def rel(path: str, root: str = ROOT) -> str:
    return os.path.relpath(path, root)


@cache
def tokens(path: str) -> tuple[Token, ...]:
    with open(path, encoding="utf-8") as f:
        text = HTML_COMMENT.sub("", f.read())
    return tuple(MarkdownIt("commonmark").enable("table").parse(text))


def walk(toks: tuple[Token, ...]):
    for tok in toks:
        yield tok
        if tok.children:
            yield from walk(tuple(tok.children))


def github_slug(text: str) -> str:
    """GitHub's heading anchor (github-slugger): lower case; drop every character but letters, marks, numbers,
    connector punctuation (`_`), spaces and hyphens; spaces become hyphens."""
    kept = "".join(ch for ch in text.lower()
                   if ch in " -" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc")
    return kept.replace(" ", "-")


@cache
def anchors(path: str) -> frozenset[str]:
    """The anchors a page offers: its headings' slugs (a repeated slug gets -1, -2 ...) and explicit HTML ids."""
    found: set[str] = set()
    toks = tokens(path)
    for i, tok in enumerate(toks):
        if tok.type == "heading_open":
            inline = toks[i + 1]
            text = "".join(c.content for c in inline.children or () if c.type in ("text", "code_inline"))
            slug, n = github_slug(text), 1
            while slug in found:
                slug = f"{github_slug(text)}-{n}"
                n += 1
            found.add(slug)
        if tok.type in ("html_block", "html_inline"):
            found.update(HTML_ID.findall(tok.content))
    return frozenset(found)


def links(path: str) -> list[str]:
    out: list[str] = []
    for tok in walk(tokens(path)):
        if tok.type == "link_open":
            out.append(str(tok.attrs["href"]))
        elif tok.type == "image":
            out.append(str(tok.attrs["src"]))
        elif tok.type in ("html_block", "html_inline"):
            out.extend(HTML_REF.findall(tok.content))
    return out


def broken_links(path: str, root: str = ROOT) -> list[str]:
    problems = []
    for href in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", href, re.I):  # http:, https:, mailto: ... (never fetched: no network)
            continue
        target, _, fragment = href.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not dest.startswith(root + os.sep):
            problems.append(f"{rel(path, root)}: {href} leaves the repository")
        elif not os.path.exists(dest):
            problems.append(f"{rel(path, root)}: {href}: no file {rel(dest, root)}")
        elif fragment and dest.endswith(".md") and fragment not in anchors(dest):
            problems.append(f"{rel(path, root)}: {href}: {rel(dest, root)} has no heading with the anchor #{fragment}")
    return problems


def test_links_and_anchors_between_readme_and_docs_resolve() -> None:
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = os.path.join(ROOT, "README.md")
    linked = {os.path.normpath(os.path.join(ROOT, href.partition("#")[0])) for href in links(readme)}
    orphans = [rel(page) for page in doc_files()[1:] if page not in linked]
    assert not orphans, f"add these pages to the README's 'Where each topic lives': {orphans}"


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A `FISH_X` heading: its slug\n\n## Twice\n\n## Twice\n\n[ok](#a-fish_x-heading-its-slug) "
                    "[ok](#twice-1) [gone](missing.md) [bad](#nowhere) <img src=\"gone.png\">\n", encoding="utf-8")
    found = broken_links(str(page), str(tmp_path))
    assert found == ["page.md: missing.md: no file missing.md", "page.md: #nowhere: page.md has no heading with the "
                     "anchor #nowhere", "page.md: gone.png: no file gone.png"]


def declared_variables() -> set[str]:
    """FISH_* names config.py declares: each dataclass field's spec (how settings are declared), the variables and
    prefixes it reads on purpose, and, in case a setting is ever declared another way, every string literal in the
    module that is exactly a FISH_* name."""
    names = {f.metadata["spec"].env for obj in vars(config).values() if dataclasses.is_dataclass(obj)
             and isinstance(obj, type) for f in dataclasses.fields(obj) if "spec" in f.metadata}
    names |= set(config.EXTRA_VARIABLES) | {prefix + "*" for prefix in config.EXTRA_PREFIXES}
    with open(config.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"FISH_[A-Z0-9_]*[A-Z0-9]", node.value)}  # a prefix ends in _
    return names


def listed_variables(path: str) -> set[str]:
    """The code spans in the first cell of every table row of a page."""
    listed: set[str] = set()
    toks = tokens(path)
    for i, tok in enumerate(toks):
        if tok.type == "tr_open":
            cell = toks[i + 2]  # tr_open, td_open / th_open, inline
            listed.update(c.content for c in cell.children or () if c.type == "code_inline")
    return listed


def test_every_setting_in_config_py_is_in_the_configuration_page() -> None:
    declared = declared_variables()
    assert len(declared) > 40 and "FISH_BATCH_SIZE" in declared and "FISH_API_KEY" in declared  # the reader works
    missing = sorted(declared - listed_variables(CONFIG_PAGE))
    assert not missing, f"docs/configuration.md lists no table row for {missing}: add one (name, default, meaning)"


def test_library_keywords_are_the_variables_lower_cased() -> None:
    """docs/configuration.md says a library caller's keyword is the variable without FISH_, lower case."""
    odd = {name: env for name, env in config.Settings.variables().items() if env != "FISH_" + name.upper()}
    assert not odd


def code_texts(path: str) -> list[str]:
    """Fenced blocks (a command continued with a backslash joined to one line) and inline code spans."""
    out: list[str] = []
    for tok in walk(tokens(path)):
        if tok.type in ("fence", "code_block"):
            out.extend(tok.content.replace("\\\n", " ").splitlines())
        elif tok.type == "code_inline":
            out.append(tok.content)
    return out


def full_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return HTML_COMMENT.sub("", f.read())


def test_files_the_docs_name_exist() -> None:
    missing = []
    for path in doc_files():
        text = full_text(path)
        named = [(m, ROOT) for m in REPO_PATH.findall(text)] + \
                [(m, os.path.join(ROOT, "fishmp")) for m in PACKAGE_PATH.findall(text)]
        for name, base in named:
            if not glob.glob(os.path.join(base, name.rstrip("."))):
                missing.append(f"{rel(path)}: {name}")
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(sorted(set(missing)))


def commands(path: str, program: str) -> list[str]:
    """What follows `program` on each command line that runs it, up to a comment or the next command."""
    out = []
    for line in code_texts(path):
        for part in re.split(r"&&|;|\|(?!\w)| then ", line):
            m = re.search(rf"(?:^|\s){re.escape(program)}(?:\s+(.*)|$)", part.split(" #")[0])
            if m:
                out.append(m.group(1) or "")
    return out


@cache
def cli_options() -> dict[str, set[str]]:
    from fishmp.cli import _parser

    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def test_fishmp_commands_the_docs_show_exist() -> None:
    cli, bad = cli_options(), []
    for path in doc_files():
        for tail in commands(path, "-m fishmp"):
            command = tail.split()[0] if tail.split() else ""
            if not command or not command[0].isalpha():  # python -m fishmp --help, python -m fishmp ...
                continue
            options = OPTION.findall(tail[len(command):])
            if command not in cli:
                bad.append(f"{rel(path)}: python -m fishmp {command}: no such command")
            bad += [f"{rel(path)}: python -m fishmp {command} {o}: no such option" for o in options
                    if command in cli and o not in cli[command]]
    assert sum(1 for path in doc_files() for _ in commands(path, "-m fishmp")) > 10  # the reader works
    assert not bad, "\n".join(bad)


def test_benchmark_options_the_docs_show_exist() -> None:
    bad, checked = [], 0
    for path in doc_files():
        for script in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
            with open(script, encoding="utf-8") as f:
                source = f.read()
            for tail in commands(path, "benchmarks/" + os.path.basename(script)):
                options = OPTION.findall(tail)
                checked += len(options)
                bad += [f"{rel(path)}: {rel(script)} {o}: not defined there" for o in options
                        if not re.search(rf"""["']{re.escape(o)}["']""", source)]
    assert checked > 30  # the reader works
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("script", ["scripts/demo.sh", "scripts/test.sh"])
def test_the_readme_commands_are_what_ci_runs(script: str) -> None:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert f"./{script}" in readme and os.access(os.path.join(ROOT, script), os.X_OK)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "./scripts/test.sh" in f.read()
