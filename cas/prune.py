"""Retention policy for `cas prune`: which snapshots to keep, and why.

This module is pure logic over `Snapshot` records; it reads and deletes
nothing, so it is tested without a repository. The command applies the
result under the exclusive lock.

Rules, applied to each group of snapshots (same host and paths by default)
independently, newest snapshot first:

- ``last N``: the N newest snapshots.
- ``hourly/daily/weekly/monthly/yearly N``: the newest snapshot of each of the
  N newest periods that contain a snapshot.
- ``within D``: every snapshot at most D older than the newest of its group.
- ``tag T``: every snapshot carrying tag T.

A snapshot is kept when any rule keeps it, and every rule that keeps it is
recorded as a reason. Calendar periods use the wall-clock time in the UTC
offset stored with each snapshot, so the change to or from daylight-saving
time neither merges two days into one nor splits one day into two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cas.errors import UsageError
from cas.snapshot import Snapshot

GROUP_FIELDS = ("host", "paths", "tags")
DEFAULT_GROUP_BY = ("host", "paths")

_DURATION_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    "y": timedelta(days=365),
}
_DURATION_PART = re.compile(r"(\d+)([smhdwy])")


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``30m``, ``12h``, ``7d``, ``2w``, ``1y`` or ``1d12h``.

    Units: s seconds, m minutes, h hours, d days, w weeks, y 365 days.
    """
    stripped = text.strip().lower()
    parts = _DURATION_PART.findall(stripped)
    if not stripped or "".join(number + unit for number, unit in parts) != stripped:
        raise UsageError(
            f"invalid duration {text!r}: write a number and a unit (s, m, h, d, w, y), "
            f"such as 30m, 12h, 7d or 1d12h"
        )
    total = timedelta()
    for number, unit in parts:
        total += int(number) * _DURATION_UNITS[unit]
    return total


def parse_group_by(text: str) -> tuple[str, ...]:
    """Parse ``--group-by``: a comma-separated subset of host, paths, tags; empty for none."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in GROUP_FIELDS]
    if unknown:
        raise UsageError(
            f"invalid --group-by field {unknown[0]!r}: use a comma-separated list of "
            f"{', '.join(GROUP_FIELDS)}, or an empty string for one group"
        )
    return names


@dataclass(frozen=True)
class KeepPolicy:
    """How many snapshots each rule keeps; 0 or None turns a rule off."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    within_text: str = ""
    tags: frozenset[str] = frozenset()

    def validate(self) -> None:
        """Raise `UsageError` for a negative count or a policy that keeps nothing."""
        for name, count in self._counts():
            if count < 0:
                raise UsageError(f"invalid --keep-{name} {count}: use a positive count")
        if self.within is not None and self.within <= timedelta():
            raise UsageError("invalid --keep-within: use a positive duration")
        if self.empty:
            raise UsageError(
                "no keep rule given: pass at least one of --keep-last, --keep-hourly, "
                "--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within "
                "or --keep-tag, or name the snapshots to remove"
            )

    @property
    def empty(self) -> bool:
        """Whether no rule is set."""
        counts_off = all(count == 0 for _, count in self._counts())
        return counts_off and self.within is None and not self.tags

    def _counts(self) -> list[tuple[str, int]]:
        return [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]


@dataclass
class Decision:
    """One snapshot's fate: kept with the reasons, or removed (no reasons)."""

    snapshot: Snapshot
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        """Whether some rule keeps the snapshot."""
        return bool(self.reasons)


@dataclass
class GroupDecision:
    """The decisions for one group, newest snapshot first."""

    key: dict[str, object]
    decisions: list[Decision]

    @property
    def kept(self) -> list[Snapshot]:
        """Snapshots that stay."""
        return [decision.snapshot for decision in self.decisions if decision.keep]

    @property
    def removed(self) -> list[Snapshot]:
        """Snapshots to delete."""
        return [decision.snapshot for decision in self.decisions if not decision.keep]


def _hour_key(moment: datetime) -> tuple[object, ...]:
    # The offset is part of the key: when clocks go back, the repeated wall-clock
    # hour is a different real hour and gets its own bucket.
    return (moment.year, moment.month, moment.day, moment.hour, moment.utcoffset())


def _week_key(moment: datetime) -> tuple[object, ...]:
    iso = moment.isocalendar()
    return (iso.year, iso.week)


_CALENDAR_RULES: list[tuple[str, Callable[[datetime], tuple[object, ...]], str]] = [
    ("hourly", _hour_key, "%Y-%m-%d %H:00%z"),
    ("daily", lambda moment: (moment.year, moment.month, moment.day), "%Y-%m-%d"),
    ("weekly", _week_key, "%G-W%V"),
    ("monthly", lambda moment: (moment.year, moment.month), "%Y-%m"),
    ("yearly", lambda moment: (moment.year,), "%Y"),
]


def group_key(snapshot: Snapshot, group_by: Iterable[str]) -> dict[str, object]:
    """Return the group a snapshot belongs to, as a JSON-friendly map."""
    key: dict[str, object] = {}
    for name in group_by:
        if name == "host":
            key["host"] = snapshot.host
        elif name == "paths":
            key["paths"] = sorted(path.decode(errors="backslashreplace") for path in snapshot.paths)
        elif name == "tags":
            key["tags"] = sorted(snapshot.tags)
    return key


def apply_policy(
    snapshots: Iterable[Snapshot],
    policy: KeepPolicy,
    group_by: Iterable[str] = DEFAULT_GROUP_BY,
) -> list[GroupDecision]:
    """Decide, group by group, which snapshots the policy keeps and why."""
    policy.validate()
    fields = tuple(group_by)
    groups: dict[str, tuple[dict[str, object], list[Snapshot]]] = {}
    for snapshot in snapshots:
        key = group_key(snapshot, fields)
        groups.setdefault(repr(key), (key, []))[1].append(snapshot)
    result = []
    for _text, (key, members) in sorted(groups.items()):
        ordered = sorted(members, key=lambda snap: (snap.datetime, snap.snapshot_hex), reverse=True)
        result.append(GroupDecision(key, _decide_group(ordered, policy)))
    return result


def _decide_group(newest_first: list[Snapshot], policy: KeepPolicy) -> list[Decision]:
    decisions = [Decision(snapshot) for snapshot in newest_first]
    for number, decision in enumerate(decisions[: policy.last], start=1):
        decision.reasons.append(f"last {number} of {policy.last}")
    for name, key_of, label_format in _CALENDAR_RULES:
        _apply_calendar(decisions, name, getattr(policy, name), key_of, label_format)
    if policy.within is not None and decisions:
        cutoff = decisions[0].snapshot.datetime - policy.within
        for decision in decisions:
            if decision.snapshot.datetime >= cutoff:
                decision.reasons.append(f"within {policy.within_text or policy.within}")
    for decision in decisions:
        for tag in sorted(policy.tags & set(decision.snapshot.tags)):
            decision.reasons.append(f"tag {tag}")
    return decisions


def _apply_calendar(
    decisions: list[Decision],
    name: str,
    count: int,
    key_of: Callable[[datetime], tuple[object, ...]],
    label_format: str,
) -> None:
    """Keep the newest snapshot of each of the ``count`` newest periods that have one."""
    last_key: tuple[object, ...] | None = None
    kept = 0
    for decision in decisions:
        if kept >= count:
            return
        moment = decision.snapshot.datetime
        key = key_of(moment)
        if key == last_key:
            continue
        last_key = key
        kept += 1
        decision.reasons.append(f"{name} {moment.strftime(label_format)} ({kept} of {count})")


def check_not_emptied(groups: list[GroupDecision]) -> None:
    """Raise `UsageError` if the policy would remove every snapshot of some group."""
    for group in groups:
        if group.decisions and not group.kept:
            raise UsageError(
                f"the policy would remove all {len(group.decisions)} snapshots of group "
                f"{group.key or 'of the whole repository'}; add a keep rule that matches "
                f"them, or pass --allow-empty"
            )
