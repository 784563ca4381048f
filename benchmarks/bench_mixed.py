"""Benchmark 5: a mixed-task batch (Prefix.stack / PrefixBank) vs single-task batches.

    python benchmarks/bench_mixed.py                   # bart-base dims, source 512, batch 16, 32 new tokens
    python benchmarks/bench_mixed.py --source 128 --new-tokens 16 --rounds 3   # reduced
    python benchmarks/bench_mixed.py --quick           # tiny dims: the smoke test
    python benchmarks/bench_mixed.py --modes beam4     # one mode only

Four tasks with prefix lengths 10/20/30/40 (encoder + decoder + cross, random
keys/values in a PrefixBank), 16 examples (4 per task, interleaved). Rows
(``generate()``, greedy and beam 4, min = max new tokens):

* single-task batch: the 16 examples in one batch that all use the 40-token
  prefix (a batch-1 prefix broadcast). The baseline: the same batch size, the
  longest prefix.
* mixed batch: the 16 examples in one batch, each with its own task's prefix
  (``bank.select(tasks)``, i.e. ``Prefix.stack``: rows padded to 40, per-row
  masks), the selection included in the timing.
* 4 single-task batches: the same 16 examples as 4 batches of 4, one per task,
  run one after another.

Bracketed, alternating rounds (``single mixed sequential single``, the order of
the middle rows reversed every other round); each row's ratio per round is
``mean(single before, single after) / row time`` (1.00 = the single-task batch's
throughput), reported as the median over rounds and its min-max. Times are the
CPU seconds of this single-threaded process.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import statistics
import sys

import torch
from transformers import GenerationConfig

LENGTHS = {"t10": 10, "t20": 20, "t30": 30, "t40": 40}


def generation_config(num_beams: int, new_tokens: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, early_stopping=False,
    )


def main() -> int:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--source", type=int, default=512, help="source tokens per example")
    parser.add_argument("--batch", type=int, default=16, help="examples (a multiple of 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per example")
    parser.add_argument("--rounds", type=int, default=5, help="bracketed rounds")
    parser.add_argument("--modes", default="greedy,beam4", help="comma-separated: greedy, beam4")
    args = parser.parse_args()
    dims = C.TINY if args.quick else C.BART_BASE
    if args.quick:
        args.source, args.new_tokens, args.rounds = 32, 4, 2
    model = C.bart(dims)
    config = model.config
    bank = bpp_bank(config)
    names = list(LENGTHS)
    tasks = [names[i % 4] for i in range(args.batch)]  # interleaved: every batch position mixes tasks
    ids = C.source_ids(config, args.batch, args.source)
    by_task = {name: ids[[i for i, t in enumerate(tasks) if t == name]] for name in names}

    def timed(fn):
        start = C.time.process_time()
        with torch.no_grad():
            out = fn()
        return C.time.process_time() - start, out

    results = {"dims": "tiny" if args.quick else "bart-base", "source": args.source, "batch": args.batch,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "torch": torch.__version__,
               "transformers": C.transformers.__version__, "modes": {}}
    print(f"Mixed-task batch vs single-task batches ({results['dims']} dims, source {args.source}, batch "
          f"{args.batch}, {args.new_tokens} new tokens, prefix lengths 10/20/30/40 on encoder+decoder+cross, "
          f"{args.rounds} bracketed rounds, CPU s, 1 thread)")
    print("| mode | row | time s (median) | throughput vs single-task batch (median, min-max) |")
    print("|---|---|---|---|")
    wanted = {m.strip() for m in args.modes.split(",")}
    unknown = wanted - {"greedy", "beam4"}
    if unknown:
        parser.error(f"--modes: expected greedy and/or beam4, got {sorted(unknown)}")
    for mode, beams in (("greedy", 1), ("beam 4", 4)):
        if mode.replace(" ", "") not in wanted:
            continue
        gc = generation_config(beams, args.new_tokens)
        rows = {
            "single-task batch (16 x prefix 40)": lambda: model.generate(
                ids, generation_config=gc, prefix=bank.select(["t40"] * args.batch)),
            "mixed batch (16, 4 tasks)": lambda: model.generate(
                ids, generation_config=gc, prefix=bank.select(tasks)),
            "4 single-task batches of 4, in turn": lambda: [
                model.generate(by_task[name], generation_config=gc, prefix=bank.select([name] * len(by_task[name])))
                for name in names],
        }
        labels = list(rows)
        base, others = labels[0], labels[1:]
        # Outputs: each mixed row equals its task's batch (the same tokens).
        mixed = rows[labels[1]]()
        alone = {name: model.generate(by_task[name], generation_config=gc, prefix=bank.select([name])) for name in names}
        positions = {name: 0 for name in names}
        for row, task in enumerate(tasks):
            assert mixed[row].tolist() == alone[task][positions[task]].tolist(), (mode, row, task)
            positions[task] += 1
        rows[base]()  # warm-up
        times = {label: [] for label in labels}
        ratios = {label: [] for label in others}
        for round_index in range(args.rounds):
            order = others if round_index % 2 == 0 else others[::-1]
            before, _ = timed(rows[base])
            middle = {label: timed(rows[label])[0] for label in order}
            after, _ = timed(rows[base])
            times[base] += [before, after]
            for label in others:
                times[label].append(middle[label])
                ratios[label].append((before + after) / 2 / middle[label])
        table = {}
        print(f"| {mode} | {base} | {statistics.median(times[base]):.2f} | 1.00 |")
        for label in others:
            r = ratios[label]
            table[label] = {"time_median": statistics.median(times[label]), "ratio_median": statistics.median(r),
                            "ratio_min": min(r), "ratio_max": max(r), "ratios": r}
            print(f"| {mode} | {label} | {statistics.median(times[label]):.2f} | "
                  f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) |")
        table[base] = {"time_median": statistics.median(times[base]), "times": times[base]}
        results["modes"][mode] = table
    C.write_results("mixed", args, results)
    return 0


def bpp_bank(config):
    return C.bpp.PrefixBank({name: C.random_prefix(config, length, seed=i) for i, (name, length) in enumerate(LENGTHS.items())})


if __name__ == "__main__":
    sys.exit(main())
