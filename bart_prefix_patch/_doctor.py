"""``doctor``: what is installed, what was patched, and a self-check.

The self-check runs a tiny random BART. It compares against the plain-PyTorch
reference in ``tests/reference.py`` when the package runs from a source
checkout (an editable install), and always checks the invariants that need no
reference: no-prefix outputs identical to unpatched transformers, outputs
that depend on the input under a cross-attention prefix, greedy generate ==
teacher-forced argmax, cache == no cache, eager == sdpa.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _patcher, _registry
from ._peft import is_installed as peft_installed, wanted as peft_wanted
from ._version import __version__
from .prefix import Prefix


def _load_reference() -> Optional[object]:
    path = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_bpp_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tiny(attn_implementation: str, seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).eval()


def _prefix(config, scale: float = 2.0):
    generator = torch.Generator().manual_seed(0)

    def pairs(layers, heads, length):
        shape = (1, heads, length, config.d_model // heads)
        return [(torch.randn(shape, generator=generator) * scale, torch.randn(shape, generator=generator) * scale)
                for _ in range(layers)]

    return Prefix(
        encoder=pairs(config.encoder_layers, config.encoder_attention_heads, 3),
        decoder=pairs(config.decoder_layers, config.decoder_attention_heads, 4),
        cross=pairs(config.decoder_layers, config.decoder_attention_heads, 5),
    )


def _checks(reference) -> list[tuple[str, Callable[[], Optional[str]]]]:
    eager, sdpa = _tiny("eager"), _tiny("sdpa")
    config = eager.config
    prefix = _prefix(config)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    other = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    dec = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    dec[:, 0] = config.decoder_start_token_id

    def no_prefix_identical():
        patched = sdpa(ids, decoder_input_ids=dec).logits
        gate = _patcher.gate()
        _patcher.revert()
        try:
            stock = sdpa(ids, decoder_input_ids=dec).logits
        finally:  # as accepted before: a release verified by the self-check stays so (its result is cached)
            _patcher.apply(unknown="verify" if gate is not None and gate.accepted_by == "self-check" else None)
        return None if torch.equal(patched, stock) else "outputs without a prefix differ from unpatched transformers"

    def input_dependent():
        a = sdpa(ids, decoder_input_ids=dec, past_key_values=prefix).logits
        b = sdpa(other, decoder_input_ids=dec, past_key_values=prefix).logits
        return None if (a - b).abs().max() > 1e-3 else "outputs do not depend on the input"

    def greedy_is_argmax():
        out = sdpa.generate(ids, prefix=prefix, max_new_tokens=6, do_sample=False, num_beams=1)
        teacher = sdpa(ids, decoder_input_ids=out[:, :-1], prefix=prefix).logits.argmax(-1)
        done = torch.cumsum(out[:, 1:-1] == config.eos_token_id, dim=1) > 0
        ok = ((teacher == out[:, 1:]) | torch.cat([torch.zeros_like(done[:, :1]), done], 1)).all()
        return None if ok else "greedy generate() differs from the teacher-forced argmax"

    def cache_equals_no_cache():
        kwargs = dict(prefix=prefix, max_new_tokens=6, num_beams=3)
        same = sdpa.generate(ids, **kwargs).tolist() == sdpa.generate(ids, use_cache=False, **kwargs).tolist()
        return None if same else "generate() with a cache differs from generate() without"

    def eager_equals_sdpa():
        a = eager(ids, decoder_input_ids=dec, prefix=prefix).logits
        b = sdpa(ids, decoder_input_ids=dec, prefix=prefix).logits
        diff = (a - b).abs().max().item()
        return None if diff < 1e-4 else f"eager and sdpa differ by {diff:.2e}"

    def matches_reference():
        got = sdpa(ids, decoder_input_ids=dec, prefix=prefix).logits.double()
        want = reference.reference_logits(sdpa, ids, dec, prefix=prefix)
        diff = (got - want).abs().max().item()
        return None if diff < 1e-4 else f"differs from the reference by {diff:.2e}"

    checks = [
        ("no prefix: bitwise identical to unpatched", no_prefix_identical),
        ("cross prefix: output depends on input", input_dependent),
        ("greedy generate == teacher-forced argmax", greedy_is_argmax),
        ("generate: cache == no cache (beam 3)", cache_equals_no_cache),
        ("eager == sdpa", eager_equals_sdpa),
    ]
    if reference is not None:
        checks.append(("logits == plain-PyTorch reference", matches_reference))
    return checks


def _print_selfcheck(gate) -> None:
    result = getattr(gate, "selfcheck", None)
    if result is None:
        return
    print(f"behavioural self-check at import: {'passed' if result.passed else 'FAILED'} ({result.seconds:.1f} s)")
    for check in result.checks:
        print(f"  [{'PASS' if check.passed else 'FAIL'}] {check.name}" + ("" if check.passed else f": {check.detail}"))


def doctor() -> int:
    """Print the environment and run the self-check; 0 only if all passes."""
    import transformers

    gate = _patcher.gate()
    print(f"bart_prefix_patch {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    if gate is None or not gate.ok:
        print(f"patch: NOT APPLIED\n{gate.message if gate else 'apply() was never called'}")
        _print_selfcheck(gate)
        return 1
    print(f"patch: applied={_patcher.is_applied()}, family {gate.family}, fork {gate.fork.__name__}")
    if gate.accepted_by == "self-check":
        print(f"accepted by: the self-check (transformers {gate.version} is not in the fingerprint table; "
              f"differing functions: {', '.join(gate.mismatched) or 'none'})")
        _print_selfcheck(gate)
    else:
        print(f"accepted by: the fingerprint table (identical to transformers {gate.release})")
    refused = {model: why for model, why in gate.models.items() if why}
    print(f"models patched: {', '.join(gate.patched_models) or 'none'}"
          + (f"; not patched: {'; '.join(f'{m} ({w})' for m, w in refused.items())}" if refused else ""))
    _print_patches()
    reference = _load_reference()
    if reference is None:
        print("reference: tests/reference.py not found (not a source checkout): invariant checks only")
    failures = 0
    start = time.perf_counter()
    for name, check in _checks(reference):
        try:
            problem = check()
        except Exception as error:  # report every check, whatever breaks
            problem = f"{type(error).__name__}: {error}"
        failures += problem is not None
        print(f"  [{'PASS' if problem is None else 'FAIL'}] {name}" + (f": {problem}" if problem else ""))
    print(f"self-check: {'all passed' if not failures else f'{failures} failed'} ({time.perf_counter() - start:.1f} s)")
    return 0 if not failures else 1


def _print_patches() -> None:
    """What is installed now, grouped by owner, and the PEFT integration's state."""
    by_owner: dict[str, list[str]] = {}
    for patch in _registry.installed():
        by_owner.setdefault(patch.owner, []).append(f"{patch.target.__name__}.{patch.attr}")
    print(f"installed patches ({sum(map(len, by_owner.values()))}):")
    for owner, names in by_owner.items():
        print(f"  {owner} ({len(names)}): {', '.join(names)}")
    peft = sys.modules.get("peft")
    if peft is None:
        state = "peft not imported (installed on `import peft`)" if peft_wanted() else "off"
    else:
        state = f"peft {getattr(peft, '__version__', '?')}: {'installed' if peft_installed() else 'not installed'}"
    print(f"PEFT integration: {state if peft_wanted() else 'off (apply(peft=False) or BART_PREFIX_PATCH_PEFT=0)'}")
