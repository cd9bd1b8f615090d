"""The hyperparameter search against the default command on trashnet: validation loss, test accuracy, time.

    python bench/tune_trashnet.py [--workspace DIR] [--trials 30] [--max-minutes 15] [--tuners bayesian,hyperband]

In one workspace (8:1:1 split seeded 0, the default), runs the default training command, then one
`scripts/tune.py` search per tuner (each its own tuning folder; backbone features computed once and cached
for all), then `scripts/machine_learning.py --config best.json` of the first tuner's search. Prints a
markdown table: best validation loss, test accuracy, wall time, trials done. The target of issue 21: the
search within --max-minutes, a lower validation loss than the default's, and at least +1 point on test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cats_dogs import ROOT, machine, seeded_keras_home, versions  # noqa: E402

TRASHNET = ROOT.parent / "shared" / "datasets" / "trashnet"
CATEGORIES = "cardboard,glass,metal,paper,plastic,trash"


def run(script: str, *args: str, env: dict, log: Path) -> float:
    """Run scripts/<script> to its end, its output in `log`; returns the wall time in seconds."""
    started = time.monotonic()
    with open(log, "w") as handle:
        code = subprocess.call(
            [sys.executable, str(ROOT / "scripts" / script), *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if code != 0:
        raise SystemExit(f"{script} failed ({code}); see {log}")
    return time.monotonic() - started


def newest_run(workspace: Path) -> dict:
    run = (workspace / "runs" / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "run": run.name,
        "validation_loss": metrics["training"]["best_validation"]["val_loss"],
        "test_accuracy": metrics["test_accuracy"],
        "epochs": metrics["training"]["epochs_run"],
    }


def measure(workspace: Path, trials: int, minutes: float, tuners: list[str], env: dict) -> list[dict]:
    data = ("--workspace", str(workspace), "--images-dir", str(TRASHNET), "--categories", CATEGORIES)
    rows = []
    seconds = run("machine_learning.py", *data, env=env, log=workspace / "default.log")
    rows.append({"what": "default command", "seconds": seconds, **newest_run(workspace)})
    best_files = []
    for tuner in tuners:
        before = set((workspace / "tuning").glob("*")) if (workspace / "tuning").is_dir() else set()
        seconds = run("tune.py", *data, "--trials", str(trials), "--max-minutes", str(minutes), "--tuner", tuner,
                      env=env, log=workspace / f"tune-{tuner}.log")  # fmt: skip
        (folder,) = set((workspace / "tuning").glob("*")) - before
        best = json.loads((folder / "best.json").read_text())
        best_files.append(folder / "best.json")
        rows.append({
            "what": f"tune.py --tuner {tuner} (its best trial, trained at the end)", "seconds": seconds,
            "search_loss": best["search"]["validation_loss"], "trials": best["search"]["trials"],
            **newest_run(workspace),
        })  # fmt: skip
    seconds = run("machine_learning.py", "--workspace", str(workspace), "--config", str(best_files[0]), env=env,
                  log=workspace / "config.log")  # fmt: skip
    rows.append({"what": f"--config best.json of {tuners[0]}", "seconds": seconds, **newest_run(workspace)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| command | trials | best trial val_loss | run val_loss | test accuracy | epochs | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        search = f"{row['search_loss']:.4f}" if "search_loss" in row else "-"
        lines.append(
            f"| {row['what']} | {row.get('trials', '-')} | {search} | {row['validation_loss']:.4f} | "
            f"{100 * row['test_accuracy']:.1f}% | {row['epochs']} | {row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workspace", type=Path, help="reuse this workspace (its cached features); default: a new one"
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-minutes", type=float, default=15)
    parser.add_argument("--tuners", default="bayesian,hyperband")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as scratch:
        env = {**os.environ, "KERAS_HOME": str(seeded_keras_home(Path(scratch) / "keras"))}
        workspace = args.workspace or Path(scratch) / "ws"
        workspace.mkdir(parents=True, exist_ok=True)
        rows = measure(workspace, args.trials, args.max_minutes, args.tuners.split(","), env)
    print(f"- Machine: {machine()}\n- Libraries: {versions()}\n- Data: {TRASHNET} (8:1:1, seed 0)\n")
    print(table(rows))
    default, tuned = rows[0], rows[-1]
    print(
        f"\nTest accuracy of --config best.json {100 * tuned['test_accuracy']:.1f}% vs the default's "
        f"{100 * default['test_accuracy']:.1f}% ({100 * (tuned['test_accuracy'] - default['test_accuracy']):+.1f} "
        f"points; target +1.0): {'met' if tuned['test_accuracy'] - default['test_accuracy'] >= 0.01 else 'NOT met'}"
    )
    searches = [row for row in rows if "search_loss" in row]
    for row in searches:
        print(
            f"{row['what']}: {row['trials']} trials in {row['seconds'] / 60:.1f} min (target: at most "
            f"{args.max_minutes:g}); best trial val_loss {row['search_loss']:.4f} vs the default run's "
            f"{default['validation_loss']:.4f}"
        )


if __name__ == "__main__":
    main()
