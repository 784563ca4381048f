"""Benchmark 3, summary: every row at its best prefix learning rate of the grid (reads results JSON).

    python benchmarks/bench_learning.py                                   # lr 1e-2 (default), every row
    python benchmarks/bench_learning.py --rows 0 1 2 3 4 5 --prefix-lr 3e-3 --out benchmarks/results/learning_lr3e-3.json
    python benchmarks/bench_learning.py --rows 0 1 2 3 4 5 --prefix-lr 1e-3 --out benchmarks/results/learning_lr1e-3.json
    python benchmarks/learning_grid.py                                    # the tables of docs/benchmarks.md

The rows share one pretrained model, data order and budget; only the prefix
learning rate differs between the files. For every (task, row) the learning
rate with the best mean exact match over seeds is chosen, on the same held-out
inputs that are reported (optimistic, but equally so for every row; full
fine-tuning has its own fixed learning rate). Prints the best-of-grid table and
the whole grid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("learning.json", "learning_lr3e-3.json", "learning_lr1e-3.json")


def load_grid(results: Path = RESULTS) -> list[dict]:
    """The learning results files of the grid that exist (the default-lr run first)."""
    return [json.loads((results / name).read_text()) for name in FILES if (results / name).exists()]


def seed_values(data: dict, task: str, row: str, key: str = "exact") -> list[float]:
    """The final ``key`` (exact / teacher_forced) of every seed of one (task, row) in a results dict."""
    return [data["runs"][f"{task}|{row}|{s}"]["final"][key] for s in data["settings"]["seeds"]
            if f"{task}|{row}|{s}" in data["runs"]]


def rows_of(data: dict) -> list[str]:
    out = []
    for key in data["runs"]:
        row = key.split("|")[1]
        if row not in out:
            out.append(row)
    return out


def best_of_grid(grid: list[dict]) -> dict:
    """A results dict like one file's, each (task, row) taken from the file where its mean is best."""
    base = grid[0]
    merged = {**base, "runs": {}, "chosen_lr": {}}
    for task in base["settings"]["tasks"]:
        for row in rows_of(base):
            candidates = [(statistics.mean(seed_values(d, task, row)), d) for d in grid if seed_values(d, task, row)]
            _, best = max(candidates, key=lambda c: c[0])  # ties: the earlier file (default lr)
            lr = "own" if row == "full fine-tuning" else best["settings"]["prefix_lr"]
            merged["chosen_lr"][f"{task}|{row}"] = lr
            for seed in base["settings"]["seeds"]:
                merged["runs"][f"{task}|{row}|{seed}"] = best["runs"][f"{task}|{row}|{seed}"]
    return merged


def percent_cell(values: list[float]) -> str:
    """``mean ± std`` in percent (just the mean for one seed), as the learning tables print it."""
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    grid = load_grid(args.results)
    if not grid:
        print(f"no learning results in {args.results}: run benchmarks/bench_learning.py first")
        return 1
    best = best_of_grid(grid)
    tasks = best["settings"]["tasks"]
    lines = ["| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in rows_of(best):
        cells = []
        for task in tasks:
            lr = best["chosen_lr"][f"{task}|{row}"]
            note = "" if lr == "own" else f" (lr {lr:g})"
            cells.append(percent_cell(seed_values(best, task, row)) + note)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    print("Exact match (%) of generate(), mean ± std over seeds, each row at its best prefix learning rate")
    print("\n".join(lines))
    lrs = [d["settings"]["prefix_lr"] for d in grid]
    header = "| row | " + " | ".join(f"{t} @ {lr:g}" for t in tasks for lr in lrs) + " |"
    lines = [header, "|---|" + "---|" * (len(tasks) * len(lrs))]
    for row in rows_of(grid[0]):
        if row == "full fine-tuning":
            continue
        cells = []
        for task in tasks:
            for data in grid:
                values = seed_values(data, task, row)
                cells.append(f"{100 * statistics.mean(values):.1f}" if values else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    print("\nThe grid: mean exact match (%) per prefix learning rate")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
