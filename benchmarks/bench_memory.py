"""Benchmark 4: memory of generate(), with and without a prefix (peak RSS; cache growth per step).

    python benchmarks/bench_memory.py            # bart-base dims, batch 4, source 512, 64 new tokens
    python benchmarks/bench_memory.py --quick    # tiny dims, in-process: the CI smoke test

Each row runs in a fresh subprocess (full mode): build the model, trim the
allocator, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), run
one ``generate()``, and read the peak (``VmHWM``). Reported:

* peak RSS increase during ``generate()`` over the RSS before it (MiB), and its
  ratio to stock's;
* the decoding cache in bytes (tensors held by ``past_key_values`` after the
  first and the last step, read by a forward hook), and its growth per step: a
  prefix adds a constant (the cross prefix, cached once with the encoder
  projections) and nothing per step, because self-attention prefixes never
  enter the cache;
* the slope of RSS over the decoding steps (MiB/step, least squares).
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import ctypes
import gc
import json
import re
import subprocess
import sys

import torch

from bench_generate import generation_config, peft_model

ROWS = ("stock, no prefix", "patched, no prefix", "patched, prefix 20 (enc+dec+cross)",
        "naive fix (cross k/v every step)", "PEFT as shipped, prefix 20")


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def held_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each counted once.

    A cached tensor may be a view (the patched decoder self-attention caches
    the real part of ``[prefix ; keys]``), which holds its whole storage: that
    is the memory it keeps alive, not ``numel() * element_size()``.
    """
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def cache_bytes(cache) -> tuple[int, int]:
    """(self-attention bytes, cross-attention bytes) held by an EncoderDecoderCache (or legacy tuples)."""
    def size(part) -> int:
        layers = getattr(part, "layers", None)
        if layers is None:
            return 0
        return held_bytes(getattr(layer, name, None) for layer in layers for name in ("keys", "values"))

    if hasattr(cache, "self_attention_cache"):
        return size(cache.self_attention_cache), size(cache.cross_attention_cache)
    if isinstance(cache, (tuple, list)):  # legacy: per layer (k, v, cross_k, cross_v)
        return held_bytes(t for layer in cache for t in layer[:2]), held_bytes(t for layer in cache for t in layer[2:])
    return 0, 0


def slope(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def measure_row(row: str, quick: bool, beams: int, args) -> dict:
    """One generate() of one row; peak RSS and per-step cache/RSS (run in a fresh process in full mode)."""
    model = C.bart(C.TINY if quick else C.BART_BASE)
    config = model.config
    ids = C.source_ids(config, args.batch, args.source)
    prefix = C.random_prefix(config, args.prefix_length)
    gc_ = generation_config(beams, args.new_tokens)
    target = model
    call = {"prefix": prefix} if "patched, prefix" in row or "naive" in row else {}
    context = C.stock if row.startswith("stock") else (C.naive_cross_recompute if "naive" in row else None)
    if row.startswith("PEFT"):
        if not C.peft_status()[0]:
            return {"skipped": "PEFT: not installed"}
        target = peft_model(model, args.prefix_length)
        context = C.peft_as_shipped
    steps: list[tuple[int, int, int]] = []  # (rss KiB, self bytes, cross bytes) per decoding step

    def hook(_module, _args, _kwargs, output):
        cache = getattr(output, "past_key_values", None)
        steps.append((status_kib("VmRSS"), *cache_bytes(cache)))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    with (context or C.contextlib.nullcontext)():
        trim()
        before = status_kib("VmRSS")
        peak_reset = reset_peak()
        with torch.no_grad():
            if target is model:
                model.generate(ids, generation_config=gc_, **call)
            else:
                target.generate(input_ids=ids, generation_config=gc_)
        peak = status_kib("VmHWM")
    handle.remove()
    rss = [s[0] / 1024 for s in steps]
    return {
        "rss_before_mib": before / 1024,
        "peak_increase_mib": (peak - before) / 1024 if peak_reset else None,
        "peak_reset": peak_reset,
        "steps": len(steps),
        "cache_self_first": steps[0][1], "cache_cross_first": steps[0][2],
        "cache_self_last": steps[-1][1], "cache_cross_last": steps[-1][2],
        "cache_growth_per_step": (steps[-1][1] + steps[-1][2] - steps[0][1] - steps[0][2]) / max(1, len(steps) - 1),
        "rss_slope_mib_per_step": slope(rss[1:]),  # from step 2: step 1 includes the encoder and the cross cache
        "rss_per_step_mib": rss,
    }


def child(args) -> int:
    row, beams = args.child.split("|")
    print(json.dumps(measure_row(row, args.quick, int(beams), args)))
    return 0


def run_isolated(row: str, beams: int, args) -> dict:
    command = [sys.executable, __file__, "--child", f"{row}|{beams}", "--batch", str(args.batch), "--source",
               str(args.source), "--new-tokens", str(args.new_tokens), "--prefix-length", str(args.prefix_length)]
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=C.child_env())
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--source", type=int, default=None, help="default 512; --quick 64")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--prefix-length", type=int, default=20)
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per row (default 2; --quick 1)")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (default with --quick)")
    p.add_argument("--child", default=None, help=C.argparse.SUPPRESS)
    args = p.parse_args()
    args.source = args.source or (64 if args.quick else 512)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    if args.child:
        return child(args)
    repeats = args.repeats or (1 if args.quick else 2)
    in_process = args.in_process or args.quick
    started = C.time.perf_counter()
    results = {"settings": {"batch": args.batch, "source": args.source, "new_tokens": args.new_tokens,
                            "prefix_length": args.prefix_length, "repeats": repeats, "in_process": in_process},
               "rows": {}}
    table_rows = []
    for mode, beams in (("greedy", 1), ("beam 4", 4)):
        stock_peak = None
        for row in ROWS:
            runs = []
            for _ in range(1 if "naive" in row else repeats):  # the naive row is slow; its memory is not noisy
                r = measure_row(row, args.quick, beams, args) if in_process else run_isolated(row, beams, args)
                runs.append(r)
                print(f"  {mode} {row}: {r.get('peak_increase_mib', r.get('error', r.get('skipped')))}",
                      file=sys.stderr, flush=True)
            results["rows"][f"{mode}|{row}"] = runs
            good = [r for r in runs if "peak_increase_mib" in r]
            if not good:
                table_rows.append([mode, row, *(["-"] * 6), (runs[0].get("error") or runs[0].get("skipped"))[:60]])
                continue
            peaks = [r["peak_increase_mib"] for r in good if r["peak_increase_mib"] is not None]
            peak = C.statistics.median(peaks) if peaks else float("nan")
            if row.startswith("stock"):
                stock_peak = peak
            r = good[0]
            mib = 1024 * 1024
            table_rows.append([
                mode, row, f"{peak:.1f}", f"{peak / stock_peak:.2f}" if stock_peak else "-",
                f"{(r['cache_self_first'] + r['cache_cross_first']) / mib:.1f}",
                f"{(r['cache_self_last'] + r['cache_cross_last']) / mib:.1f}",
                f"{r['cache_growth_per_step'] / mib:.3f}",
                f"{C.statistics.median(x['rss_slope_mib_per_step'] for x in good):.3f}",
                "",
            ])
    print(f"\nMemory of one generate() (batch {args.batch}, source {args.source}, {args.new_tokens} new tokens, "
          f"prefix {args.prefix_length} on all sites; {'in-process' if in_process else 'a fresh process per run'}, "
          f"median of {repeats}; {C.dims_note(C.BartConfig(**(C.TINY if args.quick else C.BART_BASE)))})")
    print(C.table(["decoding", "row", "peak RSS increase MiB", "vs stock", "cache MiB step 1",
                   f"cache MiB step {args.new_tokens}", "cache growth MiB/step", "RSS slope MiB/step", "note"],
                  table_rows))
    if not C.peft_status()[0]:
        print(C.PEFT_HOWTO.replace("<script>", "bench_memory"))
    results["wall_s"] = C.time.perf_counter() - started
    print(f"\nwall time {results['wall_s']:.0f} s")
    C.write_results("memory", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
