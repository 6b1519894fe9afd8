"""The checks that `cas checkout --verify-models --test-command CMD` runs after a restore."""

from __future__ import annotations

import argparse
import sys

from cas.models.verify import ModelCheck, run_test_command, verify_models

from .context import info


def add_verify_options(parser: argparse.ArgumentParser) -> None:
    """Add --verify-models and --test-command to the checkout parser."""
    parser.add_argument(
        "--verify-models",
        action="store_true",
        help="after the restore, parse every model file and check its tensors against its "
        "header and size",
    )
    parser.add_argument(
        "--test-command",
        metavar="CMD",
        default=None,
        help="after the restore, run CMD with /bin/sh in DEST (also in $CAS_CHECKOUT_DIR); "
        "exit code 6 if it fails",
    )


def verify_checkout(args: argparse.Namespace) -> tuple[dict[str, object], str | None]:
    """Run the requested checks on args.dest.

    Return the JSON fields that describe what ran, and the message of the check that
    failed or None. The caller reports a failure after it printed the fields, so a
    script learns which model failed and what the test command returned.
    """
    fields: dict[str, object] = {}
    if args.verify_models:
        checks = verify_models(args.dest)
        fields["models"] = [_check_json(check) for check in checks]
        failed = [check for check in checks if check.error]
        for check in failed:
            print(f"error: {check.path}: {check.error}", file=sys.stderr)
        if failed:
            return fields, (
                f"{len(failed)} of {len(checks)} model files failed verification"
                + ("; the test command was not run" if args.test_command else "")
            )
        info(args, f"verified {len(checks)} model files")
    if args.test_command:
        # With --json, stdout carries only the JSON document, so the command writes to stderr.
        code = run_test_command(args.test_command, args.dest, sys.stderr if args.json else None)
        fields["test_command"] = {"command": args.test_command, "exit_code": code}
        if code != 0:
            return fields, f"the test command {args.test_command!r} failed with exit code {code}"
        info(args, "the test command passed")
    return fields, None


def _check_json(check: ModelCheck) -> dict[str, object]:
    return {
        "path": check.path,
        "format": check.format or None,
        "tensors": check.tensor_count,
        "error": check.error or None,
    }
