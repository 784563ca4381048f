"""Worker process of bench_compile.py: one compiled model, stock or patched, timed on command.

    python benchmarks/_compile_worker.py stock   '<settings JSON>'
    python benchmarks/_compile_worker.py patched '<settings JSON>'

The *stock* worker never imports ``bart_prefix_patch`` (nor benchmarks/_common.py,
which does): importing the package patches transformers globally, so stock and
patched cannot share a process. Both workers build the same seeded models
(random weights, no prefix), compile them, warm them up (compilation happens
here, outside any timed call), count graph breaks, print one ``ready`` JSON line
and then answer commands read from stdin, one per line:

* ``forward``  - one call of ``torch.compile(model)`` (teacher-forced forward);
* ``generate`` - one greedy ``model.generate()`` with ``model.forward = torch.compile(model.forward)``
  and the default dynamic cache;
* ``train``    - with ``--prefix N`` only: one compiled training step's forward + backward
  (``torch.compile(model)`` with labels); stock trains every parameter (bench_train.py's
  baseline), patched trains the prefix of a frozen model;
* ``forward-eager`` / ``generate-eager`` / ``train-eager`` - patched with a prefix only: the
  same calls on the uncompiled model (what a prefixed call cost under torch.compile before it
  was traced);
* ``quit``.

With ``"prefix": N`` in the settings (bench_compile.py ``--prefix N``), the patched worker passes
a seeded random ``Prefix`` of N tokens on encoder self-, decoder self- and cross-attention to every
call; the stock worker runs the same calls without one. ``"trainable_prefix": true``
(``--trainable-prefix``): that prefix's tensors require grad, as a prefix straight from training.
``"malloc": "steady"`` (``--malloc steady``): glibc's malloc thresholds are pinned before anything is
built (``_malloc.steady_malloc``), so freed blocks are reused instead of re-faulted in every process alike.

``forward N`` / ``generate N`` time N calls in a row as one measurement.

Each timed command answers ``{"cpu": s, "wall": s, "faults": n, "recompiles": n}``:
CPU seconds of this process (user + system), wall seconds, minor page faults,
and how many graphs dynamo compiled during the call (0 once warm).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

KIND = sys.argv[1]
SETTINGS = json.loads(sys.argv[2])
if KIND == "patched":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import bart_prefix_patch  # noqa: F401  (the patch: applied on import)
elif KIND != "stock":
    raise SystemExit(f"unknown worker kind {KIND!r}")
STEADY_MALLOC = False
if SETTINGS.get("malloc") == "steady":  # before the models allocate anything
    from _malloc import steady_malloc  # noqa: E402  (imports nothing: the stock worker stays unpatched)

    STEADY_MALLOC = steady_malloc()


def send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(text: str) -> None:
    print(f"[{KIND}] {text}", file=sys.stderr, flush=True)


def build() -> BartForConditionalGeneration:
    torch.manual_seed(SETTINGS["seed"])
    model = BartForConditionalGeneration._from_config(BartConfig(**SETTINGS["dims"]), attn_implementation="sdpa")
    return model.eval()


def graphs_compiled() -> int:
    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> tuple[int, list[str]]:
    """Graph breaks dynamo took while compiling so far (all frames), and their reasons."""
    reasons = counters["graph_break"]
    return int(sum(reasons.values())), sorted(reasons)[:10]


def random_prefix(dims: dict, length: int):
    """A seeded random ``Prefix`` of ``length`` tokens on all three sites (patched worker only)."""
    import bart_prefix_patch as bpp

    gen = torch.Generator().manual_seed(3)
    heads = dims["encoder_attention_heads"]
    head_dim = dims["d_model"] // heads

    def site(layers: int):
        return [tuple(torch.randn(1, heads, length, head_dim, generator=gen) for _ in range(2)) for _ in range(layers)]

    return bpp.Prefix(encoder=site(dims["encoder_layers"]), decoder=site(dims["decoder_layers"]),
                      cross=site(dims["decoder_layers"]))


def trainable(prefix) -> list:
    """Make every key/value tensor of ``prefix`` require grad; returns them (the leaves a step trains)."""
    return [t.requires_grad_() for site in (prefix.encoder, prefix.decoder, prefix.cross) for pair in site for t in pair]


def main() -> int:
    dims, batch, source, new_tokens = SETTINGS["dims"], SETTINGS["batch"], SETTINGS["source"], SETTINGS["new_tokens"]
    n_prefix = SETTINGS.get("prefix", 0)
    prefix = random_prefix(dims, n_prefix) if n_prefix and KIND == "patched" else None
    if prefix is not None and SETTINGS.get("trainable_prefix"):
        # Served as it came out of training: leaf tensors that require grad (forward and generate
        # still run under no_grad).
        trainable(prefix)
    extra = {"prefix": prefix} if prefix is not None else {}
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, dims["vocab_size"], (batch, source), generator=gen)
    dec = torch.randint(4, dims["vocab_size"], (batch, SETTINGS["target"]), generator=gen)
    gc = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
    )
    info = {"kind": KIND, "torch": torch.__version__, "transformers": transformers.__version__,
            "patched": "bart_prefix_patch" in sys.modules, "steady_malloc": STEADY_MALLOC}

    # Graph breaks of the forward as torch._dynamo.explain sees them (what tests/test_compile.py counts).
    explain_model = build()
    explained = torch._dynamo.explain(explain_model)(ids, decoder_input_ids=dec, **extra)
    info["forward_explain_graph_breaks"] = explained.graph_break_count
    info["forward_explain_graphs"] = explained.graph_count
    info["forward_explain_reasons"] = [str(r.reason)[:200] for r in explained.break_reasons][:10]
    info["forward_explain_ops"] = sum(len(ops) for ops in explained.ops_per_graph)
    info["forward_explain_guards"] = len(explained.out_guards)
    del explain_model
    torch._dynamo.reset()
    counters.clear()

    # forward: torch.compile(model), warmed up (compiled) here.
    fwd_model = build()
    compiled = torch.compile(fwd_model)
    started = time.perf_counter()
    with torch.no_grad():
        reference_logits = compiled(ids, decoder_input_ids=dec, **extra).logits
        compiled(ids, decoder_input_ids=dec, **extra)
    info["forward_compile_s"] = time.perf_counter() - started
    info["forward_graph_breaks"], info["forward_break_reasons"] = graph_breaks()
    info["forward_graphs"] = graphs_compiled()
    info["forward_logits_sum"] = float(reference_logits.double().sum())
    log(f"forward compiled in {info['forward_compile_s']:.1f} s, {info['forward_graph_breaks']} graph breaks")
    counters.clear()

    # generate: model.forward = torch.compile(model.forward), default dynamic cache, warmed up here.
    gen_model = build()
    gen_model.forward = torch.compile(gen_model.forward)
    started = time.perf_counter()
    with torch.no_grad():
        tokens = gen_model.generate(ids, generation_config=gc, **extra)
        for _ in range(SETTINGS.get("generate_warmups", 2) - 1):  # dynamic shapes settle after the first call
            gen_model.generate(ids, generation_config=gc, **extra)
    info["generate_compile_s"] = time.perf_counter() - started
    info["generate_graph_breaks"], info["generate_break_reasons"] = graph_breaks()
    info["generate_graphs"] = graphs_compiled()
    info["generate_tokens"] = tokens.tolist()
    log(f"generate compiled in {info['generate_compile_s']:.1f} s, {info['generate_graph_breaks']} graph breaks")
    calls = {
        "forward": lambda: compiled(ids, decoder_input_ids=dec, **extra),
        "generate": lambda: gen_model.generate(ids, generation_config=gc, **extra),
    }
    if n_prefix:
        # train: forward + backward of a compiled training step (bench_train.py's rows: stock trains
        # every parameter, prefix-tuning the prefix of a frozen model).
        train_model = build()
        train_extra = {}
        if prefix is not None:
            # Its own prefix, trainable; forward and generate keep theirs (inference tensors unless trainable_prefix).
            train_model.requires_grad_(False)
            train_prefix = random_prefix(dims, n_prefix)
            leaves = trainable(train_prefix)
            train_extra = {"prefix": train_prefix}
        else:
            leaves = list(train_model.parameters())
        labels = dec.clone()
        compiled_train = torch.compile(train_model)

        def step(model) -> None:
            model(ids, labels=labels, **train_extra).loss.backward()
            for leaf in leaves:
                leaf.grad = None

        counters.clear()
        started = time.perf_counter()
        step(compiled_train)
        step(compiled_train)
        info["train_compile_s"] = time.perf_counter() - started
        info["train_graph_breaks"], info["train_break_reasons"] = graph_breaks()
        info["train_graphs"] = graphs_compiled()
        log(f"training step compiled in {info['train_compile_s']:.1f} s, {info['train_graph_breaks']} graph breaks")
        calls["train"] = lambda: step(compiled_train)
        if prefix is not None:  # the same calls, uncompiled
            eager_gen = build()
            calls["forward-eager"] = lambda: fwd_model(ids, decoder_input_ids=dec, **extra)
            calls["generate-eager"] = lambda: eager_gen.generate(ids, generation_config=gc, **extra)
            calls["train-eager"] = lambda: step(train_model)
            with torch.no_grad():
                info["generate_eager_same"] = eager_gen.generate(ids, generation_config=gc, **extra).tolist() == \
                    info["generate_tokens"]
                eager_logits = fwd_model(ids, decoder_input_ids=dec, **extra).logits
            info["forward_eager_max_diff"] = float((eager_logits - reference_logits).abs().max())
    send({"ready": info})

    for line in sys.stdin:
        command, *count = line.split()
        if command == "quit":
            break
        fn, repeat = calls[command], int(count[0]) if count else 1
        graphs = graphs_compiled()
        with torch.set_grad_enabled(command.startswith("train")):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                fn()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        send({"cpu": cpu, "wall": wall, "faults": faults, "recompiles": graphs_compiled() - graphs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
