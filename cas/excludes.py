"""Exclude patterns in the syntax of gitignore, matched against paths inside a snapshot.

A path is matched relative to the snapshot's root, with ``/`` between components and no
leading ``/``. With one source folder, that folder's contents are the root. With several
sources, each one is an entry of the root under its base name.

Rules, as git documents them for ``.gitignore`` (git 2.43, ``gitignore(5)``):

- A blank line matches nothing; a line starting with ``#`` is a comment.
- Trailing spaces are dropped unless the last one is escaped with a backslash.
- ``!`` in front re-includes what an earlier pattern excluded. The last pattern that
  matches a path decides. A path inside an excluded folder stays excluded, because an
  excluded folder is not walked.
- A trailing ``/`` makes the pattern match folders only.
- A pattern with a ``/`` at its start or in its middle is anchored at the root; one
  without matches a name at any depth.
- ``*`` matches any run of characters except ``/``, ``?`` one character except ``/``,
  ``[...]`` one character of a set (``[!...]`` or ``[^...]`` negated, never ``/``).
- ``**/`` at the start matches in every folder, ``/**`` at the end matches everything
  inside, ``/**/`` matches zero or more folders. Any other ``**`` is a plain ``*``.
- A backslash makes the next character literal, such as ``\\#``, ``\\!``, ``\\*``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from cas.errors import UsageError
from cas.snapshot import Snapshot

# A meta key of the snapshot: the exclude patterns of the run, as a JSON array of strings.
EXCLUDE_META = "cas.exclude"


@dataclass(frozen=True)
class ExcludePattern:
    """One parsed pattern: its regular expression and how it applies."""

    text: str
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def parse_pattern(line: str) -> ExcludePattern | None:
    """Parse one pattern line; return None for a blank line or a comment."""
    text = _strip_trailing_spaces(line.rstrip("\r\n"))
    if not text or text.startswith("#"):
        return None
    body = text
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    dir_only = body.endswith("/") and not body.endswith("\\/")
    if dir_only:
        body = body.rstrip("/")
    if not body:
        return None
    # A "/" at the start or in the middle anchors the pattern at the root.
    anchored = "/" in body
    body = body.removeprefix("/")
    regex = _translate(body)
    if not anchored:
        regex = "(?:.*/)?" + regex
    return ExcludePattern(text, re.compile(regex + r"\Z", re.DOTALL), negated, dir_only)


def _strip_trailing_spaces(text: str) -> str:
    stripped = text.rstrip(" ")
    if len(stripped) < len(text) and stripped.endswith("\\") and not _escaped_end(stripped):
        return stripped + " "
    return stripped


def _escaped_end(text: str) -> bool:
    """Return whether the final backslash of ``text`` is itself escaped."""
    count = len(text) - len(text.rstrip("\\"))
    return count % 2 == 0


def _translate(body: str) -> str:
    """Translate a pattern without its anchor, negation and trailing slash into a regex."""
    parts: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            parts.append(re.escape(body[i + 1]))
            i += 2
        elif char == "*":
            i = _translate_stars(body, i, parts)
        elif char == "?":
            parts.append("[^/]")
            i += 1
        elif char == "[":
            i = _translate_set(body, i, parts)
        else:
            parts.append(re.escape(char))
            i += 1
    return "".join(parts)


def _translate_stars(body: str, i: int, parts: list[str]) -> int:
    end = i
    while end < len(body) and body[end] == "*":
        end += 1
    at_start = i == 0 or body[i - 1] == "/"
    at_end = end == len(body) or body[end] == "/"
    if end - i < 2 or not (at_start and at_end):
        parts.append("[^/]*")
        return end
    if end == len(body):
        # "/**" at the end, or the whole pattern "**": everything below.
        parts.append(".*")
        return end
    # "**/" at the start or "/**/" in the middle: zero or more folders.
    parts.append("(?:.*/)?")
    return end + 1


def _translate_set(body: str, i: int, parts: list[str]) -> int:
    """Translate ``[...]`` at ``body[i]``; an unterminated ``[`` is a literal."""
    j = i + 1
    negated = j < len(body) and body[j] in "!^"
    if negated:
        j += 1
    members: list[str] = []
    # A "]" right after the opening bracket is a member, not the end.
    first = True
    while j < len(body) and (body[j] != "]" or first):
        first = False
        low, j = _set_char(body, j)
        if j + 1 < len(body) and body[j] == "-" and body[j + 1] != "]":
            high, j = _set_char(body, j + 1)
            # git's wildmatch matches a reversed range such as "z-a" by its first
            # character only, and a reversed range is an error to the re module.
            if low > high:
                members.append(re.escape(low))
            else:
                members.append(f"{re.escape(low)}-{re.escape(high)}")
        else:
            members.append(re.escape(low))
    if j >= len(body):
        parts.append(re.escape("["))
        return i + 1
    members_text = "".join(members)
    # A set never matches "/", the separator of path components.
    parts.append(f"[^/{members_text}]" if negated else f"(?!/)[{members_text}]")
    return j + 1


def _set_char(body: str, j: int) -> tuple[str, int]:
    """Return the set member at ``body[j]``, honouring a backslash, and the next index."""
    if body[j] == "\\" and j + 1 < len(body):
        return body[j + 1], j + 2
    return body[j], j + 1


class ExcludeMatcher:
    """Decides whether a path of the snapshot is excluded by a list of patterns."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)
        self._parsed = [p for p in map(parse_pattern, self.patterns) if p is not None]

    def __bool__(self) -> bool:
        return bool(self._parsed)

    def excluded(self, rel_path: str, is_dir: bool) -> bool:
        """Return whether ``rel_path`` (relative to the root, ``/``-separated) is excluded."""
        result = False
        for pattern in self._parsed:
            if pattern.dir_only and not is_dir:
                continue
            if pattern.negated != result:
                # Only a pattern that would flip the decision needs matching.
                continue
            if pattern.regex.match(rel_path):
                result = not pattern.negated
        return result


def check_pattern(pattern: str, source: str) -> str:
    """Validate one pattern given as an option; ``source`` names it in errors."""
    if "\n" in pattern or "\r" in pattern or "\0" in pattern:
        raise UsageError(f"invalid {source} {pattern!r}: a pattern is one line without NUL")
    if parse_pattern(pattern) is None:
        raise UsageError(
            f"invalid {source} {pattern!r}: it matches nothing (blank, a comment or a bare "
            f"'!'); give a pattern such as '*.tmp' or 'optimizer/'"
        )
    return pattern


def read_exclude_file(path: str | os.PathLike[str]) -> list[str]:
    """Return the patterns of an exclude file: one per line, without blanks and comments."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise UsageError(
            f"invalid --exclude-file {os.fspath(path)}: not found; give an existing file"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"invalid --exclude-file {os.fspath(path)}: cannot read it ({exc.strerror}); "
            f"check its permissions"
        ) from None
    lines = os.fsdecode(data).splitlines()
    return [line.rstrip("\r") for line in lines if parse_pattern(line) is not None]


def exclude_patterns_of(snapshot: Snapshot) -> list[str]:
    """Return the exclude patterns a snapshot records; none if absent or malformed."""
    try:
        patterns = json.loads(snapshot.meta.get(EXCLUDE_META, "[]"))
    except ValueError:
        return []
    if not isinstance(patterns, list):
        return []
    return [pattern for pattern in patterns if isinstance(pattern, str)]
