"""Counts in the CLI's summary lines take the singular for one: "1 file", not "1 files"."""

from __future__ import annotations

from cas_cli.context import plural


def test_plural_forms() -> None:
    assert plural(0, "file") == "0 files"
    assert plural(1, "file") == "1 file"
    assert plural(2, "snapshot") == "2 snapshots"


def test_snapshot_summary_singular(cli_repo, run_cas, tmp_path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "only.bin").write_bytes(b"one file")

    result = run_cas("snapshot", source)

    assert "saved: 1 file," in result.stdout
