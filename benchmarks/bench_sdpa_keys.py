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

``--cache-growth``: instead, what growing the decoder self-attention cache
costs one greedy generate() (``--layers`` layers, key and value, ``--new-tokens``
steps): stock's one concatenation per step (``DynamicLayer.update``; the
package's ``[prefix ; cache ; new]`` join is the same copy plus the prefix
columns) against writing each step into a preallocated buffer, the remedy
issue 14 suggested; section 8 puts the difference next to a generate()'s time.

``--decode-step``: decoder self-attention over one greedy generate() with a
``--prefix``-token batch-1 prefix (``--layers`` x ``--new-tokens`` one-query
steps, the cache grown by one concatenation per step): stock (no prefix), the
package's ``[prefix ; cache ; new]`` join followed by sdpa, and attention with
the *scores* joined instead (``q Kp^T`` with the batch folded into the query
rows, so the batch-1 prefix is never expanded, next to ``q Kc^T`` over stock's
cache; one softmax; two products with the values: the package's
``split_attention``, which decoding steps run since when the prefix is
large enough: ``_decoding.SPLIT_MIN_BYTES``). A 64 MB buffer is
touched between steps in every row, as a model's weights evict the caches.
A second table does the same for cross-attention over the last of
``--sources`` encoder keys: stock's sdpa, sdpa over the cached
``[prefix ; encoder]`` keys, and the package's ``plain_attention`` (eager
math) over them. Section 6 ("By prefix length", "Decoding steps without the
prefix copy") has the numbers.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import statistics

import torch
import torch.nn.functional as F

from bart_prefix_patch._state import PrefixKV
from bart_prefix_patch.forks._decoding import plain_attention, split_attention


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
    parser.add_argument("--cache-growth", action="store_true",
                        help="time the self-attention cache's growth over one generate() instead (see above)")
    parser.add_argument("--decode-step", action="store_true",
                        help="instead: decoder self-attention with a prefix, keys/values joined vs scores joined")
    parser.add_argument("--layers", type=int, default=6, help="--cache-growth: decoder layers")
    parser.add_argument("--new-tokens", type=int, default=64, help="--cache-growth: decoding steps")
    args = parser.parse_args()
    if args.quick:
        args.sources, args.batch, args.heads, args.rounds = [24], 1, 2, 1
        args.layers, args.new_tokens = 2, 8
    if args.cache_growth:
        return cache_growth(args)
    if args.decode_step:
        return decode_step(args)
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


def cache_growth(args) -> int:
    """Grow ``2 * layers`` caches by one token per step, by concatenation and into a preallocated buffer."""
    shape = (args.batch, args.heads, 1, args.head_dim)
    new = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    caches = 2 * args.layers  # key and value per layer
    prefix = args.prefix

    def concatenate():
        held = [new.clone() for _ in range(caches)]
        for _ in range(args.new_tokens - 1):
            for i in range(caches):
                held[i] = torch.cat([held[i], new], dim=2)

    def preallocated():
        buffers = [new.new_empty(args.batch, args.heads, prefix + args.new_tokens, args.head_dim) for _ in range(caches)]
        for step in range(args.new_tokens):
            for buffer in buffers:
                buffer[:, :, prefix + step:prefix + step + 1].copy_(new)

    timing = C.paired_rounds({"concatenate": concatenate, "preallocated buffer": preallocated}, "concatenate",
                             args.rounds)
    rows = [[name, C.fmt(1e3 * statistics.median(timing[name]["cpu_s"]), 1),
             C.fmt(timing[name]["time_ratio_cpu"], 2), C.spread(timing[name], invert=True) if name != "concatenate" else "-"]
            for name in ("concatenate", "preallocated buffer")]
    print(f"self-attention cache growth over one greedy generate(): {args.layers} layers x (key, value), "
          f"{args.new_tokens} steps, batch {args.batch}, {args.heads} heads of {args.head_dim}, "
          f"{args.rounds} bracketed rounds, 1 thread")
    print(C.table(["cache", "ms per generate() (median)", "time ratio", "min-max"], rows))
    C.write_results("cache_growth", args, {"layers": args.layers, "new_tokens": args.new_tokens, "batch": args.batch,
                                           "heads": args.heads, "head_dim": args.head_dim, "timing": timing})
    return 0


def decode_step(args) -> int:
    """Self-attention of ``layers`` x ``new_tokens`` one-query steps: stock, keys/values joined, scores joined."""
    gen = torch.Generator().manual_seed(0)
    b, h, d, p = args.batch, args.heads, args.head_dim, args.prefix
    prefix = (torch.randn(1, h, p, d, generator=gen), torch.randn(1, h, p, d, generator=gen))
    steps = [[torch.randn(b, h, 1, d, generator=gen) for _ in range(3)] for _ in range(args.new_tokens)]
    evict = torch.zeros((16 if args.quick else 64) * 2**20 // 4)

    def grow(cache, key, value):
        cache[0] = key if cache[0] is None else torch.cat([cache[0], key], dim=2)
        cache[1] = value if cache[1] is None else torch.cat([cache[1], value], dim=2)

    def decode(mode):
        caches = [[None, None] for _ in range(args.layers)]
        kp, vp = prefix[0].expand(b, -1, -1, -1), prefix[1].expand(b, -1, -1, -1)
        out = []
        for q, key, value in steps:
            evict.add_(1.0)
            for cache in caches:
                if mode == "stock":
                    grow(cache, key, value)
                    o = F.scaled_dot_product_attention(q, *cache)
                elif mode == "joined":
                    joined = [torch.cat([kp, key] if cache[0] is None else [kp, cache[0], key], dim=2),
                              torch.cat([vp, value] if cache[1] is None else [vp, cache[1], value], dim=2)]
                    cache[0], cache[1] = joined[0][:, :, p:], joined[1][:, :, p:]
                    o = F.scaled_dot_product_attention(q, *joined)
                else:  # scores joined: the package's split_attention, the prefix expanded as kv_for does
                    grow(cache, key, value)
                    o = split_attention(q, cache[0], cache[1], PrefixKV(kp, vp), None, d ** -0.5)[0]
            out.append(o)
        return out

    same = all(torch.allclose(a, c, atol=1e-5, rtol=1e-5) for a, c in zip(decode("joined"), decode("scores")))
    names = {"stock, no prefix": "stock", f"prefix {p}: keys/values joined": "joined",
             f"prefix {p}: scores joined": "scores"}
    timing, rows = _timed_modes(names, decode, "stock, no prefix", args.rounds)
    print(f"decoder self-attention over one greedy generate() with a {p}-token batch-1 prefix: {args.layers} layers "
          f"x {args.new_tokens} one-query steps, batch {b}, {h} heads of {d}, {args.rounds} bracketed rounds, 1 thread; "
          f"scores joined == keys/values joined (atol 1e-5): {same}")
    print(C.table(["self-attention", "ms per generate() (median)", "ms vs stock"], rows))
    cross, cross_same = _decode_step_cross(args, prefix, evict)
    C.write_results("decode_step", args, {"prefix": p, "layers": args.layers, "new_tokens": args.new_tokens,
                                          "batch": b, "heads": h, "head_dim": d, "same_output": same,
                                          "timing": timing, "cross": cross, "cross_same_output": cross_same})
    return 0 if same and cross_same else 1


def _timed_modes(names, decode, baseline, rounds):
    """Time ``decode(mode)`` for each ``{row name: mode}`` in bracketed rounds against ``baseline``.

    Returns:
        ``(timing, rows)``: :func:`_common.paired_rounds`' timing and one table row per name (median
        ms per call, and its difference to the baseline's median).
    """
    timing = C.paired_rounds({name: (lambda mode=mode: decode(mode)) for name, mode in names.items()}, baseline, rounds)
    baseline_ms = 1e3 * statistics.median(timing[baseline]["cpu_s"])
    rows = [[name, C.fmt(1e3 * statistics.median(timing[name]["cpu_s"]), 1),
             f"{1e3 * statistics.median(timing[name]['cpu_s']) - baseline_ms:+.1f}"] for name in names]
    return timing, rows


def _decode_step_cross(args, prefix, evict):
    """Cross-attention of ``layers`` x ``new_tokens`` one-query steps.

    Stock sdpa over the encoder keys, then sdpa and plain matmuls over ``[prefix ; encoder]``.
    """
    gen = torch.Generator().manual_seed(1)
    b, h, d, p, source = args.batch, args.heads, args.head_dim, args.prefix, args.sources[-1]
    queries = [torch.randn(b, h, 1, d, generator=gen) for _ in range(args.new_tokens)]
    encoder = [(torch.randn(b, h, source, d, generator=gen), torch.randn(b, h, source, d, generator=gen))
               for _ in range(args.layers)]
    joined = [tuple(torch.cat([t.expand(b, -1, -1, -1), e], dim=2) for t, e in zip(prefix, kv)) for kv in encoder]

    def decode(mode):
        out = []
        for q in queries:
            evict.add_(1.0)
            for layer in range(args.layers):
                if mode == "stock":
                    out.append(F.scaled_dot_product_attention(q, *encoder[layer]))
                elif mode == "sdpa":
                    out.append(F.scaled_dot_product_attention(q, *joined[layer]))
                else:
                    out.append(plain_attention(q, *joined[layer], None, d ** -0.5))
        return out

    same = all(torch.allclose(a, c, atol=1e-5, rtol=1e-5) for a, c in zip(decode("sdpa"), decode("plain")))
    names = {f"stock, {source} keys": "stock", f"prefix {p}: sdpa over {source + p} keys": "sdpa",
             f"prefix {p}: plain matmuls over {source + p} keys": "plain"}
    timing, rows = _timed_modes(names, decode, f"stock, {source} keys", args.rounds)
    print(f"cross-attention over one greedy generate() with a {p}-token batch-1 prefix: {args.layers} layers x "
          f"{args.new_tokens} one-query steps over {source} encoder keys, batch {b}, {h} heads of {d}; "
          f"plain matmuls == sdpa (atol 1e-5): {same}")
    print(C.table(["cross-attention", "ms per generate() (median)", "ms vs stock"], rows))
    return timing, same


if __name__ == "__main__":
    raise SystemExit(main())
