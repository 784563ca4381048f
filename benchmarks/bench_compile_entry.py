"""Benchmark 7b: where a compiled prefixed generate() spends its extra time, in one process.

    python benchmarks/bench_compile_entry.py           # bench_compile.py's sizes, prefix 20, source 512
    python benchmarks/bench_compile_entry.py --quick   # tiny model: the smoke test

bench_compile.py compares a stock process with a patched one, so its ratios
include how two processes differ (a few percent, its ``--control`` run).
This script asks a narrower question inside one patched process (one
thread, bracketed alternating rounds, ``_common.paired_rounds``): what does
the prefix cost a compiled greedy ``generate()`` (``model.forward =
torch.compile(model.forward)``, default dynamic cache), and what did the
per-step graph break cost? Group 1, baseline "compiled generate, no
prefix" (the upstream code under the patch, as section 5 measured it):

* ``prefix N, as shipped``: each decoding step's model inputs carry the
  call's state (``_guards.state_into_model_inputs``), so the compiled forward
  runs every step as one graph, attention forks included;
* ``prefix N, state read at a graph break`` (the package before that change,
  rebuilt here): this script wraps ``prepare_inputs_for_generation`` to take
  the state back out of one model's inputs, so each step's compiled forward
  leaves the graph once to read it (a ``torch.compiler.disable``d function,
  dynamo's "graph break").

Group 2 times the encoder alone (``generate()`` runs it eagerly, outside the
compiled forward) without and with the prefix. docs/benchmarks.md, section 7,
has the answer.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import statistics
from typing import Callable

import torch
from torch._dynamo.utils import counters

import bart_prefix_patch as bpp
from bart_prefix_patch import _state
from bench_compile import SMALL, dims_note
from bench_generate import generation_config


def state_read_at_a_graph_break(model: torch.nn.Module) -> Callable[[], None]:
    """Wrap ``prepare_inputs_for_generation`` of ``model``'s class to drop the call's state for ``model`` only.

    Returns the function that puts the package's method back.
    """
    cls = type(model)
    installed = cls.__dict__["prepare_inputs_for_generation"]  # the package's (bart_prefix_patch applied)

    def prepare(self, *args, **kwargs):
        inputs = installed(self, *args, **kwargs)
        if self is model:
            inputs.pop(_state.STATE_KWARG, None)
        return inputs

    cls.prepare_inputs_for_generation = prepare
    return lambda: setattr(cls, "prepare_inputs_for_generation", installed)


def main() -> int:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=16, help="bracketed rounds")
    parser.add_argument("--repeat", type=int, default=2, help="calls per timed run")
    args = parser.parse_args()
    dims = C.TINY if args.quick else SMALL
    if args.quick:
        args.prefix, args.source, args.new_tokens, args.rounds, args.repeat = 4, 16, 4, 1, 1

    def build():
        model = C.bart(dims)
        model.forward = torch.compile(model.forward)
        return model

    plain, shipped, broken = build(), build(), build()
    restore = state_read_at_a_graph_break(broken)
    try:
        config = plain.config
        prefix = C.random_prefix(config, args.prefix)
        ids = C.source_ids(config, args.batch, args.source)
        gc = generation_config(1, args.new_tokens)

        def repeated(fn):
            def run():
                with torch.no_grad():
                    for _ in range(args.repeat):
                        out = fn()
                return out
            return run

        generate = {
            "compiled generate, no prefix": repeated(lambda: plain.generate(ids, generation_config=gc)),
            f"prefix {args.prefix}, as shipped":
                repeated(lambda: shipped.generate(ids, generation_config=gc, prefix=prefix)),
            f"prefix {args.prefix}, state read at a graph break":
                repeated(lambda: broken.generate(ids, generation_config=gc, prefix=prefix)),
        }
        # Compile and settle (dynamic shapes after the first call); count each row's graph breaks.
        breaks, tokens = {}, {}
        for name, fn in generate.items():
            counters.clear()
            for _ in range(3):
                tokens[name] = fn()
            breaks[name] = int(sum(counters["graph_break"].values()))
        names = list(generate)
        same = torch.equal(tokens[names[1]], tokens[names[2]])
        encoder = {
            "encoder, no prefix": repeated(lambda: plain.get_encoder()(input_ids=ids)),
            f"encoder, prefix {args.prefix}": repeated(lambda: shipped.get_encoder()(input_ids=ids, prefix=prefix)),
        }
        timing = C.paired_rounds(generate, names[0], args.rounds)
        timing.update(C.paired_rounds(encoder, "encoder, no prefix", args.rounds))
    finally:
        restore()

    rows = []
    for name, entry in timing.items():
        baseline = name in (names[0], "encoder, no prefix")
        rows.append([name, C.fmt(entry["ratio_cpu"]), "-" if baseline else C.spread(entry),
                     C.fmt(1e3 * statistics.median(entry["cpu_s"]) / args.repeat, 1), breaks.get(name, "-")])
    print(f"\nCompiled greedy generate() in one patched process ({dims_note(dims)}, batch {args.batch}, "
          f"source {args.source}, {args.new_tokens} new tokens, prefix {args.prefix} on all three sites, "
          f"{args.rounds} bracketed rounds, 1 thread); speed vs each group's baseline, median [min-max]:")
    print(C.table(["call", "speed vs baseline", "min-max", "CPU ms per call (median)", "graph breaks (warm-up)"], rows))
    print(f"same tokens, as shipped and state read at a graph break: {same}")
    C.write_results("compile_entry", args, {
        "dims": dims, "batch": args.batch, "source": args.source, "new_tokens": args.new_tokens, "prefix": args.prefix,
        "repeat": args.repeat, "graph_breaks": breaks, "same_tokens": same, "timing": timing,
        "bpp_version": bpp.__version__,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
