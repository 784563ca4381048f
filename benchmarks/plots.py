"""Draw the PNGs of docs/benchmarks.md from the results JSON (needs matplotlib: ``pip install -e .[bench]``).

    python benchmarks/plots.py                      # benchmarks/results/*.json -> docs/img/*.png
    python benchmarks/plots.py --results DIR --out DIR

Each figure is drawn only if its results file exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script from anywhere

from learning_grid import best_of_grid, load_grid, rows_of  # noqa: E402

COLORS = {
    "stock, no prefix": "#444444",
    "patched, no prefix": "#1f77b4",
    "patched, prefix 20 (enc+dec+cross)": "#2ca02c",
    "naive fix (cross k/v every step)": "#d62728",
    "PEFT as shipped, prefix 20": "#9467bd",
    "PEFT + bpp integration, prefix 20": "#8c564b",
}


def load(results: Path, name: str):
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def first(results: Path, *names: str):
    for name in names:
        data = load(results, name)
        if data is not None:
            return data
    return None


def plot_sweep(plt, data, out: Path) -> Path:
    sweep = data["sweep"]
    lengths = sorted(int(k) for k in sweep)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in COLORS.items():
        points = [(n, sweep[str(n)][name]) for n in lengths if name in sweep[str(n)]]
        if not points:
            continue
        xs = [n for n, _ in points]
        left.plot(xs, [e["tokens_per_cpu_s"] for _, e in points], "o-", color=color, label=name)
        right.plot(xs, [e["ratio_cpu"] for _, e in points], "o-", color=color, label=name)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.set_xlabel("source length (tokens)")
        axis.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("new tokens per CPU second")
    left.set_title("greedy generate() throughput")
    right.set_ylabel("speed vs stock (1.00 = stock)")
    right.set_title("relative to stock, paired rounds (median)")
    right.axhline(1.0, color="#999999", lw=0.8)
    left.legend(fontsize=8)
    settings = data["settings"]
    fig.suptitle(f"bart-base dims, batch {settings['batch']}, {settings['new_tokens']} new tokens, "
                 f"prefix {settings['prefix_length']} on all sites (1 thread)", fontsize=10)
    fig.tight_layout()
    path = out / "generate_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_main(plt, data, out: Path, filename: str = "generate_speed") -> Path:
    main = data["main"]
    modes = list(main)
    names = [n for n in COLORS if any(n in main[m]["timing"] for m in modes)]
    fig, axis = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, mode in enumerate(modes):
            entry = main[mode]["timing"].get(name)
            if entry is None:
                continue
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            ys.append(entry["ratio_cpu"])
            lo.append(entry["ratio_cpu"] - entry["ratio_cpu_min"])
            hi.append(entry["ratio_cpu_max"] - entry["ratio_cpu"])
        axis.bar(xs, ys, width, yerr=[lo, hi], color=COLORS[name], label=name, capsize=2)
        for x, y in zip(xs, ys):
            axis.text(x, y + 0.02, f"{y:.2f}", ha="center", fontsize=7)
    axis.axhline(1.0, color="#999999", lw=0.8)
    axis.set_xticks(range(len(modes)), modes)
    axis.set_ylabel("speed vs stock (median of paired rounds)")
    settings = data["settings"]
    allocator = "malloc pinned" if settings.get("malloc") == "steady" else "default glibc malloc"
    axis.set_title(f"generate(): bart-base dims, batch {settings['batch']}, source {settings['source']}, "
                   f"{settings['new_tokens']} new tokens, {allocator}", fontsize=10)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    axis.set_ylim(0, 1.2)
    fig.tight_layout()
    path = out / f"{filename}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning(plt, data, out: Path) -> Path:
    settings = data["settings"]
    tasks, seeds = settings["tasks"], settings["seeds"]
    names = rows_of(data)
    palette = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for i, name in enumerate(names):
            curves = [data["runs"][f"{task}|{name}|{s}"]["curve"] for s in seeds if f"{task}|{name}|{s}" in data["runs"]]
            if not curves:
                continue
            steps = [p["step"] for p in curves[0]]
            values = [[100 * c[k]["exact"] for c in curves] for k in range(len(steps))]
            mean = [statistics.mean(v) for v in values]
            axis.plot(steps, mean, "-", color=palette(i), label=name, lw=1.6)
            if len(curves) > 1:
                axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=palette(i),
                                  alpha=0.12)
        axis.set_title(task)
        axis.set_xlabel("training step")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match of generate() (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    title = f"Prefix-tuning a frozen BART pretrained by denoising (mean of {len(seeds)} seeds, band = min-max)"
    if "chosen_lr" in data:
        title += "; each row at its best prefix learning rate"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train(plt, data, out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    timing, memory = data["time"], data.get("memory", {})
    names = list(timing)
    ys = [timing[n]["time_ratio_cpu"] for n in names]
    left.barh(range(len(names)), ys, color="#1f77b4", label="CPU time")
    peaks = []
    for n in names:
        values = [r["peak_increase_mib"] for r in memory.get(n, []) if r.get("peak_increase_mib") is not None]
        peaks.append(statistics.median(values) if values else None)
    base = peaks[0]
    if base:
        left.barh([i + 0.4 for i in range(len(names))], [(p or 0) / base for p in peaks], height=0.4,
                  color="#ff7f0e", label="peak memory")
    left.set_yticks([i + 0.2 for i in range(len(names))], names, fontsize=8)
    left.invert_yaxis()
    left.axvline(1.0, color="#999999", lw=0.8)
    left.set_xlabel("relative to stock forward+backward (lower is better)")
    left.legend(fontsize=8)
    rows = data["trainable"]["rows"]
    lengths = [r["prefix_length"] for r in rows]
    right.plot(lengths, [r["mlp"]["percent"] for r in rows], "o-", label="PrefixEncoder, MLP 512 (training)")
    right.plot(lengths, [r["flat"]["percent"] for r in rows], "o-", label="flat prefix, 3 sites (inference)")
    right.plot(lengths, [r["dec_cross_flat"]["percent"] for r in rows], "o-", label="flat prefix, decoder+cross")
    if "peft" in rows[0]:
        right.plot(lengths, [r["peft"]["percent"] for r in rows], "o--", label="PEFT prefix (no projection)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("prefix length")
    right.set_ylabel("trainable parameters (% of all)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "train_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(plt, data, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, mode in zip(axes, ("greedy", "beam 4")):
        for name, color in COLORS.items():
            runs = data["rows"].get(f"{mode}|{name}")
            if not runs or "rss_per_step_mib" not in runs[0]:
                continue
            rss = runs[0]["rss_per_step_mib"]
            axis.plot(range(1, len(rss) + 1), [r - runs[0]["rss_before_mib"] for r in rss], color=color, label=name)
        axis.set_title(f"{mode}: RSS during generate()")
        axis.set_xlabel("decoding step")
        axis.set_ylabel("RSS above the start (MiB)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]' (or pip install matplotlib)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = []
    generate = first(args.results, "generate", "generate_main")
    if generate and generate.get("main"):
        drawn.append(plot_main(plt, generate, args.out))
    steady = load(args.results, "generate_main_steady")
    if steady and steady.get("main"):
        drawn.append(plot_main(plt, steady, args.out, "generate_speed_steady"))
    sweep = first(args.results, "generate", "generate_sweep")
    if sweep and sweep.get("sweep"):
        drawn.append(plot_sweep(plt, sweep, args.out))
    grid = load_grid(args.results)
    if grid:  # each row at its best prefix learning rate (benchmarks/learning_grid.py)
        drawn.append(plot_learning(plt, best_of_grid(grid), args.out))
    for name, draw in (("train", plot_train), ("memory", plot_memory)):
        data = load(args.results, name)
        if data:
            drawn.append(draw(plt, data, args.out))
    for path in drawn:
        print(path)
    if not drawn:
        print(f"no results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
