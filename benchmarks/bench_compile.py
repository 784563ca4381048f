"""Benchmark: torch.compile speed, stock vs patched transformers, without and with a prefix (one run).

    python benchmarks/bench_compile.py           # d_model 256, 3+3 layers, batch 2, source 64, 16 new tokens
    python benchmarks/bench_compile.py --quick   # tiny model, 2 rounds: the CI smoke test
    python benchmarks/bench_compile.py --control # A/A: both workers stock (how far two processes differ)
    python benchmarks/bench_compile.py --prefix 20 --source 512   # compiled prefixed calls vs stock compiled
    python benchmarks/bench_compile.py --prefix 20 --source 512 --trainable-prefix   # its tensors require grad
    python benchmarks/bench_compile.py --prefix 20 --source 512 --malloc steady   # glibc thresholds pinned

``--prefix N``: the patched worker passes an N-token prefix on all three sites
to every call, the stock worker none (the ratio is what a prefix costs under
torch.compile, the prefix's extra keys included); a third command kind,
``train`` (a compiled training step's forward + backward: stock trains every
parameter as bench_train.py's baseline does, patched the prefix of a frozen
model), and a third row per command, the same prefixed call run uncompiled.

Importing ``bart_prefix_patch`` patches transformers for the whole process, so
stock and patched run in two long-lived worker processes
(benchmarks/_compile_worker.py); the stock one never imports the package. Each
builds the same seeded BART (random weights, no prefix) and compiles it once:

* forward: ``torch.compile(model)``, a teacher-forced forward;
* generate: ``model.forward = torch.compile(model.forward)`` with the default
  dynamic cache, then greedy ``model.generate()`` (min = max new tokens).

Compilation and warm-up happen in the workers before any timed call. Then this
process sends the timed commands over pipes in bracketed rounds, exactly as the
other scripts time their rows (``_common.paired_rounds``): ``stock patched
stock`` per round, so consecutive rounds run stock, patched, stock, stock,
patched, stock, ...; a round's ratio is ``mean(stock before, stock after) /
patched`` in CPU seconds of the worker process (user + system; wall ratios in
the JSON). 1.00 = stock speed, higher is faster; the table gives the median
over rounds with its min-max. One timed command is ``--repeat`` calls in a row
(a compiled forward at these sizes takes milliseconds).

Graph breaks are counted in each worker: ``torch._dynamo.explain`` of the
forward (as tests/test_compile.py counts), and dynamo's ``graph_break`` counter
while the compiled forward and the compiled ``generate()`` warmed up.

``--control`` starts the second worker stock as well (an A/A run): its ratio is
what two identical processes measure apart on this machine, the yardstick for
the patched/stock ratio. It showed that two identical processes differ by a
few percent (memory layout), so each row runs in ``--processes`` worker processes
(default 2), and round ``r`` pairs stock process ``r % N`` with patched process
``(r // N) % N``: every pairing of processes takes its turn.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "_compile_worker.py"

#: The issue's size: d_model 256, 3+3 layers; vocabulary 1000 keeps the LM head cheap.
SMALL = dict(
    vocab_size=1000, d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=1024,
)


class Worker:
    """One worker process; :meth:`start` launches it, :meth:`ready` waits for its compile report."""

    def __init__(self, kind: str, settings: dict):
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), kind, json.dumps(settings)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**C.child_env(), "PYTHONPATH": ""}, cwd=C.ROOT, bufsize=1)

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def ready(self) -> dict:
        return self._read()["ready"]

    def call(self, command: str, repeat: int) -> C.Measurement:
        self.process.stdin.write(f"{command} {repeat}\n")
        self.process.stdin.flush()
        answer = self._read()
        if answer["recompiles"]:
            print(f"  warning: {self.kind} {command} compiled {answer['recompiles']} graphs in a timed call",
                  file=sys.stderr, flush=True)
        return C.Measurement(answer["cpu"], answer["wall"], answer, answer["faults"])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="bracketed rounds per call kind (default 20; --quick 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--source", type=int, default=None, help="source tokens (default 64; --quick 16)")
    p.add_argument("--target", type=int, default=None, help="decoder tokens of the forward (default 16; --quick 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens (default 16; --quick 4)")
    p.add_argument("--repeat-forward", type=int, default=None, help="forward calls per timed command (default 20)")
    p.add_argument("--repeat-generate", type=int, default=None, help="generate calls per timed command (default 4)")
    p.add_argument("--processes", type=int, default=None,
                   help="worker processes per kind, used in turn (default 2; --quick 1): two identical processes "
                        "differ by a few percent (--control), so one process per kind would measure that")
    p.add_argument("--control", action="store_true", help="A/A control: the second worker is stock too")
    p.add_argument("--prefix", type=int, default=0,
                   help="prefix tokens on all three sites in the patched worker (default 0: no prefix); adds the "
                        "train command and an uncompiled prefixed row")
    p.add_argument("--trainable-prefix", action="store_true",
                   help="with --prefix: the prefix's tensors require grad (a prefix straight from training; "
                        "forward and generate still run under no_grad)")
    p.add_argument("--malloc", choices=["default", "steady"], default="default",
                   help="steady: every worker pins glibc malloc's thresholds (_malloc.steady_malloc); default: as "
                        "users run")
    args = p.parse_args()
    if args.trainable_prefix and not args.prefix:
        p.error("--trainable-prefix needs --prefix N")
    if args.prefix and args.control:
        p.error("--prefix and --control exclude each other")
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 20)
    args.processes = args.processes or (1 if quick else 2)
    args.source = args.source or (16 if quick else 64)
    args.target = args.target or (8 if quick else 16)
    args.new_tokens = args.new_tokens or (4 if quick else 16)
    args.repeat_forward = args.repeat_forward or (5 if quick else 20)
    args.repeat_generate = args.repeat_generate or (1 if quick else 4)
    dims = C.TINY if quick else SMALL
    settings = {"seed": 0, "dims": dims, "batch": args.batch, "source": args.source, "target": args.target,
                "new_tokens": args.new_tokens, "prefix": args.prefix, "trainable_prefix": args.trainable_prefix,
                "malloc": args.malloc}

    started = C.time.perf_counter()
    second = "stock" if args.control else "patched"
    n = args.processes
    # compiled side by side; two at a time (2 cores)
    pools: dict[str, list[Worker]] = {"stock": [], "patched": []}
    info_all: dict[str, list[dict]] = {"stock": [], "patched": []}
    try:
        for i in range(n):
            batch = {"stock": Worker("stock", settings), "patched": Worker(second, settings)}
            for kind, worker in batch.items():
                pools[kind].append(worker)
                info_all[kind].append(worker.ready())
        for kind, infos in info_all.items():
            if any(i["patched"] != (kind == "patched" and not args.control) for i in infos):
                raise RuntimeError(f"worker set-up wrong: {info_all}")
        row = ("stock, 2nd process (A/A control)" if args.control else
               f"patched, {args.prefix}-token prefix (compiled)" if args.prefix else "patched, no prefix (compiled)")
        eager_row = f"patched, {args.prefix}-token prefix (eager)"
        current = {"stock": pools["stock"][0], "patched": pools["patched"][0]}

        def pick(r: int) -> None:  # round r: every (stock process, patched process) pair in turn
            current["stock"] = pools["stock"][r % n]
            current["patched"] = pools["patched"][(r // n) % n]

        timings = {}
        for command, repeat in commands(args):
            print(f"[{command}] {args.rounds} bracketed rounds, {repeat} calls per timed command",
                  file=sys.stderr, flush=True)
            variants = {name: (lambda k=kind, c=command, m=repeat: current[k].call(c, m))
                        for name, kind in (("stock (compiled)", "stock"), (row, "patched"))}
            if args.prefix:
                variants[eager_row] = lambda c=command, m=repeat: current["patched"].call(f"{c}-eager", m)
            timings[command] = C.paired_rounds(variants, "stock (compiled)", args.rounds, timer=lambda v: v(),
                                               on_round=pick)
    finally:
        for worker in pools["stock"] + pools["patched"]:
            worker.close()

    info = {kind: infos[0] for kind, infos in info_all.items()}
    for kind, infos in info_all.items():  # every process of a kind compiled the same graphs
        for key in ("forward_graph_breaks", "generate_graph_breaks", "forward_explain_graph_breaks",
                    "forward_graphs", "generate_graphs", "generate_tokens"):
            if any(i[key] != infos[0][key] for i in infos):
                print(f"warning: {kind} processes differ in {key}: {[i[key] for i in infos]}", file=sys.stderr)
    if args.prefix:  # stock has no prefix: the patched compiled output is checked against its own eager run
        patched = info["patched"]
        same = {"forward": patched["forward_eager_max_diff"] <= 1e-3, "generate": patched["generate_eager_same"],
                "train": True}
        agree = "= eager with prefix"
    else:
        same = {
            "forward": abs(info["stock"]["forward_logits_sum"] - info["patched"]["forward_logits_sum"]) <= 1e-3,
            "generate": info["stock"]["generate_tokens"] == info["patched"]["generate_tokens"],
        }
        agree = "= stock"
    labels = {"forward": "forward (torch.compile(model))",
              "generate": f"greedy generate, {args.new_tokens} new tokens (compiled forward)",
              "train": "training step fwd+bwd (torch.compile(model))"}
    rows = []
    for command, repeat in commands(args):
        t = timings[command]
        kinds = [("stock (compiled)", "stock"), (row, "patched")] + ([(eager_row, "eager")] if args.prefix else [])
        for name, kind in kinds:
            e = t[name]
            per_call_ms = 1000 * statistics.median(e["cpu_s"]) / repeat
            if kind == "eager":
                rows.append([labels[command], name, C.fmt(e["ratio_cpu"]), C.spread(e), C.fmt(e["ratio_cpu_best"]),
                             C.fmt(e["ratio_wall"]), f"{per_call_ms:.1f}", "-", "-", "-", e["rounds"], "-"])
                continue
            explain = info[kind]["forward_explain_graph_breaks"] if command == "forward" else "-"
            rows.append([labels[command], name, C.fmt(e["ratio_cpu"]), C.spread(e), C.fmt(e["ratio_cpu_best"]),
                         C.fmt(e["ratio_wall"]), f"{per_call_ms:.1f}", info[kind][f"{command}_graph_breaks"], explain,
                         info[kind][f"{command}_graphs"], e["rounds"],
                         "baseline" if kind == "stock" else (agree if same[command] else "differs!")])
    trainable = " whose tensors require grad" if args.trainable_prefix else ""
    what = (f"with a {args.prefix}-token prefix{trainable} on all three sites (stock: none)" if args.prefix
            else "without a prefix")
    print(f"\nCompiled speed {what}, patched relative to stock transformers (1.00 = stock; higher "
          f"is faster). batch {args.batch}, source {args.source}, forward decoder length {args.target}, "
          f"{dims_note(dims)}; median of per-round ratios (CPU time of the worker processes), "
          f"{args.processes} worker process(es) per row used in turn, {args.rounds} bracketed rounds; "
          f"{args.repeat_forward} forward / {args.repeat_generate} generate calls per timed command")
    print(C.table(["call", "row", "speed vs stock", "min-max", "fastest/fastest", "wall ratio", "CPU ms/call (median)",
                   "graph breaks (compile)", "graph breaks (explain)", "graphs", "rounds", "output"], rows))
    print("forward graph (torch._dynamo.explain): " + "; ".join(
        f"{name}: {info[kind]['forward_explain_ops']} ops, {info[kind]['forward_explain_guards']} guards"
        for name, kind in (("stock", "stock"), (row, "patched"))))
    if args.processes > 1:
        for command, _ in commands(args):
            by_pair: dict = {}
            for r, ratio in enumerate(timings[command][row]["ratios_cpu"]):
                by_pair.setdefault((r % n, (r // n) % n), []).append(ratio)
            print(f"{command}: median ratio per (stock process, {'2nd' if args.control else 'patched'} process): "
                  + ", ".join(f"{a}/{b}: {statistics.median(v):.3f} ({len(v)} rounds)"
                              for (a, b), v in sorted(by_pair.items())))
    for kind in ("stock", "patched"):
        reasons = (info[kind]["forward_break_reasons"] + info[kind]["generate_break_reasons"]
                   + info[kind].get("train_break_reasons", []))
        if reasons:  # first lines, once each (the full text is in the JSON)
            print(f"{kind} graph-break reasons: {sorted({r.splitlines()[0] for r in reasons})}")
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "dims": dims, "workers": info_all, "timing": timings, "same_output": same,
               "wall_s": C.time.perf_counter() - started}
    print(f"\nwall time {results['wall_s']:.0f} s")
    name = "compile_control" if args.control else "compile_prefix" if args.prefix else "compile"
    C.write_results(name, args, results)
    return 0


def commands(args) -> list[tuple[str, int]]:
    """The timed command kinds and their calls per timed command."""
    kinds = [("forward", args.repeat_forward), ("generate", args.repeat_generate)]
    return kinds + [("train", args.repeat_forward)] if args.prefix else kinds


def dims_note(dims: dict) -> str:
    return (f"d_model {dims['d_model']}, {dims['encoder_layers']}+{dims['decoder_layers']} layers, "
            f"{dims['encoder_attention_heads']} heads, FFN {dims['encoder_ffn_dim']}, vocab {dims['vocab_size']} "
            f"(random weights)")


if __name__ == "__main__":
    sys.exit(main())
