"""Shared helpers of the benchmark scripts (not part of the package).

Every script imports this module first: it pins torch to one thread *before*
torch is imported (on the 2 shared cores of the CI machine, multi-threaded
torch is ~100x slower and far noisier), puts the repository root on
``sys.path`` so the scripts run from a plain checkout, and provides

* the model dimensions (bart-base, and tiny ones for ``--quick``);
* paired, alternating timing rounds and the median of per-pair ratios;
* the two baselines that are not the package: the *naive fix* (cross-attention
  keys/values recomputed from the encoder on every decoding step) and *stock*
  transformers (``bpp.revert()``);
* PEFT detection, table printing and JSON results.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # a plain checkout: the package is importable without installing it
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")  # generation-config chatter would bury the tables

import transformers  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

import bart_prefix_patch as bpp  # noqa: E402
from bart_prefix_patch.prefix import Prefix  # noqa: E402

from _malloc import steady_malloc  # noqa: E402,F401  (re-exported: C.steady_malloc)

# ------------------------------------------------------------------ models

#: facebook/bart-base dimensions (weights are random: nothing is downloaded).
BART_BASE = dict(
    vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
)
#: ``--quick``: the same architecture, tiny.
TINY = dict(
    vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=1024,
)


def bart(dims: dict, seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> BartForConditionalGeneration:
    """A randomly initialised BART (eval mode) with the given dimensions."""
    config = BartConfig(**{**dims, **overrides})
    torch.manual_seed(seed)
    model = BartForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def random_prefix(config, length: int, sites: Sequence[str] = ("encoder", "decoder", "cross"), seed: int = 1,
                  batch: int = 1) -> Prefix:
    """A :class:`Prefix` of random keys/values (batch 1 broadcasts) on the given sites."""
    generator = torch.Generator().manual_seed(seed)
    fields = {}
    for site in sites:
        layers = config.encoder_layers if site == "encoder" else config.decoder_layers
        heads = config.encoder_attention_heads if site == "encoder" else config.decoder_attention_heads
        shape = (batch, heads, length, config.d_model // heads)
        fields[site] = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
                        for _ in range(layers)]
    return Prefix(**fields)


def source_ids(config, batch: int, length: int, seed: int = 2) -> torch.Tensor:
    """Random source token ids (no padding, no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, config.vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------- baselines


@contextlib.contextmanager
def stock():
    """Unpatched transformers inside the block: ``bpp.revert()`` restores the exact upstream functions.

    The entry guards stay installed and pass every call without a prefix
    through untouched; ``bpp.apply()`` re-installs the forks on exit.
    """
    bpp.revert()
    try:
        yield
    finally:
        bpp.apply()


def _attention_class():
    from transformers.models.bart import modeling_bart

    return modeling_bart.BartAttention


@contextlib.contextmanager
def naive_cross_recompute():
    """BASELINE, not the package: the naive fix (the seed's), cross keys/values recomputed every step.

    While the block runs, every cross-attention call reaches the patched
    attention *without* its cache, so the fork projects the encoder states and
    concatenates ``[prefix ; encoder projections]`` on every decoding step
    instead of once per ``generate()`` call (and never reuses the cross cache).
    Results are identical to the package's; only the work differs. Requires
    the patch to be applied (it wraps the installed fork).
    """
    if not bpp.is_applied():
        raise RuntimeError("naive_cross_recompute() wraps the applied patch: call bpp.apply() first")
    owner = _attention_class()
    installed = owner.__dict__["forward"]

    def forward(self, hidden_states, key_value_states=None, *args, **kwargs):
        if key_value_states is not None:  # cross-attention: forget the cache, recompute everything
            for name in ("cache", "past_key_values", "past_key_value"):
                kwargs.pop(name, None)
        return installed(self, hidden_states, key_value_states, *args, **kwargs)

    forward.__wrapped__ = installed
    owner.forward = forward
    try:
        yield
    finally:
        owner.forward = installed


def peft_status() -> tuple[bool, str]:
    """(importable, version or reason) for PEFT."""
    try:
        import peft
    except ImportError:
        return False, "not installed"
    return True, peft.__version__


PEFT_HOWTO = (
    "PEFT: not installed (PEFT rows skipped). To include them: python3 -m venv /tmp/peft && "
    "/tmp/peft/bin/pip install -c constraints.txt -e . peft==0.21.2 matplotlib && "
    "/tmp/peft/bin/python benchmarks/<script>.py"
)


def peft_integration_available() -> bool:
    """Whether this package version ships the PEFT integration (``bpp.apply(peft=...)``)."""
    import inspect

    return "peft" in inspect.signature(bpp.apply).parameters


@contextlib.contextmanager
def peft_as_shipped():
    """PEFT's own code path: the patch (and with it any PEFT integration) reverted."""
    with stock():
        yield


# ------------------------------------------------------------------ timing


def cpu_seconds() -> float:
    """CPU time of this process (user + system): robust to other processes sharing the cores."""
    return time.process_time()


def minor_faults() -> int:
    """Minor page faults of this process so far (a fresh page from the kernel, zero-filled, is one)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Measurement:
    """CPU and wall seconds and minor page faults of one call."""

    __slots__ = ("cpu", "wall", "faults", "result")

    def __init__(self, cpu: float, wall: float, result=None, faults: int = 0):
        self.cpu, self.wall, self.result, self.faults = cpu, wall, result, faults


class Variant:
    """A timed call and the context it runs in; entering/leaving the context is not timed.

    ``context`` is a zero-argument context-manager factory, e.g. :func:`stock`
    (``bpp.revert()`` / ``bpp.apply()`` re-run the version gate, which must not
    count as generation time).
    """

    def __init__(self, fn: Callable[..., object], context: Callable[[], contextlib.AbstractContextManager] = None):
        self.fn = fn
        self.context = context or contextlib.nullcontext

    def __call__(self, **kwargs):
        with self.context():
            return self.fn(**kwargs)


def measure(variant: Callable[[], object]) -> Measurement:
    """Time one call; a :class:`Variant`'s context is entered and left outside the timed region."""
    context = variant.context() if isinstance(variant, Variant) else contextlib.nullcontext()
    fn = variant.fn if isinstance(variant, Variant) else variant
    with context:
        faults = minor_faults()
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        faults = minor_faults() - faults
    return Measurement(cpu, wall, result, faults)


def paired_rounds(
    variants: dict[str, Callable[[], object]],  # callables or Variants
    baseline: str,
    rounds: int,
    warmup: bool = True,
    only_rounds: Optional[dict[str, int]] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    timer: Callable[[Callable[[], object]], "Measurement"] = None,
    on_round: Callable[[int], None] = None,
) -> dict:
    """Time every variant against ``baseline`` in bracketed, alternating rounds; one process.

    A round runs ``B v1 B v2 B ... vn B``: every variant sits between two
    baseline runs, and its ratio for the round is ``mean(B before, B after) /
    variant`` (relative throughput: 1.00 = as fast as the baseline, 0.5 = twice
    as slow), so a drift of the machine hits both sides of the pair alike. The
    variant order is reversed every other round. The result is the median
    ratio over rounds, with min and max, and the ratio of the fastest runs
    (``min B / min variant``: contention only ever adds time). ``only_rounds``
    limits slow variants to their first N rounds. ``timer`` replaces :func:`measure`
    (bench_compile.py: the call runs, and is timed, in a worker process);
    ``on_round(r)`` is called before round ``r`` (0-based) starts.

    Returns:
        ``{name: {"ratio_cpu": median, "ratio_cpu_min", "ratio_cpu_max", "ratio_cpu_best",
        "ratio_wall": median, "cpu_s": [...], "wall_s": [...], "rounds": n}}`` (the
        baseline's entry has its own runs and ratios 1).
    """
    only_rounds = only_rounds or {}
    timer = timer or measure
    others = [n for n in variants if n != baseline]
    if warmup:  # one untimed call each (allocator, lazy inits); slow variants limited by only_rounds skip it
        for name in [baseline, *others]:
            if name not in only_rounds:
                variants[name]()
    times: dict[str, list[Measurement]] = {name: [] for name in variants}
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in others}

    def timed(name: str, r: int) -> Measurement:
        m = timer(variants[name])
        times[name].append(m)
        log(f"  round {r + 1}/{rounds} {name:<36} cpu {m.cpu:7.2f} s  wall {m.wall:7.2f} s  page faults {m.faults}")
        return m

    for r in range(rounds):
        if on_round is not None:
            on_round(r)
        order = [n for n in others if r < only_rounds.get(n, rounds)]
        if r % 2:
            order.reverse()
        before = timed(baseline, r)
        for name in order:
            m = timed(name, r)
            after = timed(baseline, r)
            ratios[name].append(((before.cpu + after.cpu) / 2 / m.cpu, (before.wall + after.wall) / 2 / m.wall))
            before = after
    out = {}
    base = times[baseline]
    out[baseline] = {"ratio_cpu": 1.0, "ratio_cpu_min": 1.0, "ratio_cpu_max": 1.0, "ratio_cpu_best": 1.0,
                     "time_ratio_cpu": 1.0, "ratio_wall": 1.0, "cpu_s": [m.cpu for m in base], "wall_s": [m.wall for m in base],
                     "page_faults": [m.faults for m in base], "rounds": rounds}
    for name in others:
        if not ratios[name]:  # limited to 0 rounds: not timed, left out
            continue
        cpu_ratios = [c for c, _ in ratios[name]]
        runs = times[name]
        out[name] = {
            "ratio_cpu": statistics.median(cpu_ratios),
            "ratio_cpu_min": min(cpu_ratios),
            "ratio_cpu_max": max(cpu_ratios),
            "ratio_cpu_best": min(m.cpu for m in base) / min(m.cpu for m in runs),
            "time_ratio_cpu": statistics.median(1 / c for c in cpu_ratios),
            "ratio_wall": statistics.median(w for _, w in ratios[name]),
            "ratios_cpu": cpu_ratios,
            "cpu_s": [m.cpu for m in runs],
            "wall_s": [m.wall for m in runs],
            "page_faults": [m.faults for m in runs],
            "rounds": len(runs),
        }
    return out


# ------------------------------------------------------------------ output


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine() -> dict:
    """Where and how the numbers were measured."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for text in handle:
                if text.startswith("model name"):
                    cpu = text.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bart_prefix_patch": bpp.__version__,
        "peft": peft_status()[1],
        "load_average_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: the CI smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/<name>.json in full mode, nothing with --quick)")
    return p


def write_results(name: str, args, data: dict) -> Optional[Path]:
    """Write ``data`` (+ machine notes) as JSON; returns the path (None with --quick and no --out)."""
    path = args.out if args.out is not None else (None if args.quick else RESULTS / f"{name}.json")
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "quick": bool(args.quick), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"\nresults: {path}")
    return path


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def spread(entry: dict, invert: bool = False) -> str:
    """``min-max`` of a paired_rounds entry's per-round CPU ratios (``invert``: as time ratios)."""
    if entry["rounds"] <= 1:
        return "(1 round)"
    if entry["ratio_cpu_min"] == entry["ratio_cpu_max"] == 1.0:
        return "-"
    if invert:
        return f"{1 / entry['ratio_cpu_max']:.2f}-{1 / entry['ratio_cpu_min']:.2f}"
    return f"{entry['ratio_cpu_min']:.2f}-{entry['ratio_cpu_max']:.2f}"


#: Environment of the memory-measuring child processes. Setting glibc's mmap threshold turns off its
#: dynamic adjustment: every block >= 64 KiB is mmap'ed and unmapped when freed, so RSS follows the
#: live tensors instead of the allocator's history (without it, peak RSS of the very same generate()
#: varied by +-50% from process to process).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child_env() -> dict:
    return {**os.environ, **MEMORY_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def dims_note(config) -> str:
    """``bart-base dims`` or the tiny sizes, for table captions."""
    if all(getattr(config, k) == v for k, v in BART_BASE.items()):
        return "bart-base dims (random weights)"
    return (f"tiny dims (d_model {config.d_model}, {config.encoder_layers}+{config.decoder_layers} layers, "
            f"vocab {config.vocab_size})")
