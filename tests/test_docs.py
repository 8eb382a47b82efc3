"""The README and docs/ say what the code does: a fresh configuration reference, a description on every key, and
every ``labelnext`` command in a shell block that exists with the flags it uses (``labelnext config`` lines run)."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from labelnext.pipelines.config import load_config
from labelnext.pipelines.config_reference import REGENERATE, missing_descriptions, render
from tests.cli_run import REPO, labelnext

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^[ \t]*```(bash|sh|console)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def test_configuration_page_is_fresh():
    page = REPO / "docs" / "configuration.md"
    assert page.is_file() and page.read_text() == render(), (
        f"docs/configuration.md is stale: regenerate it with `{REGENERATE}` and commit it")


def test_every_config_key_has_a_description():
    missing = missing_descriptions()
    assert not missing, ("config keys without a description: " + ", ".join(missing) + ". Give each a "
                         f"Field(..., description=...) where it is declared, then run `{REGENERATE}`")


def test_readme_is_short_and_keeps_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_mkdocs_nav_and_relative_links_point_at_files():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = [p for entry in nav for p in (entry.values() if isinstance(entry, dict) else [entry])]
    assert {REPO / "docs" / p for p in pages} == set((REPO / "docs").glob("*.md")), "every docs page in the nav"
    broken = []
    for page in PAGES + [REPO / "bench" / "README.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:|^#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def shell_commands(text: str) -> list[str]:
    """Command lines of the shell blocks: continuations joined; in console blocks only ``$ `` lines."""
    commands = []
    for kind, body in SHELL_BLOCK.findall(text):
        body = re.sub(r"\\\n\s*", " ", body)
        for line in body.splitlines():
            line = line.strip()
            if kind == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def labelnext_calls(line: str) -> list[list[str]]:
    """Each ``labelnext ...`` invocation in a command line, as its arguments up to the next shell operator."""
    words = shlex.split(line, comments=True)
    calls = []
    for i, word in enumerate(words):
        if word == "labelnext" or word.endswith("bin/labelnext"):
            args = []
            for w in words[i + 1:]:
                if w in SHELL_OPERATORS:
                    break
                args.append(w)
            calls.append(args)
    return calls


def documented_calls() -> list[tuple[str, list[str]]]:
    return [(page.relative_to(REPO).as_posix(), args) for page in PAGES
            for line in shell_commands(page.read_text()) for args in labelnext_calls(line)]


def option_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


@functools.lru_cache(maxsize=None)
def help_text(sub: str) -> str:
    res = labelnext(sub, "--help", env={"COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}, timeout=120)
    assert res.returncode == 0, f"`labelnext {sub}` is not a command: {res.stderr.strip()}"
    return res.stdout


CALLS = documented_calls()


def test_the_docs_show_the_commands_users_run():
    subs = {args[0] for _, args in CALLS if args}
    assert {"run", "config", "submit", "report", "export"} <= subs, subs


@pytest.mark.parametrize("page, args", CALLS, ids=[f"{p}: labelnext {' '.join(a)}"[:120] for p, a in CALLS])
def test_documented_command_exists_with_its_flags(page, args):
    assert args, f"{page}: a bare `labelnext`"
    usage = help_text(args[0])
    flags = {m.group(0) for a in args[1:] if (m := FLAG.match(a))}
    unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage))
    assert not unknown, f"{page}: `labelnext {args[0]}` has no {', '.join(unknown)}"
    if args[0] in ("run", "submit"):  # the config it names and its --set keys load (no cluster needed)
        configs = option_values(args, "--config")
        load_config(configs[-1] if configs else None, option_values(args, "--set"))
    if args[0] == "config":  # needs no cluster, corpus or credentials: run it as written
        res = labelnext(*args, timeout=120)
        assert res.returncode == 0, f"{page}: `labelnext {' '.join(args)}` failed: {res.stderr.strip()}"
        assert res.stdout.strip()
