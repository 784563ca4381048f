"""Benchmark 8: what a few more keys cost PyTorch's CPU sdpa kernel (no model, no patch).

    python benchmarks/bench_sdpa_keys.py           # bart-base heads, batch 4, sources 492 and 512, prefix 20
    python benchmarks/bench_sdpa_keys.py --quick   # the smoke test

A prefix of P tokens gives every attention call P more keys. This script
times PyTorch's CPU sdpa kernel alone
(``torch.nn.functional.scaled_dot_product_attention``, which sdpa BART calls)
at the shapes a generate() uses (default: bart-base's 12 heads of 64, batch 4):
the encoder's self-attention (``source`` queries) and a decoding step's
cross-attention (one query), each with ``source`` keys (the baseline: stock)
and ``source + prefix`` keys, in bracketed alternating rounds
(benchmarks/_common.paired_rounds; CPU seconds of this single-threaded
process). It asks whether the kernel charges a prefix more than its share of
the keys (the kernel walks keys in blocks, so 512 + 20 keys need one more
block than 492 + 20). docs/benchmarks.md, section 8, has the answer measured.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import statistics

import torch
import torch.nn.functional as F


def main() -> int:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[492, 512], help="real keys (source tokens)")
    parser.add_argument("--prefix", type=int, default=20, help="prefix tokens added to the keys")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="bracketed rounds")
    parser.add_argument("--repeat", type=int, default=None,
                        help="kernel calls per timed run (default: 20 for the encoder shape, 400 for one query)")
    args = parser.parse_args()
    if args.quick:
        args.sources, args.batch, args.heads, args.rounds = [24], 1, 2, 1
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    rows, results = [], {}
    for source in args.sources:
        for call, queries, default_repeat in (("encoder self-attention", source, 20),
                                              ("decoding step, cross-attention", 1, 400)):
            repeat = args.repeat or (2 if args.quick else default_repeat)
            q = randn(args.batch, args.heads, queries, args.head_dim)
            keys = {n: (randn(args.batch, args.heads, n, args.head_dim), randn(args.batch, args.heads, n, args.head_dim))
                    for n in (source, source + args.prefix)}

            def run(n, q=q, keys=keys, repeat=repeat):
                key, value = keys[n]
                for _ in range(repeat):
                    F.scaled_dot_product_attention(q, key, value)

            base, more = f"{source} keys", f"{source + args.prefix} keys"
            timing = C.paired_rounds({base: lambda: run(source), more: lambda: run(source + args.prefix)}, base,
                                     args.rounds)
            entry = timing[more]
            rows.append([call, queries, source, source + args.prefix, C.fmt(entry["time_ratio_cpu"], 3),
                         C.fmt((source + args.prefix) / source, 3), C.spread(entry, invert=True),
                         C.fmt(1e3 * statistics.median(timing[base]["cpu_s"]) / repeat, 3)])
            results[f"{call}, source {source}"] = {"queries": queries, "keys": source, "keys_with_prefix": source + args.prefix,
                                                   "repeat": repeat, "timing": timing}
    print(f"sdpa time with {args.prefix} more keys (CPU flash attention, torch {torch.__version__}, batch {args.batch}, "
          f"{args.heads} heads of {args.head_dim}, {args.rounds} bracketed rounds, 1 thread)")
    print(C.table(["call", "queries", "keys (stock)", "keys (prefixed)", "time ratio (median)", "keys ratio",
                   "time ratio min-max", "ms per call (stock)"], rows))
    C.write_results("sdpa_keys", args, {"prefix": args.prefix, "batch": args.batch, "heads": args.heads,
                                        "head_dim": args.head_dim, "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
