"""Benchmark 1: generation speed, stock vs patched vs the alternatives (ratios from one run).

    python benchmarks/bench_generate.py            # bart-base dims, batch 4, source 512, 64 new tokens
    python benchmarks/bench_generate.py --quick    # tiny dims: the CI smoke test
    python benchmarks/bench_generate.py --part main    # only the main table (+ the overhead part)
    python benchmarks/bench_generate.py --part sweep   # only the source-length sweep
    python benchmarks/bench_generate.py --part main --decodings greedy  # the greedy rows alone (more rounds per run)
    python benchmarks/bench_generate.py --part overhead  # only the patch's per-call overhead
    python benchmarks/bench_generate.py --part profile   # per-operator profile, stock vs prefix (beam 4)
    python benchmarks/bench_generate.py --part sites     # greedy, the prefix on one site at a time
    python benchmarks/bench_generate.py --part halves    # the encoder alone, then greedy decoding alone
    python benchmarks/bench_generate.py --part prefix-lengths  # greedy decoding alone, prefix 1 / 20 / 80
    python benchmarks/bench_generate.py --part paths   # self-attention steps joined vs split, per step and per call
    python benchmarks/bench_generate.py --malloc steady  # glibc malloc thresholds pinned (see _common.steady_malloc)
    python benchmarks/bench_generate.py --model marian   # the main table at Marian translation dims (see MARIAN)

Every row is timed in the same process as the stock baseline, in bracketed,
alternating rounds (``stock row stock row2 stock ...``, order reversed every
other round); the table shows the median over rounds of the per-round ratio
``mean(stock before, stock after) / row time`` (relative throughput: 1.00 =
stock speed), its min-max, and the ratio of the fastest runs. Times are CPU
seconds of this single-threaded process, which other processes on the machine
inflate far less than wall time (wall-time ratios are shown too).

Rows (``generate()``, greedy and beam 4, min = max new tokens so every call
decodes the same number of steps):

* stock: unpatched transformers (``bpp.revert()``), no prefix. The baseline.
* patched, no prefix: the package applied, no prefix (the forks are not reached).
* patched, prefix 20 on encoder + decoder + cross (per-call ``prefix=``).
* naive fix (BASELINE, benchmarks/_common.py): the same prefix, cross-attention
  keys/values recomputed from the encoder on every step (what the seed's fix did).
* PEFT 0.21.2 prefix-tuning, as shipped (patch reverted), 20 virtual tokens; and
  PEFT through this package's PEFT integration when the package has one.

``--model marian`` reruns the main table (stock, patched without prefix, patched
with the prefix; no naive or PEFT rows) on a MarianMTModel with random weights
at Helsinki-NLP/opus-mt-en-de's dimensions (:data:`MARIAN`), by default batch 2,
source 128, 64 new tokens.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import json
import statistics
import sys
from unittest import mock

import torch
from transformers import GenerationConfig

SITES = ("encoder", "decoder", "cross")

#: Helsinki-NLP/opus-mt-en-de's dimensions and vocabulary (58101 tokens; weights random, built in code).
MARIAN = dict(
    vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
    activation_function="swish", scale_embedding=True, pad_token_id=58100, decoder_start_token_id=58100,
)


def marian(dims: dict = MARIAN, seed: int = 0):
    """A randomly initialised MarianMTModel (eval mode, sdpa), :data:`MARIAN` dims by default."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    return MarianMTModel._from_config(MarianConfig(**dims), attn_implementation="sdpa").eval()


def dims_caption(args, config) -> str:
    if args.model == "marian":
        return (f"Marian dims (MarianMTModel, d_model {config.d_model}, {config.encoder_layers}+"
                f"{config.decoder_layers} layers, {config.encoder_attention_heads} heads, FFN "
                f"{config.encoder_ffn_dim}, vocab {config.vocab_size}; random weights)")
    return C.dims_note(config)


def generation_config(num_beams: int, new_tokens: int) -> GenerationConfig:
    # min_new_tokens = max_new_tokens: random weights would otherwise stop at a random EOS.
    return GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, early_stopping=False,
    )


def peft_model(model, prefix_length: int):
    """A PEFT prefix-tuning model around ``model`` (shared weights), its prefix randomised (or None)."""
    ok, _ = C.peft_status()
    if not ok:
        return None
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    with C.stock():  # PEFT's own set-up, without this package's PEFT integration
        wrapped = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                                           num_virtual_tokens=prefix_length))
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in wrapped.prompt_encoder.parameters():
            parameter.normal_()
    return wrapped.eval()


def variants(model, ids, prefix, gc, peft, include_naive=True, include_peft=True):
    """name -> :class:`_common.Variant` running one ``generate()`` (extra kwargs go to generate)."""

    def run(**kwargs):
        with torch.no_grad():
            return model.generate(ids, **{"generation_config": gc, **kwargs})

    out = {
        "stock, no prefix": C.Variant(run, C.stock),
        "patched, no prefix": C.Variant(run),
        "patched, prefix 20 (enc+dec+cross)": C.Variant(lambda **kw: run(prefix=prefix, **kw)),
    }
    if include_naive:
        out["naive fix (cross k/v every step)"] = C.Variant(lambda **kw: run(prefix=prefix, **kw),
                                                            C.naive_cross_recompute)
    if include_peft and peft is not None:
        def peft_run(**kwargs):
            with torch.no_grad():
                return peft.generate(input_ids=ids, **{"generation_config": gc, **kwargs})

        out["PEFT as shipped, prefix 20"] = C.Variant(peft_run, C.peft_as_shipped)
        if C.peft_integration_available():
            out["PEFT + bpp integration, prefix 20"] = C.Variant(peft_run)
    return out


def check_outputs(fns: dict, gc) -> dict:
    """What each row decodes, against stock and the patched prefix (one short untimed call each).

    Tokens of random-weight models often coincide, so the scores of the
    sequences are compared too: "prefix ignored" means tokens *and* scores
    equal stock's.
    """
    outputs = {}
    for name, fn in fns.items():
        try:
            outputs[name] = fn(generation_config=gc, return_dict_in_generate=True, output_scores=True)
        except Exception as error:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            outputs[name] = error

    def same(a, b) -> bool:
        if not torch.equal(a.sequences, b.sequences):
            return False
        scores_a = torch.stack(a.scores)
        scores_b = torch.stack(b.scores)
        finite = torch.isfinite(scores_a) & torch.isfinite(scores_b)
        return torch.equal(torch.isfinite(scores_a), torch.isfinite(scores_b)) and torch.allclose(
            scores_a[finite], scores_b[finite], rtol=1e-4, atol=1e-5)

    stock = outputs["stock, no prefix"]
    prefixed = outputs["patched, prefix 20 (enc+dec+cross)"]
    notes = {}
    for name, value in outputs.items():
        if isinstance(value, Exception):
            notes[name] = f"error: {type(value).__name__}: {value}"[:200]
        elif name == "stock, no prefix":
            notes[name] = "baseline"
        elif same(value, stock):
            notes[name] = "= stock" + (" (prefix ignored)" if "prefix 20" in name else "")
        elif not isinstance(prefixed, Exception) and same(value, prefixed):
            notes[name] = "= patched+prefix"
        else:
            notes[name] = "prefix used" if "prefix" in name else "differs from stock!"
    return notes


def main_table(args, model, config, results):
    ids = C.source_ids(config, args.batch, args.source)
    prefix = C.random_prefix(config, args.prefix_length, SITES)
    peft = peft_model(model, args.prefix_length) if not args.no_peft else None
    rows = []
    for mode, beams in (("greedy", 1), ("beam 4", 4)):
        if mode.split()[0] not in args.decodings:
            continue
        gc = generation_config(beams, args.new_tokens)
        fns = variants(model, ids, prefix, gc, peft, include_naive=args.model == "bart")
        notes = check_outputs(fns, generation_config(beams, min(8, args.new_tokens)))
        runnable = {name: fn for name, fn in fns.items() if not notes[name].startswith("error")}
        naive_rounds = args.naive_rounds if beams == 1 else args.naive_rounds_beam
        only = {"naive fix (cross k/v every step)": naive_rounds}
        print(f"[{mode}] timing {len(runnable)} rows, {args.rounds} paired rounds", file=sys.stderr, flush=True)
        timing = C.paired_rounds(runnable, "stock, no prefix", args.rounds, only_rounds=only)
        results["main"][mode] = {"timing": timing, "notes": notes}
        for name in fns:
            if name in timing:
                t = timing[name]
                cpu = statistics.median(t["cpu_s"])
                faults = statistics.median(t["page_faults"])
                rows.append([mode, name, C.fmt(t["ratio_cpu"]), C.spread(t), C.fmt(t["ratio_cpu_best"]),
                             C.fmt(t["ratio_wall"]), f"{cpu:.2f}", f"{faults / 1000:.0f}k", t["rounds"], notes[name]])
            else:
                rows.append([mode, name, "-", "-", "-", "-", "-", "-", 0, notes[name]])
    print(f"\nGeneration speed relative to stock transformers (1.00 = stock; higher is faster). "
          f"batch {args.batch}, source {args.source}, {args.new_tokens} new tokens, prefix {args.prefix_length}; "
          f"median of per-round ratios (CPU time), one process, {dims_caption(args, config)}")
    print(C.table(["decoding", "row", "speed vs stock", "min-max", "fastest/fastest", "wall ratio",
                   "CPU s (median)", "page faults (median)", "rounds", "output (tokens + scores)"], rows))
    if peft is None and not args.no_peft:
        print(C.PEFT_HOWTO.replace("<script>", "bench_generate"))


def _saved_main(args) -> dict:
    """The main table of an earlier full run (for ``--part overhead`` alone)."""
    if args.quick:
        return {}
    for name in ("generate_main.json", "generate.json"):
        path = C.RESULTS / name
        if path.exists():
            return json.loads(path.read_text()).get("main", {})
    return {}


def overhead(args, results):
    """The patch's own cost per generate() call, measured where the arithmetic does not drown it.

    A *micro* model with bart-base's structure (6+6 layers, 12 heads: the same
    number of guarded and wrapped calls per step) but d_model 24, batch 1 and a
    source of 16 tokens, so a generate() is mostly Python and dispatch and the
    patch's share of it is large. Noise on this machine only ever adds time,
    so the overhead is the difference of the *fastest* runs (patched - stock)
    over many alternating rounds. Divided into the bart-base stock time of the
    main table, it predicts the ratio the patch alone can cost there.
    """
    dims = dict(C.BART_BASE, d_model=24, encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=64)
    if args.quick:
        dims = dict(C.TINY)
    model = C.bart(dims)
    config = model.config
    ids = C.source_ids(config, 1, 16)
    prefix = C.random_prefix(config, args.prefix_length, SITES)
    rows = []
    results["overhead"] = {"dims": dims, "batch": 1, "source": 16}
    for mode, beams in (("greedy", 1), ("beam 4", 4)):
        gc = generation_config(beams, args.new_tokens)
        fns = variants(model, ids, prefix, gc, None, include_naive=False, include_peft=False)
        timing = C.paired_rounds(fns, "stock, no prefix", args.overhead_rounds, log=lambda line: None)
        fastest = min(timing["stock, no prefix"]["cpu_s"])
        entry = {"timing": timing, "stock_fastest_cpu_s": fastest}
        main = results.get("main", {}).get(mode) or _saved_main(args).get(mode)
        big = statistics.median(main["timing"]["stock, no prefix"]["cpu_s"]) if main else None
        for name in ("patched, no prefix", "patched, prefix 20 (enc+dec+cross)"):
            extra = min(timing[name]["cpu_s"]) - fastest
            predicted = big / (big + extra) if big else None
            entry[name] = {"extra_s": extra, "per_step_us": 1e6 * extra / args.new_tokens,
                           "predicted_bart_base_ratio": predicted}
            rows.append([mode, name, f"{1000 * fastest:.1f}", f"{1000 * min(timing[name]['cpu_s']):.1f}",
                         f"{1000 * extra:+.1f}", f"{1e6 * extra / args.new_tokens:+.0f}",
                         f"{big:.2f}" if big else "-", f"{predicted:.4f}" if predicted else "-"])
        results["overhead"][mode] = entry
    print(f"\nPatch overhead per generate() call: micro model with bart-base structure "
          f"({config.encoder_layers}+{config.decoder_layers} layers, {config.encoder_attention_heads} heads, "
          f"d_model {config.d_model}), batch 1, source 16, {args.new_tokens} new tokens; fastest of "
          f"{args.overhead_rounds} alternating rounds; predicted = bart-base stock CPU s / (that + overhead)")
    print(C.table(["decoding", "row", "stock ms (fastest)", "row ms (fastest)", "overhead ms/call",
                   "overhead us/step", "bart-base stock s", "predicted bart-base ratio"], rows))


def sweep(args, model, config, results):
    lengths = [n for n in args.lengths if n <= config.max_position_embeddings]
    prefix = C.random_prefix(config, args.prefix_length, SITES)
    gc = generation_config(1, args.new_tokens)
    rows = []
    for length in lengths:
        ids = C.source_ids(config, args.batch, length)
        fns = variants(model, ids, prefix, gc, None, include_naive=length <= args.naive_max_length, include_peft=False)
        print(f"[sweep] source {length}: {args.sweep_rounds} rounds", file=sys.stderr, flush=True)
        timing = C.paired_rounds(fns, "stock, no prefix", args.sweep_rounds,
                                 only_rounds={"naive fix (cross k/v every step)": args.naive_sweep_rounds})
        tokens = args.batch * args.new_tokens
        entry = {}
        for name, t in timing.items():
            entry[name] = {**t, "tokens_per_cpu_s": tokens / statistics.median(t["cpu_s"])}
        results["sweep"][str(length)] = entry
        row = [length]
        for name in ("stock, no prefix", "patched, no prefix", "patched, prefix 20 (enc+dec+cross)",
                     "naive fix (cross k/v every step)"):
            if name in entry:
                row += [f"{entry[name]['tokens_per_cpu_s']:.1f}", C.fmt(entry[name]["ratio_cpu"])]
            else:
                row += ["-", "-"]
        rows.append(row)
    print(f"\nGreedy throughput vs source length (new tokens per CPU second; ratio = vs stock). "
          f"batch {args.batch}, {args.new_tokens} new tokens, prefix {args.prefix_length} on all sites, "
          f"{C.dims_note(config)}")
    print(C.table(["source", "stock tok/s", "ratio", "patched tok/s", "ratio", "patched+prefix tok/s", "ratio",
                   "naive tok/s", "ratio"], rows))


def _extra_seconds(timing: dict) -> list[float]:
    """Per round, a row's CPU seconds minus the mean of the stock runs around it.

    A round's ratio is ``mean(stock before, stock after) / run``, so that
    difference is ``run * (1 - ratio)``.
    """
    return [run * (1 - ratio) for run, ratio in zip(timing["cpu_s"], timing["ratios_cpu"])]


def _against_baseline(timing: dict, baseline: str) -> list[tuple[str, dict, list[float]]]:
    """``(row, its timing, its extra CPU seconds per round)`` for every row of ``timing`` but ``baseline``."""
    return [(name, t, _extra_seconds(t)) for name, t in timing.items() if name != baseline]


def sites(args, model, config, results):
    """Where a prefix's cost sits: greedy ``generate()`` with the prefix on one site at a time.

    Rows: stock; the prefix on the encoder only, decoder self-attention only,
    cross-attention only, and on all three (the main table's prefixed row),
    bracketed against stock in the same rounds. Each site's extra CPU seconds
    per call (median over rounds of ``row - mean(stock before, after)``) show
    which site holds the gap; their sum is set against the all-sites row.
    """
    ids = C.source_ids(config, args.batch, args.source)
    gc = generation_config(1, args.new_tokens)

    def run(prefix=None, context=None):
        def call(**kwargs):
            with torch.no_grad():
                extra = {} if prefix is None else {"prefix": prefix}
                return model.generate(ids, generation_config=gc, **extra, **kwargs)
        return C.Variant(call, context)

    fns = {"stock, no prefix": run(context=C.stock)}
    for name, chosen in (("encoder", ("encoder",)), ("decoder self-attention", ("decoder",)),
                         ("cross-attention", ("cross",)), ("all three", SITES)):
        fns[f"prefix {args.prefix_length}: {name}"] = run(C.random_prefix(config, args.prefix_length, chosen))
    print(f"[sites] greedy, {len(fns)} rows, {args.sites_rounds} paired rounds", file=sys.stderr, flush=True)
    timing = C.paired_rounds(fns, "stock, no prefix", args.sites_rounds)
    rows, entry = [], {}
    for name, t, extra in _against_baseline(timing, "stock, no prefix"):
        entry[name] = {**t, "extra_cpu_s": extra, "extra_cpu_s_median": statistics.median(extra)}
        rows.append([name, C.fmt(t["ratio_cpu"], 3), C.spread(t), f"{1000 * statistics.median(extra):+.0f}",
                     f"{1000 * min(extra):+.0f} .. {1000 * max(extra):+.0f}"])
    one_site = [n for n in entry if not n.endswith("all three")]
    total = sum(entry[n]["extra_cpu_s_median"] for n in one_site)
    rows.append(["sum of the three single-site rows", "-", "-", f"{1000 * total:+.0f}", "-"])
    results["sites"] = entry
    print(f"\nWhere the greedy gap sits: the prefix ({args.prefix_length} tokens) on one site at a time; batch "
          f"{args.batch}, source {args.source}, {args.new_tokens} new tokens, {args.sites_rounds} bracketed rounds, "
          f"{C.dims_note(config)}; extra = row CPU s - mean(stock before, stock after), per call")
    print(C.table(["prefix on", "speed vs stock", "min-max", "extra ms (median)", "extra ms min .. max"], rows))


def _decoding_alone(args, model, config):
    """``(encode, decode)``: the encoder alone and greedy ``generate()`` from its fixed output (``prefix=`` optional)."""
    from transformers.modeling_outputs import BaseModelOutput

    ids = C.source_ids(config, args.batch, args.source)
    mask = torch.ones_like(ids)
    gc = generation_config(1, args.new_tokens)
    encoder = model.get_encoder()
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state

    def encode(prefix=None):
        with torch.no_grad():
            return encoder(input_ids=ids) if prefix is None else encoder(input_ids=ids, prefix=prefix)

    def decode(prefix=None):
        extra = {} if prefix is None else {"prefix": prefix}
        with torch.no_grad():
            return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                                  generation_config=gc, **extra)

    return encode, decode


def halves(args, model, config, results):
    """The greedy gap split in two: the encoder alone, and decoding alone from a fixed encoder output.

    Each half is timed stock vs prefixed in bracketed rounds (:func:`_common.paired_rounds`):
    ``model.get_encoder()(ids)`` with the prefix's encoder site, and ``generate()`` given
    ``encoder_outputs`` with its decoder and cross-attention sites.
    """
    encode, decode = _decoding_alone(args, model, config)
    parts = {"encoder alone": (encode, ("encoder",)), "decoding alone": (decode, ("decoder", "cross"))}
    rows, entry = [], {}
    for name, (fn, chosen) in parts.items():
        prefix = C.random_prefix(config, args.prefix_length, chosen)
        fns = {"stock": C.Variant(fn, C.stock), "prefixed": C.Variant(lambda fn=fn, prefix=prefix: fn(prefix))}
        print(f"[halves] {name}: {args.halves_rounds} paired rounds", file=sys.stderr, flush=True)
        t = C.paired_rounds(fns, "stock", args.halves_rounds)["prefixed"]
        extra = _extra_seconds(t)
        entry[name] = {**t, "sites": list(chosen), "extra_cpu_s": extra}
        rows.append([name, "+".join(chosen), C.fmt(t["ratio_cpu"], 3), C.spread(t),
                     f"{statistics.median(t['cpu_s']):.2f}", f"{1000 * statistics.median(extra):+.0f}"])
    results["halves"] = entry
    print(f"\nThe greedy gap in two halves: prefixed vs stock, prefix {args.prefix_length}; batch {args.batch}, "
          f"source {args.source}, {args.new_tokens} new tokens, {args.halves_rounds} bracketed rounds, "
          f"{C.dims_note(config)}; extra = prefixed CPU s - mean(stock before, stock after), per call")
    print(C.table(["half", "prefix on", "speed vs stock", "min-max", "prefixed CPU s (median)", "extra ms (median)"],
                  rows))


def paths(args, model, config, results):
    """Decoder self-attention's two decoding-step paths inside a real greedy ``generate()``: per step and per call.

    The prefix (all three sites) runs with its self-attention steps forced to join the
    keys/values (``forks._decoding.SPLIT_MIN_BYTES`` above any prefix) and forced to join the
    scores (0), stock around each, in bracketed rounds, at two lengths: ``--paths-short`` and
    ``--new-tokens`` new tokens. A row's extra time over stock at both lengths splits into a part
    per decoding step (the difference over the extra steps) and a part per call (the encoder,
    the cross-attention join, the prefix's resolution). Timed alone in a tight loop
    (``bench_sdpa_keys.py --decode-step``) the small operators of a path cost less dispatch
    than they do between a model's other operators; this is the check inside the model.
    """
    from bart_prefix_patch.forks import _decoding

    ids = C.source_ids(config, args.batch, args.source)
    prefix = C.random_prefix(config, args.prefix_length, SITES)
    short = min(args.paths_short, args.new_tokens // 2)
    forced = {"keys/values joined": float("inf"), "scores joined": 0}

    def forcing(limit):
        return lambda: mock.patch.object(_decoding, "SPLIT_MIN_BYTES", limit)

    tokens = {}
    for name, limit in forced.items():
        with forcing(limit)(), torch.no_grad():
            tokens[name] = model.generate(ids, generation_config=generation_config(1, short), prefix=prefix).tolist()
    same = tokens["keys/values joined"] == tokens["scores joined"]
    extra, entry = {}, {}
    for steps in (short, args.new_tokens):
        gc = generation_config(1, steps)

        def call(with_prefix, gc=gc):
            with torch.no_grad():
                return model.generate(ids, generation_config=gc, **({"prefix": prefix} if with_prefix else {}))

        fns = {"stock": C.Variant(lambda: call(False), C.stock)}
        fns.update({name: C.Variant(lambda: call(True), forcing(limit)) for name, limit in forced.items()})
        print(f"[paths] {steps} new tokens: {args.paths_rounds} paired rounds", file=sys.stderr, flush=True)
        timing = C.paired_rounds(fns, "stock", args.paths_rounds)
        for name in forced:
            seconds = _extra_seconds(timing[name])
            extra[name, steps] = statistics.median(seconds)
            entry.setdefault(name, {})[str(steps)] = {**timing[name], "extra_cpu_s": seconds}
    rows = []
    for name in forced:
        per_step = (extra[name, args.new_tokens] - extra[name, short]) / (args.new_tokens - short)
        per_call = extra[name, short] - short * per_step
        entry[name]["per_step_s"], entry[name]["per_call_s"] = per_step, per_call
        rows.append([name, f"{1000 * extra[name, short]:+.1f}", f"{1000 * extra[name, args.new_tokens]:+.1f}",
                     f"{1e6 * per_step:+.0f}", f"{1000 * per_call:+.1f}"])
    results["paths"] = entry
    results["paths_same_tokens"] = same
    print(f"\nDecoder self-attention's decoding-step paths in greedy generate(), prefix {args.prefix_length} on all "
          f"three sites; batch {args.batch}, source {args.source}, {short} and {args.new_tokens} new tokens, "
          f"{args.paths_rounds} bracketed rounds, {C.dims_note(config)}; extra = CPU s over stock (median); "
          f"same tokens on both paths: {same}")
    print(C.table(["self-attention steps", f"extra ms, {short} tokens", f"extra ms, {args.new_tokens} tokens",
                   "per step us", "per call ms"], rows))


def prefix_lengths(args, model, config, results):
    """Does the decoding gap grow with the prefix, or is it the cost of the prefixed path itself?

    Greedy decoding alone (as in :func:`halves`), the prefix on decoder self- and
    cross-attention at each of ``--prefix-lengths``, next to the patched model
    without a prefix (an A/A control: upstream code), all bracketed against
    stock in the same rounds. A path cost shows at length 1 already; the
    prefix's own work (attention over its keys, its columns in each step's
    self-attention join) grows with the length. ``--lengths-sites each``
    times the two sites in separate rows.
    """
    _, decode = _decoding_alone(args, model, config)
    fns = {"stock": C.Variant(decode, C.stock), "patched, no prefix": C.Variant(decode)}
    groups = {"": ("decoder", "cross")}
    if args.lengths_sites == "each":
        groups = {": decoder self-attention": ("decoder",), ": cross-attention": ("cross",)}
    for length in args.prefix_lengths:
        for label, chosen in groups.items():
            prefix = C.random_prefix(config, length, chosen)
            fns[f"prefix {length}{label}"] = C.Variant(lambda prefix=prefix: decode(prefix))
    print(f"[prefix-lengths] {args.lengths_rounds} paired rounds", file=sys.stderr, flush=True)
    timing = C.paired_rounds(fns, "stock", args.lengths_rounds)
    rows, entry = [], {}
    for name, t, extra in _against_baseline(timing, "stock"):
        entry[name] = {**t, "extra_cpu_s": extra}
        rows.append([name, C.fmt(t["ratio_cpu"], 3), C.spread(t), C.fmt(t["ratio_cpu_best"], 3),
                     f"{statistics.median(t['cpu_s']):.2f}", f"{1000 * statistics.median(extra):+.0f}"])
    results["prefix_lengths"] = entry
    where = "decoder self- and cross-attention" if args.lengths_sites == "both" else "one site at a time"
    print(f"\nGreedy decoding alone by prefix length ({where}), vs stock; batch {args.batch}, "
          f"source {args.source}, {args.new_tokens} new tokens, {args.lengths_rounds} bracketed rounds, "
          f"{C.dims_note(config)}; extra = row CPU s - mean(stock before, stock after), per call")
    print(C.table(["row", "speed vs stock", "min-max", "fastest/fastest", "CPU s (median)", "extra ms (median)"], rows))


def profile(args, model, config, results):
    """Where the time of a prefix goes: per-operator CPU time, stock vs patched (+prefix), same generate().

    ``--profile`` (with ``--profile-beams``): ``--profile-rounds`` alternating
    profiled calls of each row; the median self-CPU time per operator, and the
    difference to stock. The naive row is left out (its cost is the k/v linear
    layers, obvious from its table row).
    """
    from torch.profiler import profile as torch_profile

    ids = C.source_ids(config, args.batch, args.source)
    prefix = C.random_prefix(config, args.prefix_length, SITES)
    gc = generation_config(args.profile_beams, args.new_tokens)
    fns = variants(model, ids, prefix, gc, None, include_naive=False, include_peft=False)
    per_op: dict = {name: {} for name in fns}
    calls: dict = {}
    for name in fns:
        fns[name]()  # warm-up
    for r in range(args.profile_rounds):
        for name in (fns if r % 2 == 0 else reversed(list(fns))):
            with fns[name].context(), torch_profile() as prof:
                fns[name].fn()
            events = prof.key_averages()
            for event in events:
                per_op[name].setdefault(event.key, []).append(event.self_cpu_time_total / 1e6)
                calls[(name, event.key)] = event.count
            per_op[name].setdefault("TOTAL", []).append(sum(e.self_cpu_time_total for e in events) / 1e6)
    median = {name: {op: statistics.median(v) for op, v in ops.items()} for name, ops in per_op.items()}
    stock, prefixed = median["stock, no prefix"], median["patched, prefix 20 (enc+dec+cross)"]
    ops = sorted(set(stock) | set(prefixed), key=lambda op: -abs(prefixed.get(op, 0) - stock.get(op, 0)))
    ops = ["TOTAL"] + [op for op in ops if op != "TOTAL"][:12]
    rows = []
    for op in ops:
        a, b = stock.get(op, 0.0), prefixed.get(op, 0.0)
        c = median["patched, no prefix"].get(op, 0.0)
        rows.append([op, f"{a:.3f}", calls.get(("stock, no prefix", op), "-"), f"{c:.3f}", f"{b:.3f}",
                     calls.get(("patched, prefix 20 (enc+dec+cross)", op), "-"), f"{b - a:+.3f}"])
    results["profile"] = {"beams": args.profile_beams, "rounds": args.profile_rounds, "median_self_cpu_s": median}
    print(f"\nProfile (num_beams={args.profile_beams}, batch {args.batch}, source {args.source}, {args.new_tokens} "
          f"new tokens): median self-CPU seconds per operator over {args.profile_rounds} profiled calls; the "
          f"operators whose time differs most between stock and patched+prefix")
    print(C.table(["operator", "stock s", "calls", "patched s", "patched+prefix s", "calls", "prefix - stock s"],
                  rows))


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "main", "overhead", "sweep", "profile", "sites", "halves", "prefix-lengths",
                                      "paths"],
                   default="all")
    p.add_argument("--sites-rounds", type=int, default=None, help="rounds of --part sites (default 6; --quick 1)")
    p.add_argument("--halves-rounds", type=int, default=None, help="rounds of --part halves (default 12; --quick 1)")
    p.add_argument("--paths-rounds", type=int, default=None, help="rounds of --part paths (default 6; --quick 1)")
    p.add_argument("--paths-short", type=int, default=8, help="--part paths: new tokens of the short calls")
    p.add_argument("--lengths-rounds", type=int, default=None,
                   help="rounds of --part prefix-lengths (default 12; --quick 1)")
    p.add_argument("--prefix-lengths", type=int, nargs="+", default=[1, 20, 80],
                   help="prefix lengths of --part prefix-lengths")
    p.add_argument("--lengths-sites", choices=["both", "each"], default="both",
                   help="--part prefix-lengths: the prefix on decoder self- and cross-attention together "
                        "(both), or a row per site (each)")
    p.add_argument("--overhead-rounds", type=int, default=None, help="rounds of the overhead part (default 20; --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="bracketed rounds (default 4; --quick 1)")
    p.add_argument("--decodings", nargs="+", choices=["greedy", "beam"], default=["greedy", "beam"],
                   help="--part main: the decodings timed (greedy alone fits more rounds of its rows in a run)")
    p.add_argument("--naive-rounds", type=int, default=None, help="rounds of the slow naive row, greedy (default 2)")
    p.add_argument("--naive-rounds-beam", type=int, default=None, help="... beam 4 (default 1)")
    p.add_argument("--sweep-rounds", type=int, default=None, help="rounds per sweep length (default 3; --quick 1)")
    p.add_argument("--naive-sweep-rounds", type=int, default=1)
    p.add_argument("--naive-max-length", type=int, default=1024, help="longest source timed for the naive row")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sweep lengths (default 64..1024)")
    p.add_argument("--model", choices=["bart", "marian"], default="bart",
                   help="marian: the main table only, at Marian dims, no naive/PEFT rows "
                        "(default batch 2, source 128)")
    p.add_argument("--batch", type=int, default=None, help="batch (default 4; --model marian 2)")
    p.add_argument("--source", type=int, default=None,
                   help="source length (default 512; --model marian 128; --quick 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 64; --quick 8)")
    p.add_argument("--prefix-length", type=int, default=20)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--profile", action="store_true", help="also print an operator profile of each row")
    p.add_argument("--profile-beams", type=int, default=4)
    p.add_argument("--profile-rounds", type=int, default=3)
    p.add_argument("--malloc", choices=["default", "steady"], default="default",
                   help="steady: pin glibc malloc's thresholds (see _common.steady_malloc); default: as users run")
    args = p.parse_args()
    if args.malloc == "steady" and not C.steady_malloc():
        print("--malloc steady: mallopt() unavailable (not glibc?)", file=sys.stderr)
        return 2
    quick = args.quick
    if args.model == "marian":
        if args.part not in ("all", "main"):
            p.error("--model marian runs the main table only (--part main)")
        args.part, args.no_peft = "main", True
    args.batch = args.batch or (2 if args.model == "marian" else 4)
    args.rounds = args.rounds or (1 if quick else 4)
    args.naive_rounds = args.naive_rounds if args.naive_rounds is not None else (1 if quick else 2)
    args.naive_rounds_beam = args.naive_rounds_beam if args.naive_rounds_beam is not None else 1
    args.sweep_rounds = args.sweep_rounds or (1 if quick else 3)
    args.overhead_rounds = args.overhead_rounds or (1 if quick else 20)
    args.sites_rounds = args.sites_rounds or (1 if quick else 6)
    args.halves_rounds = args.halves_rounds or (1 if quick else 12)
    args.lengths_rounds = args.lengths_rounds or (1 if quick else 12)
    args.paths_rounds = args.paths_rounds or (1 if quick else 6)
    args.source = args.source or (64 if quick else 128 if args.model == "marian" else 512)
    args.new_tokens = args.new_tokens or (8 if quick else 64)
    args.lengths = args.lengths or ([32] if quick else [64, 128, 256, 512, 1024])

    if args.model == "marian":
        tiny = dict(MARIAN, **C.TINY, pad_token_id=C.TINY["vocab_size"] - 1,
                    decoder_start_token_id=C.TINY["vocab_size"] - 1)
        model = marian(tiny if quick else MARIAN)
    else:
        model = C.bart(C.TINY if quick else C.BART_BASE)
    config = model.config
    results = {"settings": {k: (str(v) if not isinstance(v, (int, float, list, bool, type(None))) else v)
                            for k, v in vars(args).items()},
               "dims": {k: getattr(config, k) for k in C.BART_BASE}, "main": {}, "sweep": {}}
    started = C.time.perf_counter()
    if args.part in ("all", "main"):
        main_table(args, model, config, results)
    if args.part in ("all", "main", "overhead") and args.model == "bart":
        overhead(args, results)
    if args.part in ("all", "sweep"):
        sweep(args, model, config, results)
    if args.part == "sites":
        sites(args, model, config, results)
    if args.part == "halves":
        halves(args, model, config, results)
    if args.part == "prefix-lengths":
        prefix_lengths(args, model, config, results)
    if args.part == "paths":
        paths(args, model, config, results)
    if args.profile or args.part == "profile":
        profile(args, model, config, results)
    results["wall_s"] = C.time.perf_counter() - started
    print(f"\nwall time {results['wall_s']:.0f} s")
    name = "generate" if args.part == "all" else f"generate_{args.part.replace('-', '_')}"
    if args.model == "marian":
        name = "generate_marian"
    if args.malloc == "steady":
        name += "_steady"
    C.write_results(name, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
