"""Benchmark 2: one training step, prefix-tuning vs full fine-tuning vs stock forward+backward.

    python benchmarks/bench_train.py            # bart-base dims, batch 4, source 512, target 64
    python benchmarks/bench_train.py --quick    # tiny dims: the CI smoke test

Part 1, time: every row in one process, in bracketed alternating rounds with
the baseline *stock forward+backward* (unpatched transformers, ``bpp.revert()``,
every parameter trainable, no optimizer): ``stock row stock row2 stock ...``;
the table shows the median of the per-round ratios ``row CPU time / mean(stock
before, stock after)`` (lower is faster).

* stock fwd+bwd: the baseline. patched fwd+bwd, no prefix: the package applied.
* stock full fine-tuning step: fwd + bwd + AdamW over all parameters.
* prefix fwd+bwd / prefix-tuning step: ``PrefixEncoder`` (20 tokens on encoder,
  decoder and cross-attention, MLP 512), base model frozen; the step adds AdamW
  over the prefix parameters only.
* PEFT as shipped (patch reverted): PEFT 0.21.2 prefix-tuning step, 20 virtual tokens.

Part 2, memory: each row in a fresh subprocess; the peak RSS increase over two
steps (gradients and optimizer state included) above the RSS after building the
model and the batch, via ``/proc/self/clear_refs`` + ``VmHWM``.

Part 3: trainable parameters (% of all, prefix included) for prefix lengths 5..200.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import contextlib
import json
import statistics
import subprocess
import sys

import torch

bpp = C.bpp

from bench_memory import reset_peak, status_kib, trim

ROWS = ("stock fwd+bwd (all params)", "patched fwd+bwd, no prefix (all params)", "stock full fine-tuning step",
        "prefix fwd+bwd (prefix only)", "prefix-tuning step", "PEFT as shipped: prefix step")
BASELINE = ROWS[0]


class Setup:
    """A model, a batch, and the per-row contexts/steps."""

    def __init__(self, args):
        self.args = args
        self.model = C.bart(C.TINY if args.quick else C.BART_BASE, dropout=0.0)
        self.model.train()
        config = self.model.config
        g = torch.Generator().manual_seed(5)
        self.batch = {
            "input_ids": torch.randint(4, config.vocab_size, (args.batch, args.source), generator=g),
            "labels": torch.randint(4, config.vocab_size, (args.batch, args.target), generator=g),
        }
        torch.manual_seed(6)
        self.prefix = bpp.PrefixEncoder(config, prefix_length=args.prefix_length, hidden_size=512)
        self.full_optimizer = None
        self.prefix_optimizer = torch.optim.AdamW(self.prefix.parameters(), lr=1e-4)
        self.peft = None
        self.peft_optimizer = None

    # ---- contexts (not timed)
    def trainable(self, flag: bool):
        for parameter in self.model.parameters():
            parameter.requires_grad_(flag)

    @contextlib.contextmanager
    def full(self, patched: bool):
        self.trainable(True)
        with (contextlib.nullcontext() if patched else C.stock()):
            yield

    @contextlib.contextmanager
    def prefixed(self):
        self.trainable(False)
        bpp.attach(self.model, self.prefix)
        try:
            yield
        finally:
            bpp.detach(self.model)
            self.trainable(True)

    @contextlib.contextmanager
    def peft_context(self):
        if self.peft is None:
            from peft import PrefixTuningConfig, TaskType, get_peft_model

            with C.stock():
                self.peft = get_peft_model(self.model, PrefixTuningConfig(
                    task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=self.args.prefix_length))
            self.peft.train()
            self.peft_optimizer = torch.optim.AdamW(
                [p for p in self.peft.parameters() if p.requires_grad], lr=1e-4)
        self.trainable(False)
        for parameter in self.peft.prompt_encoder.parameters():
            parameter.requires_grad_(True)
        with C.peft_as_shipped():
            yield
        self.trainable(True)

    # ---- steps (timed)
    def fwd_bwd(self, model=None):
        loss = (model or self.model)(**self.batch).loss
        loss.backward()
        return loss

    def stock_fwd_bwd(self):
        self.fwd_bwd()
        self.model.zero_grad(set_to_none=True)

    def full_step(self):
        if self.full_optimizer is None:
            self.full_optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.fwd_bwd()
        self.full_optimizer.step()
        self.full_optimizer.zero_grad(set_to_none=True)

    def prefix_fwd_bwd(self):
        self.fwd_bwd()
        self.prefix.zero_grad(set_to_none=True)

    def prefix_step(self):
        self.fwd_bwd()
        self.prefix_optimizer.step()
        self.prefix_optimizer.zero_grad(set_to_none=True)

    def peft_step(self):
        self.fwd_bwd(self.peft)
        self.peft_optimizer.step()
        self.peft_optimizer.zero_grad(set_to_none=True)

    def variants(self) -> dict:
        out = {
            ROWS[0]: C.Variant(self.stock_fwd_bwd, lambda: self.full(False)),
            ROWS[1]: C.Variant(self.stock_fwd_bwd, lambda: self.full(True)),
            ROWS[2]: C.Variant(self.full_step, lambda: self.full(False)),
            ROWS[3]: C.Variant(self.prefix_fwd_bwd, self.prefixed),
            ROWS[4]: C.Variant(self.prefix_step, self.prefixed),
        }
        if C.peft_status()[0]:
            out[ROWS[5]] = C.Variant(self.peft_step, self.peft_context)
        return out


def measure_memory(setup: Setup, name: str) -> dict:
    variant = setup.variants()[name]
    with variant.context():
        trim()
        before = status_kib("VmRSS")
        ok = reset_peak()
        for _ in range(2):
            variant.fn()
        peak = status_kib("VmHWM")
        after = status_kib("VmRSS")
    return {"peak_increase_mib": (peak - before) / 1024 if ok else None, "retained_mib": (after - before) / 1024}


def memory_child(args) -> int:
    print(json.dumps(measure_memory(Setup(args), args.child)))
    return 0


def memory(args) -> dict:
    """Peak RSS per row: a fresh process per run (full mode); in-process with --quick (rough)."""
    out = {}
    names = [r for r in ROWS if r != ROWS[5] or C.peft_status()[0]]
    if args.quick:
        setup = Setup(args)
        return {name: [measure_memory(setup, name)] for name in names}
    for name in names:
        runs = []
        for _ in range(args.memory_repeats):
            command = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--source",
                       str(args.source), "--target", str(args.target), "--prefix-length", str(args.prefix_length)]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=C.child_env())
            if done.returncode:
                runs.append({"error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  memory {name}: {runs[-1]}", file=sys.stderr, flush=True)
        out[name] = runs
    return out


def trainable_table(args) -> tuple[list, list]:
    """Trainable-parameter share for prefix lengths 5..200 (bart-base dims; tiny with --quick)."""
    model = C.bart(C.TINY if args.quick else C.BART_BASE)
    base = sum(p.numel() for p in model.parameters())
    lengths = [5, 20] if args.quick else [5, 10, 20, 50, 100, 200]
    rows, data = [], []
    peft_ok = C.peft_status()[0]
    for length in lengths:
        entry = {"prefix_length": length}
        for label, kwargs in (("mlp", {"hidden_size": 512}), ("flat", {"hidden_size": None}),
                              ("dec_cross_flat", {"hidden_size": None, "sites": ("decoder", "cross")})):
            encoder = bpp.add_prefix_tuning(model, prefix_length=length, **kwargs)
            counts = bpp.trainable_parameters(model)
            bpp.detach(model)
            entry[label] = counts
        if peft_ok:
            from peft import PrefixTuningConfig, TaskType, get_peft_model

            with C.stock():
                peft = get_peft_model(C.bart(C.TINY if args.quick else C.BART_BASE),
                                      PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=length))
                trainable, total = peft.get_nb_trainable_parameters()
            entry["peft"] = {"trainable": trainable, "total": total, "percent": 100 * trainable / total}
        data.append(entry)
        rows.append([length, f"{entry['mlp']['trainable']:,}", f"{entry['mlp']['percent']:.2f}%",
                     f"{entry['flat']['trainable']:,}", f"{entry['flat']['percent']:.2f}%",
                     f"{entry['dec_cross_flat']['percent']:.2f}%",
                     f"{entry['peft']['trainable']:,} ({entry['peft']['percent']:.2f}%)" if peft_ok else "-"])
    return rows, data, base


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="bracketed rounds (default 3; --quick 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--source", type=int, default=None, help="default 512; --quick 32")
    p.add_argument("--target", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--prefix-length", type=int, default=20)
    p.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per row (default 2; --quick 1)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child", default=None, help=C.argparse.SUPPRESS)
    args = p.parse_args()
    args.source = args.source or (32 if args.quick else 512)
    args.target = args.target or (8 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.memory_repeats = args.memory_repeats or (1 if args.quick else 2)
    if args.child:
        return memory_child(args)
    started = C.time.perf_counter()
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")}}
    dims = C.dims_note(C.BartConfig(**(C.TINY if args.quick else C.BART_BASE)))

    setup = Setup(args)
    print(f"[time] {args.rounds} paired rounds", file=sys.stderr, flush=True)
    timing = C.paired_rounds(setup.variants(), BASELINE, args.rounds)
    results["time"] = timing
    del setup
    mem = {} if args.no_memory else memory(args)
    results["memory"] = mem
    stock_peak = None
    rows = []
    for name in ROWS:
        if name not in timing:
            rows.append([name, "-", "-", "-", "-", "-", "-", "PEFT: not installed"])
            continue
        t = timing[name]
        vs_full = statistics.median(t["cpu_s"]) / statistics.median(timing[ROWS[2]]["cpu_s"])
        peaks = [r["peak_increase_mib"] for r in mem.get(name, []) if r.get("peak_increase_mib") is not None]
        peak = statistics.median(peaks) if peaks else None
        if name == BASELINE:
            stock_peak = peak
        rows.append([
            name, f"{statistics.median(t['cpu_s']):.2f}", f"{t['time_ratio_cpu']:.2f}",
            C.spread(t, invert=True), f"{vs_full:.2f}",
            f"{peak:.0f}" if peak is not None else "-",
            f"{peak / stock_peak:.2f}" if peak is not None and stock_peak else "-", "",
        ])
    print(f"\nTraining step: CPU time and peak memory (batch {args.batch}, source {args.source}, target "
          f"{args.target}, prefix {args.prefix_length} on all sites; median of {args.rounds} paired rounds; "
          f"{dims}). Time ratios: lower is faster.")
    print(C.table(["row", "CPU s", "time / stock fwd+bwd", "min-max", "time / full FT step (medians)",
                   "peak RSS increase MiB",
                   "memory / stock fwd+bwd", "note"], rows))

    trows, tdata, base = trainable_table(args)
    results["trainable"] = {"base_parameters": base, "rows": tdata}
    print(f"\nTrainable parameters vs prefix length (all three sites unless noted; % of all parameters, prefix "
          f"included; base model {base:,} parameters, {dims})")
    print(C.table(["prefix length", "PrefixEncoder MLP 512 (training)", "%", "flat prefix (inference)", "%",
                   "flat, decoder+cross", "PEFT 0.21.2 (prefix_projection=False)"], trows))
    if not C.peft_status()[0]:
        print(C.PEFT_HOWTO.replace("<script>", "bench_train"))
    results["wall_s"] = C.time.perf_counter() - started
    print(f"\nwall time {results['wall_s']:.0f} s")
    C.write_results("train", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
