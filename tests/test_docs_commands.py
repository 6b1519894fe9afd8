"""Each command of `cas` has a page docs/commands/NAME.md in the shape the index describes.

The subcommands come from the real parser, so a new command without a page fails here.
A page must have the heading `# cas NAME` and the sections below, and its Options section
must list every option of the command and name no option the command lacks.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from cas_cli.main import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs" / "commands"
SECTIONS = ["Synopsis", "Description", "Options", "JSON output", "Exit codes", "Examples"]
OPTION_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def global_options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_options(parser: argparse.ArgumentParser) -> set[str]:
    """Long options of a command and of its own subcommands (such as `debug chunks`)."""
    options = {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    for child in subparsers(parser).values():
        options |= command_options(child)
    return options


PARSER = build_parser()
COMMANDS = subparsers(PARSER)
GLOBAL = global_options(PARSER)


def sections_of(text: str) -> dict[str, str]:
    """Return each `## ` section's body by its title."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_page_shape(name: str) -> None:
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"docs/commands/{name}.md is missing"
    text = page.read_text()
    sections = sections_of(text)

    assert text.splitlines()[0] == f"# cas {name}"
    assert list(sections)[: len(SECTIONS)] == SECTIONS
    for title in SECTIONS:
        assert sections[title].strip(), f"section {title} of {name}.md is empty"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_page_options(name: str) -> None:
    page = DOCS / f"{name}.md"
    if not page.is_file():
        pytest.skip(f"docs/commands/{name}.md is missing (test_command_page_shape fails)")
    options_text = sections_of(page.read_text()).get("Options", "")
    named = set(OPTION_RE.findall(options_text))
    own = command_options(COMMANDS[name]) - GLOBAL - {"--help"}

    assert named - own - GLOBAL == set(), f"{name}.md names options cas {name} lacks"
    assert own - named == set(), f"{name}.md does not describe these options"


def test_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()

    for name in COMMANDS:
        assert f"({name}.md)" in index, f"docs/commands/README.md does not link {name}.md"


def test_exit_code_table_linked() -> None:
    readme = (DOCS.parent.parent / "README.md").read_text()
    table = (DOCS.parent / "exit-codes.md").read_text()

    assert "docs/exit-codes.md" in readme
    for code in range(7):
        assert f"| {code} |" in table
