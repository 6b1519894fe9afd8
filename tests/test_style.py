"""Check cas/ and cli/ with the house tools: ruff lint, ruff format and mypy --strict.

Each tool runs from the environment that runs pytest, with the settings in pyproject.toml.
A missing tool fails the test instead of skipping it, so CI cannot pass without the checks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKED_PATHS = ["cas", "cli"]
TOOL_TIMEOUT_SECONDS = 600


def run_tool(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGUMENTS`` in the project root and capture stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "fix_hint"),
    [
        (["ruff", "check", *CHECKED_PATHS], "fix the findings, or run `ruff check --fix`"),
        (["ruff", "format", "--check", *CHECKED_PATHS], "run `ruff format cas cli`"),
        (["mypy", "--strict", *CHECKED_PATHS], "add or correct the type annotations"),
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_style_tool_passes(command: list[str], fix_hint: str) -> None:
    result = run_tool(*command)
    exit_code = result.returncode

    command_text = " ".join(command)
    assert exit_code == 0, (
        f"`{command_text}` failed with exit code {exit_code}; {fix_hint}.\n"
        f"Its output:\n{result.stdout}"
    )
