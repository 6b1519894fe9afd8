"""Retention policy of `cas prune`: each keep rule, groups, daylight-saving offsets, and the
command line against a real repository."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from cas.errors import UsageError
from cas.prune import (
    KeepPolicy,
    apply_policy,
    check_not_emptied,
    parse_duration,
    parse_group_by,
)
from cas.snapshot import Snapshot

CET = timezone(timedelta(hours=1))
CEST = timezone(timedelta(hours=2))


def make_snapshot(
    time: datetime, host: str = "node1", paths: tuple[bytes, ...] = (b"/ckpt",), tags=()
) -> Snapshot:
    """Return a snapshot record whose id encodes its time, so failures name it."""
    stamp = time.isoformat()
    snapshot_id = stamp.encode().ljust(32, b"\0")[:32]
    return Snapshot(
        snapshot_id=snapshot_id,
        time=stamp,
        host=host,
        user="u",
        paths=paths,
        tree_id=bytes(32),
        tags=tuple(tags),
    )


def kept_times(snapshots, policy, group_by=("host", "paths")) -> list[str]:
    groups = apply_policy(snapshots, policy, group_by)
    return sorted(snap.time for group in groups for snap in group.kept)


def hourly_series(start: datetime, count: int, step: timedelta) -> list[Snapshot]:
    return [make_snapshot(start + step * number) for number in range(count)]


DAY = timedelta(days=1)


# Durations and group fields


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1y", timedelta(days=365)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_parse_duration_units(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d7", "7x", "1.5d", "7d 2h", "-1d"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_parse_group_by_fields():
    assert parse_group_by("host,tags") == ("host", "tags")
    assert parse_group_by("") == ()
    with pytest.raises(UsageError):
        parse_group_by("host,user")


# Each rule


def test_keep_last_newest():
    snaps = hourly_series(datetime(2026, 3, 1, tzinfo=UTC), 6, timedelta(hours=1))
    kept = kept_times(snaps, KeepPolicy(last=2))
    assert kept == [snaps[4].time, snaps[5].time]


def test_keep_hourly_one_per_hour():
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    snaps = hourly_series(start, 8, timedelta(minutes=20))  # 10:00 .. 12:20
    kept = kept_times(snaps, KeepPolicy(hourly=2))
    # The newest of 12:xx (12:20) and of 11:xx (11:40).
    assert kept == [snaps[5].time, snaps[7].time]


def test_keep_daily_newest_each_day():
    start = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    snaps = [
        make_snapshot(start + DAY * day + timedelta(hours=h)) for day in range(4) for h in (0, 6)
    ]
    kept = kept_times(snaps, KeepPolicy(daily=3))
    expected = [(start + DAY * day + timedelta(hours=6)).isoformat() for day in (1, 2, 3)]
    assert kept == expected


def test_keep_daily_skips_empty_days():
    times = [datetime(2026, 5, day, 12, tzinfo=UTC) for day in (1, 2, 9, 10)]
    kept = kept_times([make_snapshot(t) for t in times], KeepPolicy(daily=3))
    assert kept == [t.isoformat() for t in times[1:]]


def test_keep_weekly_iso_weeks():
    # 2026-01-04 is a Sunday: it closes ISO week 1, and Monday 2026-01-05 opens week 2.
    times = [
        datetime(2026, 1, 3, tzinfo=UTC),
        datetime(2026, 1, 4, tzinfo=UTC),
        datetime(2026, 1, 5, tzinfo=UTC),
        datetime(2026, 1, 6, tzinfo=UTC),
    ]
    kept = kept_times([make_snapshot(t) for t in times], KeepPolicy(weekly=5))
    assert kept == [times[1].isoformat(), times[3].isoformat()]


def test_keep_monthly_and_yearly():
    times = [
        datetime(2024, 12, 31, tzinfo=UTC),
        datetime(2025, 6, 1, tzinfo=UTC),
        datetime(2025, 6, 20, tzinfo=UTC),
        datetime(2025, 7, 2, tzinfo=UTC),
    ]
    snaps = [make_snapshot(t) for t in times]
    assert kept_times(snaps, KeepPolicy(monthly=2)) == [times[2].isoformat(), times[3].isoformat()]
    assert kept_times(snaps, KeepPolicy(yearly=5)) == [times[0].isoformat(), times[3].isoformat()]


def test_keep_within_relative_to_newest():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = hourly_series(start, 10, DAY)
    kept = kept_times(snaps, KeepPolicy(within=timedelta(days=3), within_text="3d"))
    assert kept == [snap.time for snap in snaps[6:]]


def test_keep_tag_any_age():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = [make_snapshot(start + DAY * n, tags=("best",) if n == 1 else ()) for n in range(5)]
    kept = kept_times(snaps, KeepPolicy(last=1, tags=frozenset({"best"})))
    assert kept == [snaps[1].time, snaps[4].time]


def test_reasons_name_every_rule():
    start = datetime(2026, 2, 1, 12, tzinfo=UTC)
    snaps = [make_snapshot(start + DAY * n, tags=("best",)) for n in range(2)]
    policy = KeepPolicy(last=1, daily=1, tags=frozenset({"best"}), within=DAY, within_text="1d")
    (group,) = apply_policy(snaps, policy)
    newest = group.decisions[0]
    assert newest.snapshot.time == snaps[1].time
    assert newest.reasons == ["last 1 of 1", "daily 2026-02-02 (1 of 1)", "within 1d", "tag best"]
    assert group.decisions[1].reasons == ["within 1d", "tag best"]


def test_rules_combine_as_union():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = hourly_series(start, 10, DAY)
    kept = kept_times(snaps, KeepPolicy(last=2, weekly=2))
    # Weeks: Feb 2-8 is ISO week 6 and Feb 9-10 week 7. Last keeps the 9th and 10th; weekly
    # keeps the 10th (week 7) and the 8th (week 6).
    assert kept == [snaps[7].time, snaps[8].time, snaps[9].time]


# Daylight-saving time


def test_daily_across_dst_start():
    # Europe changes from +01:00 to +02:00 on 2026-03-29. A snapshot at 00:30 local time every
    # day is 23:30 UTC the day before while on +01:00, and 22:30 UTC while on +02:00.
    days = range(26, 33)
    times = [
        datetime(2026, 3, day, 0, 30, tzinfo=CET if day < 29 else CEST)
        if day <= 31
        else datetime(2026, 4, day - 31, 0, 30, tzinfo=CEST)
        for day in days
    ]
    # A second snapshot late on the evening of the change day, 23:45 +02:00.
    extra = datetime(2026, 3, 29, 23, 45, tzinfo=CEST)
    snaps = [make_snapshot(t) for t in [*times, extra]]
    kept = kept_times(snaps, KeepPolicy(daily=7))
    expected = sorted(t.isoformat() for t in times if t.day != 29 or t.month != 3)
    expected = sorted([*expected, extra.isoformat()])
    # Seven local days, one snapshot each: the 29th keeps only its latest snapshot.
    assert kept == expected
    assert len(kept) == 7


def test_daily_across_dst_end():
    # Back from +02:00 to +01:00 on 2026-10-25: snapshots at 23:30 local time each day.
    times = [
        datetime(2026, 10, day, 23, 30, tzinfo=CEST if day < 25 else CET) for day in range(22, 29)
    ]
    kept = kept_times([make_snapshot(t) for t in times], KeepPolicy(daily=7))
    assert kept == sorted(t.isoformat() for t in times)
    # Local dates give exactly one snapshot per day, although the offset changes midweek.
    assert len({datetime.fromisoformat(t).date() for t in kept}) == 7


def test_hourly_repeated_hour_at_dst_end():
    # 02:30 happens twice on 2026-10-25: at +02:00 (00:30Z) and at +01:00 (01:30Z).
    first = datetime(2026, 10, 25, 2, 30, tzinfo=CEST)
    second = datetime(2026, 10, 25, 2, 30, tzinfo=CET)
    snaps = [make_snapshot(first), make_snapshot(second)]
    kept = kept_times(snaps, KeepPolicy(hourly=2))
    assert kept == sorted([first.isoformat(), second.isoformat()])


def test_weekly_dst_week_one_snapshot():
    # Daily snapshots at 00:15 local time through the week of the change (Mon 23 to Sun 29 March).
    times = [
        datetime(2026, 3, day, 0, 15, tzinfo=CET if day < 29 else CEST) for day in range(23, 31)
    ]
    kept = kept_times([make_snapshot(t) for t in times], KeepPolicy(weekly=2))
    # Sunday 29 (week 13) in local time, though 22:15Z on Saturday; Monday 30 opens week 14.
    assert kept == [times[6].isoformat(), times[7].isoformat()]


# Groups and refusals


def test_groups_by_host_and_paths():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = [
        make_snapshot(start, host="a"),
        make_snapshot(start + DAY, host="a"),
        make_snapshot(start, host="b"),
        make_snapshot(start + DAY, host="a", paths=(b"/other",)),
    ]
    groups = apply_policy(snaps, KeepPolicy(last=1))
    assert len(groups) == 3
    kept = sorted((snap.host, snap.time) for group in groups for snap in group.kept)
    assert kept == [("a", snaps[1].time), ("a", snaps[3].time), ("b", snaps[2].time)]


def test_group_by_empty_one_group():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = [make_snapshot(start + DAY * n, host=f"h{n}") for n in range(3)]
    groups = apply_policy(snaps, KeepPolicy(last=1), ())
    assert len(groups) == 1
    assert [snap.host for snap in groups[0].kept] == ["h2"]


def test_group_by_tags():
    start = datetime(2026, 2, 1, tzinfo=UTC)
    snaps = [
        make_snapshot(start + DAY * n, tags=("run-1",) if n < 2 else ("run-2",)) for n in range(4)
    ]
    groups = apply_policy(snaps, KeepPolicy(last=1), ("tags",))
    assert sorted(snap.time for group in groups for snap in group.kept) == [
        snaps[1].time,
        snaps[3].time,
    ]


def test_policy_without_rules_rejected():
    with pytest.raises(UsageError, match="no keep rule"):
        apply_policy([], KeepPolicy())


def test_negative_count_rejected():
    with pytest.raises(UsageError):
        apply_policy([], KeepPolicy(last=-1))


def test_emptied_group_refused():
    snaps = [make_snapshot(datetime(2026, 2, 1, tzinfo=UTC))]
    groups = apply_policy(snaps, KeepPolicy(tags=frozenset({"best"})))
    with pytest.raises(UsageError, match="allow-empty"):
        check_not_emptied(groups)


# Command line


def cas_json(run_cas, *args, expect=0):
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


def take_snapshots(run_cas, source: Path, tags_per_run) -> list[str]:
    ids = []
    for number, tags in enumerate(tags_per_run):
        (source / "weights.bin").write_bytes(os.urandom(64 << 10) + bytes([number]))
        tag_args = [arg for tag in tags for arg in ("--tag", tag)]
        ids.append(cas_json(run_cas, "snapshot", source, *tag_args)["id"])
    return ids


def listed_ids(run_cas) -> set[str]:
    return {item["id"] for item in cas_json(run_cas, "log")}


def test_prune_cli_dry_run_reasons(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    ids = take_snapshots(run_cas, source, [["best"], [], [], []])
    report = cas_json(run_cas, "prune", "--keep-last", "2", "--keep-tag", "best", "--dry-run")
    assert report["dry_run"] is True
    (group,) = report["groups"]
    reasons = {item["id"]: item["reasons"] for item in group["keep"]}
    assert reasons == {ids[3]: ["last 1 of 2"], ids[2]: ["last 2 of 2"], ids[0]: ["tag best"]}
    assert [item["id"] for item in group["remove"]] == [ids[1]]
    assert listed_ids(run_cas) == set(ids)


def test_prune_cli_removes(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    ids = take_snapshots(run_cas, source, [[], [], []])
    report = cas_json(run_cas, "prune", "--keep-last", "1")
    assert report["removed_count"] == 2
    assert listed_ids(run_cas) == {ids[2]}


def test_prune_cli_named_snapshots(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    ids = take_snapshots(run_cas, source, [[], [], []])
    run_cas("prune", ids[0][:8], ids[1])
    assert listed_ids(run_cas) == {ids[2]}


def test_prune_cli_refusals(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    ids = take_snapshots(run_cas, source, [[], []])
    no_rule = run_cas("prune", expect=2)
    assert "no keep rule" in no_rule.stderr
    emptied = run_cas("prune", "--keep-tag", "best", expect=2)
    assert "--allow-empty" in emptied.stderr
    both = run_cas("prune", ids[0], "--keep-last", "1", expect=2)
    assert "not both" in both.stderr
    assert listed_ids(run_cas) == set(ids)
    run_cas("prune", "--keep-tag", "best", "--allow-empty")
    assert listed_ids(run_cas) == set()
