"""Benchmark 9: the floor, what a prefix costs a minimal greedy decoder written in plain PyTorch.

    python benchmarks/bench_floor.py           # bart-base dims, batch 4, source 512, 64 new tokens, prefix 20
    python benchmarks/bench_floor.py --grow buffer   # only the buffer loop
    python benchmarks/bench_floor.py --malloc steady # glibc malloc thresholds pinned (see _common.steady_malloc)
    python benchmarks/bench_floor.py --quick   # tiny model: the smoke test

Issue 14 asks a prefixed greedy ``generate()`` for >= 0.99 of stock speed.
How close can any implementation come? This script answers by measurement,
not by an estimate of FLOPs or bytes: it decodes with a *minimal* BART
greedy loop (the model's own weights; ``torch.nn.functional`` only: linear,
layer norm, GELU, sdpa; no transformers code, no patch) that gives a prefix
the cheapest treatment an exact implementation can: the encoder and cross
prefixes joined once per call, each decoder layer's self-attention
keys/values in a buffer allocated once, holding the prefix from the start
(nothing is copied per step; ``--grow buffer``). Its time without and with
the prefix, in bracketed alternating rounds, gives the prefix's own cost: the
attention over its keys and nothing else. ``--grow cat`` runs the same loop
with a self-attention cache that grows by one concatenation per step, as
stock's does (issue 14's item 4 asks the package's cache to grow exactly so):
``[cache ; new]`` without a prefix, the package's ``[prefix ; cache ; new]``
with one. The difference between the two floors is what that constraint
costs a prefix.

Another group times what section 6 measures in the same process: stock
``generate()`` against the patched one with the prefix. The extra seconds of
the minimal loop, added to stock's time, give the floor for ``generate()``:
``stock / (stock + extra)``. Before timing, the minimal loop is checked to
decode the very tokens ``generate()`` decodes (stock without the prefix,
patched with it). docs/benchmarks.md, section 9, has the numbers.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import math
import statistics
import sys

import torch
import torch.nn.functional as F

from bench_generate import generation_config


def _attention(x_q, attention, keys, values, heads, causal=False):
    """``out_proj(sdpa(q, keys, values))`` for queries ``x_q`` (keys/values already split in heads)."""
    batch, length, dim = x_q.shape
    q = F.linear(x_q, attention.q_proj.weight, attention.q_proj.bias).view(batch, length, heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, is_causal=causal)
    return F.linear(out.transpose(1, 2).reshape(batch, length, dim), attention.out_proj.weight, attention.out_proj.bias)


def _keys_values(x, attention, heads):
    batch, length, _ = x.shape

    def split(projection):
        return F.linear(x, projection.weight, projection.bias).view(batch, length, heads, -1).transpose(1, 2)

    return split(attention.k_proj), split(attention.v_proj)


def _norm(x, layer_norm):
    return F.layer_norm(x, layer_norm.normalized_shape, layer_norm.weight, layer_norm.bias, layer_norm.eps)


def _ffn(x, layer):
    return F.linear(F.gelu(F.linear(x, layer.fc1.weight, layer.fc1.bias)), layer.fc2.weight, layer.fc2.bias)


def _join(prefix_pair, cached, key, value):
    """``[prefix ; cached ; new]`` keys and values in one concatenation each (parts that exist).

    The encoder and cross joins are ``[prefix ; keys]`` (``cached`` None); a step of
    ``grow="cat"`` joins all three.
    """
    keys, values = [key], [value]
    if cached is not None:
        keys.insert(0, cached[0])
        values.insert(0, cached[1])
    if prefix_pair is not None:
        keys.insert(0, prefix_pair[0].expand(key.shape[0], -1, -1, -1))
        values.insert(0, prefix_pair[1].expand(key.shape[0], -1, -1, -1))
    if len(keys) == 1:
        return key, value
    return torch.cat(keys, dim=2), torch.cat(values, dim=2)


def minimal_greedy(model, ids, new_tokens: int, prefix=None, eos: int = 2, start: int = 2,
                   grow: str = "buffer") -> torch.Tensor:
    """Greedy decoding of a post-LN BART, ``new_tokens`` steps, as ``generate()`` with the benchmark's config.

    EOS is suppressed until the last step (``min_new_tokens = max_new_tokens``)
    and forced there (BART's ``forced_eos_token_id``, which ``generate()`` applies).

    Args:
        prefix: A :class:`bart_prefix_patch.Prefix` (batch 1) or None.
        grow: How decoder self-attention keeps its keys/values. ``"buffer"``: one
            buffer per layer allocated up front, holding the prefix from the start
            (nothing copied per step). ``"cat"``: a cache that grows by one
            concatenation per step as stock's does, ``[prefix ; cache ; new]`` with a
            prefix (the package's join), ``[cache ; new]`` without.
    """
    config = model.config
    core = model.model
    heads, dim = config.encoder_attention_heads, config.d_model
    scale = math.sqrt(dim) if config.scale_embedding else 1.0
    batch, source = ids.shape
    n_prefix = 0 if prefix is None else prefix.decoder[0][0].shape[2]
    with torch.no_grad():
        encoder = core.encoder
        x = F.embedding(ids, encoder.embed_tokens.weight) * scale + encoder.embed_positions.weight[2:2 + source]
        x = _norm(x, encoder.layernorm_embedding)
        for i, layer in enumerate(encoder.layers):
            keys, values = _join(None if prefix is None else prefix.encoder[i], None,
                                 *_keys_values(x, layer.self_attn, heads))
            x = _norm(x + _attention(x, layer.self_attn, keys, values, heads), layer.self_attn_layer_norm)
            x = _norm(x + _ffn(x, layer), layer.final_layer_norm)
        decoder = core.decoder
        cross, buffers = [], []
        for i, layer in enumerate(decoder.layers):
            cross.append(_join(None if prefix is None else prefix.cross[i], None,
                               *_keys_values(x, layer.encoder_attn, heads)))
            if grow == "buffer":
                buffer = x.new_empty(2, batch, heads, n_prefix + new_tokens, dim // heads)
                if prefix is not None:
                    buffer[0, :, :, :n_prefix] = prefix.decoder[i][0]
                    buffer[1, :, :, :n_prefix] = prefix.decoder[i][1]
                buffers.append(buffer)
        cached = [None] * len(decoder.layers)  # grow="cat": each layer's real keys/values (views)
        tokens = torch.full((batch, 1), start, dtype=torch.long)
        for step in range(new_tokens):
            y = F.embedding(tokens[:, -1:], decoder.embed_tokens.weight) * scale + decoder.embed_positions.weight[2 + step]
            y = _norm(y, decoder.layernorm_embedding)
            end = n_prefix + step + 1
            for i, layer in enumerate(decoder.layers):
                key, value = _keys_values(y, layer.self_attn, heads)
                if grow == "cat":
                    keys, values = _join(None if prefix is None else prefix.decoder[i], cached[i], key, value)
                    cached[i] = keys[:, :, n_prefix:], values[:, :, n_prefix:]
                else:
                    buffers[i][0, :, :, end - 1:end] = key
                    buffers[i][1, :, :, end - 1:end] = value
                    keys, values = buffers[i][0, :, :, :end], buffers[i][1, :, :, :end]
                out = _attention(y, layer.self_attn, keys, values, heads)
                y = _norm(y + out, layer.self_attn_layer_norm)
                y = _norm(y + _attention(y, layer.encoder_attn, *cross[i], heads), layer.encoder_attn_layer_norm)
                y = _norm(y + _ffn(y, layer), layer.final_layer_norm)
            logits = model.lm_head(y[:, -1]) + model.final_logits_bias
            if step == new_tokens - 1:  # BART's forced_eos_token_id: the last token is EOS
                chosen = torch.full((batch, 1), eos, dtype=torch.long)
            else:  # min_new_tokens = max_new_tokens, as the generate() rows: no EOS before
                logits[:, eos] = -math.inf
                chosen = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, chosen], dim=1)
    return tokens


def main() -> int:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--source", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="bracketed rounds")
    parser.add_argument("--grow", choices=["buffer", "cat"], nargs="+", default=["buffer", "cat"],
                        help="the minimal loop's self-attention keys: a buffer allocated once, a cache grown by "
                             "concatenation as stock's (see minimal_greedy), or both (default)")
    parser.add_argument("--malloc", choices=["default", "steady"], default="default",
                        help="steady: pin glibc malloc's thresholds (see _common.steady_malloc); default: as users run")
    args = parser.parse_args()
    if args.malloc == "steady" and not C.steady_malloc():
        print("--malloc steady: mallopt() unavailable (not glibc?)", file=sys.stderr)
    dims = C.TINY if args.quick else C.BART_BASE
    if args.quick:
        args.source, args.new_tokens, args.prefix, args.rounds = 24, 6, 4, 1
    model = C.bart(dims)
    config = model.config
    ids = C.source_ids(config, args.batch, args.source)
    prefix = C.random_prefix(config, args.prefix)
    gc = generation_config(1, args.new_tokens)

    def generate(**kwargs):
        with torch.no_grad():
            return model.generate(ids, generation_config=gc, **kwargs)

    def loop(grow, with_prefix):
        return lambda: minimal_greedy(model, ids, args.new_tokens, prefix if with_prefix else None, grow=grow)

    # The minimal loop is a faithful BART: it decodes what generate() decodes.
    with C.stock():
        stock_tokens = generate()
    prefixed_tokens = generate(prefix=prefix)
    same = {f"{grow}, {'prefix' if p else 'no prefix'}": torch.equal(loop(grow, p)(), prefixed_tokens if p else stock_tokens)
            for grow in args.grow for p in (False, True)}
    if not all(same.values()):
        raise SystemExit(f"the minimal loop decodes other tokens than generate(): {same}")

    rows = {
        "stock generate(), no prefix": C.Variant(generate, C.stock),
        f"patched generate(), prefix {args.prefix}": C.Variant(lambda: generate(prefix=prefix)),
    }
    timing = C.paired_rounds(rows, "stock generate(), no prefix", args.rounds)
    groups = {}
    for grow in args.grow:
        names = (f"minimal loop ({grow}), no prefix", f"minimal loop ({grow}), prefix {args.prefix}")
        groups[grow] = names
        timing.update(C.paired_rounds(dict(zip(names, (loop(grow, False), loop(grow, True)))), names[0], args.rounds))

    def baseline_per_round(name: str) -> list[float]:  # mean of the bracketing baseline runs, per round
        return [ratio * cpu for ratio, cpu in zip(timing[name]["ratios_cpu"], timing[name]["cpu_s"])]

    patched = f"patched generate(), prefix {args.prefix}"
    stocks = baseline_per_round(patched)  # stock generate()'s time, per round
    floors = {}
    for grow, (_, prefixed) in groups.items():
        # Per round: the prefix's extra seconds in the minimal loop, against that round's stock generate() time.
        extras = [cpu - base for cpu, base in zip(timing[prefixed]["cpu_s"], baseline_per_round(prefixed))]
        extra = statistics.median(extras)
        floors[grow] = {"extra_s": extra, "extra_s_per_round": extras,
                        "floor": statistics.median(stocks) / (statistics.median(stocks) + extra),
                        "floor_per_round": [s / (s + e) for s, e in zip(stocks, extras)]}
    baselines = {"stock generate(), no prefix"} | {names[0] for names in groups.values()}
    table = [[name, C.fmt(entry["ratio_cpu"], 3), "-" if name in baselines else C.spread(entry),
              C.fmt(statistics.median(entry["cpu_s"]), 3)] for name, entry in timing.items()]
    print(f"\nThe floor of a {args.prefix}-token prefix (all three sites), greedy, {C.dims_note(config)}, batch "
          f"{args.batch}, source {args.source}, {args.new_tokens} new tokens, {args.rounds} bracketed rounds, 1 thread; "
          "speed vs each group's baseline, median [min-max]:")
    print(C.table(["call", "speed vs baseline", "min-max", "CPU s per call (median)"], table))
    for grow, f in floors.items():
        print(f"minimal loop ({grow}): the prefix's own cost {f['extra_s']:+.3f} s per call (median of rounds); floor for "
              f"generate(): stock / (stock + that) = {f['floor']:.3f} (per round {min(f['floor_per_round']):.3f}-"
              f"{max(f['floor_per_round']):.3f})")
    print(f"measured patched/stock: {timing[patched]['ratio_cpu']:.3f}")
    print(f"minimal loop decodes generate()'s tokens: {same}")
    C.write_results("floor", args, {
        "dims": dims, "batch": args.batch, "source": args.source, "new_tokens": args.new_tokens, "prefix": args.prefix,
        "same_tokens": same, "floors": floors, "timing": timing,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
