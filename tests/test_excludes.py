"""Exclude patterns: each gitignore rule of the matcher, agreement with `git check-ignore`
on a real folder, and `cas snapshot --exclude` and `--exclude-file` against a real
repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cas.archiver import Archiver, SnapshotOptions
from cas.errors import UsageError
from cas.excludes import ExcludeMatcher, check_pattern, read_exclude_file

# (pattern, path, is folder, excluded)
RULES = [
    # "*" and "?" stay inside one component.
    ("*.tmp", "a.tmp", False, True),
    ("*.tmp", "deep/er/a.tmp", False, True),
    ("*.tmp", "a.tmpx", False, False),
    ("a*", "a/b", False, False),
    ("f?o", "fxo", False, True),
    ("f?o", "fo", False, False),
    ("a?b", "a/b", False, False),
    # Sets, ranges, negated sets; a set never matches "/".
    ("[ab].bin", "b.bin", False, True),
    ("[ab].bin", "c.bin", False, False),
    ("[a-c].bin", "c.bin", False, True),
    ("[!a-c].bin", "d.bin", False, True),
    ("[^a-c].bin", "a.bin", False, False),
    ("x[/]y", "x/y", False, False),
    ("[]].bin", "].bin", False, True),
    ("[z-a].bin", "z.bin", False, True),
    ("[z-a].bin", "m.bin", False, False),
    ("[z-a].bin", "a.bin", False, False),
    ("[!z-a].bin", "a.bin", False, True),
    ("[x", "[x", False, True),
    # "**" at the start, in the middle, at the end; elsewhere it is a "*".
    ("**/logs", "logs", True, True),
    ("**/logs", "a/b/logs", True, True),
    ("a/**/z", "a/z", False, True),
    ("a/**/z", "a/b/c/z", False, True),
    ("a/**/z", "b/a/z", False, False),
    ("a/**", "a/b/c", False, True),
    ("a/**", "a", True, False),
    ("a**z", "abcz", False, True),
    ("a**z", "ab/cz", False, False),
    # A "/" at the start or in the middle anchors at the root.
    ("/top", "top", False, True),
    ("/top", "sub/top", False, False),
    ("sub/top", "sub/top", False, True),
    ("sub/top", "x/sub/top", False, False),
    ("top", "sub/top", False, True),
    # A trailing "/" matches folders only.
    ("cache/", "cache", True, True),
    ("cache/", "cache", False, False),
    ("cache/", "x/cache", True, True),
    ("/cache/", "x/cache", True, False),
    # Backslash escapes and trailing spaces.
    ("\\#notes", "#notes", False, True),
    ("\\!keep", "!keep", False, True),
    ("\\*", "*", False, True),
    ("\\*", "x", False, False),
    ("\\[x]", "[x]", False, True),
    ("name   ", "name", False, True),
    ("name\\ ", "name ", False, True),
    ("name\\ ", "name", False, False),
]


@pytest.mark.parametrize(("pattern", "path", "is_dir", "expected"), RULES)
def test_pattern_rule(pattern, path, is_dir, expected):
    assert ExcludeMatcher([pattern]).excluded(path, is_dir) is expected


def test_last_match_decides():
    matcher = ExcludeMatcher(["*.bin", "!keep.bin", "sub/keep.bin"])
    assert matcher.excluded("a.bin", False)
    assert not matcher.excluded("keep.bin", False)
    assert not matcher.excluded("x/keep.bin", False)
    assert matcher.excluded("sub/keep.bin", False)


def test_comments_and_blanks_match_nothing():
    matcher = ExcludeMatcher(["# *.bin", "", "   ", "!"])
    assert not matcher
    assert not matcher.excluded("a.bin", False)


@pytest.mark.parametrize("pattern", ["", "# comment", "!", "a\nb", "a\0b"])
def test_check_pattern_rejects(pattern):
    with pytest.raises(UsageError, match="invalid --exclude"):
        check_pattern(pattern, "--exclude")


def test_read_exclude_file(tmp_path):
    path = tmp_path / "excludes"
    path.write_bytes(b"# optimizer states\n\noptimizer/\r\n*.tmp\n!keep.tmp\n")
    assert read_exclude_file(path) == ["optimizer/", "*.tmp", "!keep.tmp"]


def test_read_exclude_file_missing(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_exclude_file(tmp_path / "missing")


def test_read_exclude_file_folder(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        read_exclude_file(tmp_path)


# Snapshots


def make_checkpoint(root: Path) -> None:
    files = {
        "model.safetensors": b"weights" * 100,
        "config.json": b"{}",
        "train.log": b"step 1\n",
        "optimizer/state.bin": b"moments" * 100,
        "optimizer/keep.bin": b"keep",
        "sub/model.safetensors": b"inner",
        "sub/scratch.tmp": b"tmp",
        "scratch.tmp": b"tmp",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


def stored_paths(repo, tree_id, prefix=""):
    paths = []
    for node in repo.load_tree(tree_id):
        rel = prefix + node.name.decode()
        paths.append(rel + ("/" if node.type == "dir" else ""))
        if node.type == "dir":
            paths.extend(stored_paths(repo, node.subtree, rel + "/"))
    return sorted(paths)


def test_snapshot_excludes(repo, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    options = SnapshotOptions(exclude=["*.tmp", "*.log", "/optimizer/"])
    result = Archiver(repo, options).run([str(root)])
    assert stored_paths(repo, result.snapshot.tree_id) == [
        "config.json",
        "model.safetensors",
        "sub/",
        "sub/model.safetensors",
    ]
    assert result.excluded == 4
    assert result.files == 3


def test_snapshot_anchored_pattern(repo, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    result = Archiver(repo, SnapshotOptions(exclude=["/model.safetensors"])).run([str(root)])
    paths = stored_paths(repo, result.snapshot.tree_id)
    assert "model.safetensors" not in paths
    assert "sub/model.safetensors" in paths


def test_snapshot_reinclude(repo, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    options = SnapshotOptions(exclude=["optimizer/*", "!optimizer/keep.bin"])
    result = Archiver(repo, options).run([str(root)])
    paths = stored_paths(repo, result.snapshot.tree_id)
    assert "optimizer/keep.bin" in paths
    assert "optimizer/state.bin" not in paths


def test_excluded_folder_not_walked(repo, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    # Walking this folder with --dereference would warn about the dangling link.
    (root / "optimizer" / "dangling").symlink_to(tmp_path / "missing")
    options = SnapshotOptions(exclude=["optimizer/", "!optimizer/keep.bin"], dereference=True)
    result = Archiver(repo, options).run([str(root)])
    assert result.warnings == ()
    assert "optimizer/keep.bin" not in stored_paths(repo, result.snapshot.tree_id)
    assert result.excluded == 1


def test_several_sources_match_base_names(repo, tmp_path):
    for name in ("a", "b"):
        make_checkpoint(tmp_path / name)
    options = SnapshotOptions(exclude=["/b", "a/sub/"])
    result = Archiver(repo, options).run([str(tmp_path / "a"), str(tmp_path / "b")])
    paths = stored_paths(repo, result.snapshot.tree_id)
    assert "b/" not in paths
    assert "a/model.safetensors" in paths
    assert "a/sub/" not in paths


def test_cli_exclude_and_file(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    exclude_file = tmp_path / "excludes"
    exclude_file.write_text("# scratch files\n*.tmp\noptimizer/\n")
    out = run_cas(
        "snapshot", root, "--exclude-file", exclude_file, "--exclude", "*.log", "--json"
    ).stdout
    snapshot_id = json.loads(out)["id"]
    assert json.loads(out)["excluded"] == 4
    listed = json.loads(run_cas("ls", snapshot_id, "--json").stdout)
    names = {entry["path"].lstrip("/") for entry in listed}
    assert not any(name.endswith((".tmp", ".log")) for name in names)
    assert not any(name.startswith("optimizer") for name in names)
    assert "model.safetensors" in names


def test_cli_reversed_range_in_file(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "z.bin").write_bytes(b"z")
    (root / "a.bin").write_bytes(b"a")
    exclude_file = tmp_path / "excludes"
    exclude_file.write_text("[z-a].bin\n")
    out = run_cas("snapshot", root, "--exclude-file", exclude_file, "--json").stdout
    assert json.loads(out)["excluded"] == 1
    listed = json.loads(run_cas("ls", "latest", "--json").stdout)
    names = {entry["path"].lstrip("/") for entry in listed}
    assert "a.bin" in names
    assert "z.bin" not in names


def test_cli_records_patterns(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    exclude_file = tmp_path / "excludes"
    exclude_file.write_text("*.tmp\n")
    run_cas("snapshot", root, "--exclude-file", exclude_file, "--exclude", "optimizer/")
    logged = json.loads(run_cas("log", "--json").stdout)
    assert json.loads(logged[0]["meta"]["cas.exclude"]) == ["*.tmp", "optimizer/"]
    assert "excluded: *.tmp, optimizer/" in run_cas("log").stdout


def test_cli_missing_exclude_file(cli_repo, run_cas, tmp_path):
    result = run_cas("snapshot", tmp_path, "--exclude-file", tmp_path / "nope", expect=2)
    assert "invalid --exclude-file" in result.stderr
    assert "not found" in result.stderr


def test_cli_unreadable_exclude_file(cli_repo, run_cas, tmp_path):
    result = run_cas("snapshot", tmp_path, "--exclude-file", tmp_path, expect=2)
    assert "cannot read it" in result.stderr


def test_cli_empty_exclude_pattern(cli_repo, run_cas, tmp_path):
    result = run_cas("snapshot", tmp_path, "--exclude", "", expect=2)
    assert "invalid --exclude ''" in result.stderr


# Agreement with git

TREE_FILES = [
    "model.safetensors",
    "train.log",
    "scratch.tmp",
    "#notes",
    "!keep",
    "name ",
    "[x]",
    "shard-1.bin",
    "shard-7.bin",
    "optimizer/state.bin",
    "optimizer/keep.bin",
    "optimizer/deep/moments.bin",
    "logs/run.log",
    "sub/logs/run.log",
    "sub/model.safetensors",
    "sub/scratch.tmp",
    "a/b/c/z",
    "a/z",
    "runs/1/events.out.tfevents",
    "runs/2/keep.txt",
]
PATTERN_SETS = [
    ["*.tmp", "*.log"],
    ["/model.safetensors", "sub/"],
    ["optimizer/", "!optimizer/keep.bin"],
    ["optimizer/*", "!optimizer/keep.bin"],
    ["optimizer/**", "!optimizer/deep/"],
    ["logs/"],
    ["/logs/"],
    ["**/logs/run.log"],
    ["a/**/z"],
    ["runs/**", "!runs/2/", "!runs/2/**"],
    ["shard-[0-5].bin", "[!s]*.bin"],
    ["shard-?.bin", "!shard-7.bin"],
    ["shard-[7-1].bin"],
    ["shard-[!7-1].bin", "optimizer/"],
    ["\\#notes", "\\!keep", "name\\ "],
    ["\\[x]", "*.safetensors", "!sub/*.safetensors"],
    ["*", "!*/", "!*.bin"],
]


def walk_excluded(matcher: ExcludeMatcher, rel_path: str, root: Path) -> bool:
    """Return whether the snapshot walk leaves ``rel_path`` out: it or a parent folder matches."""
    parts = rel_path.split("/")
    for depth in range(1, len(parts)):
        if matcher.excluded("/".join(parts[:depth]), True):
            return True
    return matcher.excluded(rel_path, (root / rel_path).is_dir())


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("patterns", PATTERN_SETS, ids=lambda p: " ".join(p))
def test_matches_git_check_ignore(tmp_path, patterns):
    for rel in TREE_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / ".gitignore").write_text("\n".join(patterns) + "\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, capture_output=True)
    folders = sorted({str(Path(rel).parent) for rel in TREE_FILES} - {"."})
    paths = TREE_FILES + folders
    # No user or system configuration, whose core.excludesFile would add patterns.
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    result = subprocess.run(
        ["git", "-C", str(tmp_path), "check-ignore", "--no-index", "--stdin", "-z"],
        input="\0".join(paths) + "\0",
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    ignored_by_git = {path for path in result.stdout.split("\0") if path}
    matcher = ExcludeMatcher(patterns)
    for path in paths:
        expected = path in ignored_by_git
        assert walk_excluded(matcher, path, tmp_path) is expected, path
