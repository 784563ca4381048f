"""Pool the bracketed rounds of several bench_generate.py runs (reads the round logs they print).

    python benchmarks/bench_generate.py --part main 2> benchmarks/results/generate_main.log
    python benchmarks/pool_rounds.py benchmarks/results/generate_main*.log benchmarks/results/generate_faults.log

Each log line ``round r/n <row> cpu <s> ...`` is one timed call, in the order
the calls ran; every call of a row that sits between two stock calls gives the
bracketed ratio ``mean(stock before, stock after) / row`` (as in
``_common.paired_rounds``). Prints, per decoding mode and row, the median of
all those ratios over every run, the interquartile range, min-max and the count.
"""

from __future__ import annotations

import re
import statistics
import sys

LINE = re.compile(r"\s+round \d+/\d+ (.+?)\s+cpu\s+([\d.]+) s")
BASELINE = "stock, no prefix"


def ratios(paths: list[str]) -> dict[tuple[str, str], list[float]]:
    pooled: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        mode, calls = None, []
        with open(path) as handle:
            for line in handle:
                if line.startswith("["):  # "[greedy] timing ..." starts a mode's rounds
                    mode, calls = line[1:line.index("]")], []
                    continue
                match = LINE.match(line)
                if match is None or mode not in ("greedy", "beam 4"):
                    continue
                calls.append((match[1].strip(), float(match[2])))
                if len(calls) >= 3 and calls[-1][0] == calls[-3][0] == BASELINE != calls[-2][0]:
                    before, (row, seconds), after = calls[-3][1], calls[-2], calls[-1][1]
                    pooled.setdefault((mode, row), []).append((before + after) / 2 / seconds)
    return pooled


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    print("| decoding | row | speed vs stock (median) | interquartile | min-max | rounds |")
    print("|---|---|---|---|---|---|")
    for (mode, row), values in sorted(ratios(sys.argv[1:]).items(), key=lambda kv: (kv[0][0] != "greedy", kv[0])):
        low, _, high = statistics.quantiles(values, n=4) if len(values) >= 4 else (min(values), 0, max(values))
        print(f"| {mode} | {row} | {statistics.median(values):.3f} | {low:.2f}-{high:.2f} | "
              f"{min(values):.2f}-{max(values):.2f} | {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
