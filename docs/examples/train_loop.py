"""Train a small model with numpy and snapshot its checkpoint folder every N steps.

A linear regression takes the place of a real model. Every ``--every`` steps, and once
more at the end of training, the loop writes a checkpoint folder (weights,
optimizer state, a JSON file with the step and loss) and stores it as a snapshot
with the step and loss as metadata. Run it with:

    python docs/examples/train_loop.py --repo /tmp/cas-example --password-file pw.txt

The repository is created on first use. When the checkpoint folder is missing
but the repository holds a snapshot of the run (a new machine, a wiped scratch
disk), the loop checks out the newest one and continues from its step.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import cas


def parse_args() -> argparse.Namespace:
    """Read the command-line options of the example."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True, help="repository folder (created if missing)")
    parser.add_argument("--password-file", required=True, help="file holding the password")
    parser.add_argument("--ckpt", default="ckpt", help="checkpoint folder (default ckpt)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--every", type=int, default=20, help="snapshot every N steps")
    parser.add_argument("--run", default="example-run", help="tag that names the run")
    return parser.parse_args()


def open_repository(url: str, password_file: str) -> cas.Repository:
    """Open the repository, or create it when there is none yet."""
    try:
        return cas.Repository.open(url, password_file=password_file)
    except cas.NotFoundError:
        return cas.Repository.init(url, password_file=password_file)


def save_checkpoint(
    folder: Path, step: int, loss: float, weights: np.ndarray, velocity: np.ndarray
) -> None:
    """Write the checkpoint files; each is written to a temporary name, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"weights.npy": weights, "optimizer.npy": velocity}
    for name, array in arrays.items():
        temporary = folder / f".{name}.tmp"
        with open(temporary, "wb") as file:
            np.save(file, array)
        os.replace(temporary, folder / name)
    (folder / "state.json").write_text(json.dumps({"step": step, "loss": loss}) + "\n")


def resume(repo: cas.Repository, run: str, folder: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """Load the run's newest checkpoint as (step, weights, velocity), step 0 if there is none.

    When the folder is missing, the newest snapshot of the run is checked out into it first.
    """
    snapshots = repo.snapshots(tag=run)
    if not folder.exists() and snapshots:
        restored = repo.checkout(snapshots[-1], folder)
        print(f"restored {restored.files} files of snapshot {snapshots[-1].snapshot_hex[:16]}")
    if not (folder / "state.json").exists():
        return 0, np.zeros(32, dtype=np.float32), np.zeros(32, dtype=np.float32)
    state = json.loads((folder / "state.json").read_text())
    return int(state["step"]), np.load(folder / "weights.npy"), np.load(folder / "optimizer.npy")


def main() -> None:
    """Train, snapshot every N steps and at the end, and print each snapshot."""
    args = parse_args()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 32)).astype(np.float32)
    true_weights = rng.normal(size=32).astype(np.float32)
    targets = features @ true_weights
    folder = Path(args.ckpt)
    with open_repository(args.repo, args.password_file) as repo:
        first_step, weights, velocity = resume(repo, args.run, folder)
        for step in range(first_step + 1, args.steps + 1):
            error = features @ weights - targets
            loss = float(np.mean(error**2))
            gradient = 2 * features.T @ error / len(features)
            velocity = 0.9 * velocity + gradient
            weights = weights - 0.01 * velocity
            last = step == args.steps
            if step % args.every == 0 or last:
                save_checkpoint(folder, step, loss, weights, velocity)
                tags = [args.run, "final"] if last else [args.run]
                result = repo.snapshot(
                    folder,
                    tags=tags,
                    message=f"step {step}",
                    meta={"step": str(step), "loss": f"{loss:.6f}"},
                    exclude=["*.tmp"],
                )
                print(
                    f"step {step}: loss {loss:.4f}, snapshot {result.snapshot.snapshot_hex[:16]}, "
                    f"{result.bytes_added} bytes added"
                )


if __name__ == "__main__":
    main()
