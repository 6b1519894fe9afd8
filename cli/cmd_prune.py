"""`cas prune`: remove snapshots by a retention policy, or by name."""

from __future__ import annotations

import argparse
import contextlib
import sys

from cas.errors import IntegrityError, NotFoundError, UnsupportedFormatError, UsageError
from cas.history import delete_replaced
from cas.locks import RepositoryLock
from cas.prune import (
    DEFAULT_GROUP_BY,
    Decision,
    GroupDecision,
    KeepPolicy,
    apply_policy,
    check_not_emptied,
    parse_duration,
    parse_group_by,
)
from cas.repository import Repository
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot

from .cmd_unlock import add_wait_option
from .context import info, open_repository, plural, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "prune",
        parents=[parent],
        help="remove snapshots by a retention policy or by id; `cas gc` then reclaims space",
    )
    parser.add_argument(
        "snapshots", nargs="*", metavar="ID", help="snapshots to remove (instead of a policy)"
    )
    parser.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep the N newest")
    for period in ("hourly", "daily", "weekly", "monthly", "yearly"):
        parser.add_argument(
            f"--keep-{period}",
            type=int,
            default=0,
            metavar="N",
            help=f"keep the newest snapshot of each of the last N {_PERIOD_NAMES[period]} "
            f"that have one",
        )
    parser.add_argument(
        "--keep-within",
        default=None,
        metavar="DURATION",
        help="keep snapshots at most DURATION (such as 7d, 12h, 2w, 1y, 30m) older than the "
        "newest of their group",
    )
    parser.add_argument(
        "--keep-tag", action="append", default=[], metavar="TAG", help="keep snapshots tagged TAG"
    )
    parser.add_argument(
        "--group-by",
        default=",".join(DEFAULT_GROUP_BY),
        metavar="FIELDS",
        help="apply the policy per group of these fields: host, paths, tags, comma-separated; "
        "an empty string makes one group (default host,paths)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be removed and why the rest stays"
    )
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="allow the policy to remove every snapshot of a group",
    )
    add_wait_option(parser)
    parser.set_defaults(run=run)


_PERIOD_NAMES = {
    "hourly": "hours",
    "daily": "days",
    "weekly": "weeks",
    "monthly": "months",
    "yearly": "years",
}


def policy_of(args: argparse.Namespace) -> KeepPolicy:
    """Return the keep policy that the options give."""
    within = parse_duration(args.keep_within) if args.keep_within is not None else None
    return KeepPolicy(
        last=args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
        within=within,
        within_text=args.keep_within or "",
        tags=frozenset(args.keep_tag),
    )


def _decide(args: argparse.Namespace, repo: Repository) -> list[GroupDecision]:
    """Return the groups with their decisions, by policy or by the named snapshots."""
    policy = policy_of(args)
    if args.snapshots:
        if not policy.empty:
            raise UsageError("give either snapshot ids or keep rules, not both")
        named = {repo.resolve_snapshot(name).snapshot_hex for name in args.snapshots}
        snapshots = [snap for snap in repo.list_snapshots() if snap.snapshot_hex in named]
        return [GroupDecision({}, [Decision(snap) for snap in snapshots])]
    groups = apply_policy(repo.list_snapshots(), policy, parse_group_by(args.group_by))
    if not args.allow_empty:
        check_not_emptied(groups)
    return groups


def _snapshot_json(snapshot: Snapshot, reasons: list[str] | None = None) -> dict[str, object]:
    item: dict[str, object] = {
        "id": snapshot.snapshot_hex,
        "time": snapshot.time,
        "host": snapshot.host,
        "tags": list(snapshot.tags),
    }
    if reasons is not None:
        item["reasons"] = reasons
    return item


def _split_unreadable(args: argparse.Namespace, repo: Repository) -> list[str]:
    """Take out of ``args.snapshots`` the full ids whose snapshot objects do not load.

    Such an object blocks gc, which must read every snapshot to mark its blobs,
    and no other command can remove it, so `cas prune ID` deletes it when given
    its full id (never a prefix, so a typo cannot select it).
    """
    names = set(repo.snapshot_names())
    unreadable, readable = [], []
    for name in args.snapshots:
        if len(name) == 64 and name.lower() in names:
            try:
                repo.load_snapshot(name.lower())
            except (IntegrityError, UnsupportedFormatError) as exc:
                print(
                    f"warning: snapshot {name} is unreadable ({exc}); removing it", file=sys.stderr
                )
                unreadable.append(name.lower())
                continue
        readable.append(name)
    args.snapshots = readable
    return unreadable


def run(args: argparse.Namespace) -> int:
    """Decide, then delete the snapshot objects under the exclusive lock."""
    with open_repository(args) as repo:
        unreadable = _split_unreadable(args, repo) if args.snapshots else []
        if args.dry_run:
            groups = _decide(args, repo) if args.snapshots or not unreadable else []
        else:
            with RepositoryLock(
                repo.backend, repo.keys, exclusive=True, operation="prune", wait=args.wait
            ):
                groups = _decide(args, repo) if args.snapshots or not unreadable else []
                doomed = [snap.snapshot_hex for group in groups for snap in group.removed]
                # Objects replaced by a tag change go first: deleted after their
                # replacement, they would be visible again until then.
                if groups:
                    delete_replaced(repo)
                for snapshot_hex in doomed + unreadable:
                    with contextlib.suppress(NotFoundError):
                        repo.backend.delete(SNAPSHOT_PREFIX + snapshot_hex)
    _report(args, groups)
    return 0


def _report(args: argparse.Namespace, groups: list[GroupDecision]) -> None:
    removed = [snap for group in groups for snap in group.removed]
    kept = [snap for group in groups for snap in group.kept]
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "groups": [
                    {
                        "key": group.key,
                        "keep": [
                            _snapshot_json(d.snapshot, d.reasons) for d in group.decisions if d.keep
                        ],
                        "remove": [_snapshot_json(snap) for snap in group.removed],
                    }
                    for group in groups
                ],
                "kept_count": len(kept),
                "removed_count": len(removed),
            }
        )
        return
    for group in groups:
        if group.key:
            info(args, "group " + ", ".join(f"{k}={v}" for k, v in group.key.items()))
        for decision in group.decisions:
            snap = decision.snapshot
            if decision.keep:
                reasons = "; ".join(decision.reasons)
                info(args, f"  keep   {snap.snapshot_hex[:16]} {snap.time}  {reasons}")
            else:
                info(args, f"  remove {snap.snapshot_hex[:16]} {snap.time}")
    verb = "would remove" if args.dry_run else "removed"
    info(
        args,
        f"{verb} {plural(len(removed), 'snapshot')}, kept {len(kept)}; "
        "run `cas gc` to reclaim space",
    )
