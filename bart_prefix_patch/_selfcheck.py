"""Behavioural self-check of the patch on the installed transformers.

Used to accept a transformers release whose fingerprints are in no table
entry (``apply(unknown="verify")``, ``BART_PREFIX_PATCH_UNKNOWN=verify``):
the release is patched only if every check passes. It runs tiny BART models
built in code with fixed weights (eager and sdpa), through the public entry
points (``model(..., prefix=...)``, ``model.generate(..., prefix=...)``), and
compares them with :mod:`._reference`, a plain-PyTorch BART that shares no
code with the patch.

Two phases, because "identical to unpatched" needs the unpatched outputs::

    check = SelfCheck()      # models and inputs
    check.prepare()          # forks NOT installed: stock outputs without a prefix
    install_forks()
    result = check.verify()  # forks installed: every check

or ``run_selfcheck(install, uninstall)``, which does the same and uninstalls
when a check fails. Nothing global changes: weights and inputs come from
private ``torch.Generator`` objects (model construction runs inside
``torch.random.fork_rng``), thread counts are left alone, and warnings
raised inside are discarded.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _reference
from .prefix import Prefix

IMPLEMENTATIONS = ("eager", "sdpa")
_TOLERANCE = 1e-4  # float32 model vs float64 reference, relative to the largest reference value


@dataclass
class Check:
    """One check: its name, whether it passed, and what was found."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class SelfCheckResult:
    """Every check in the order run, and the seconds the self-check took."""

    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line: all passed, or the first failed check and what it found."""
        if self.passed:
            return f"{len(self.checks)} checks passed in {self.seconds:.1f} s"
        if not self.checks:
            return "no check ran"
        first = self.failed[0]
        return f"check failed: {first.name}: {first.detail}" + (
            f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        )


def _config():
    from transformers import BartConfig

    # Encoder and decoder differ in depth and heads so that code mixing them up fails.
    config = BartConfig(
        vocab_size=48, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None, scale_embedding=True,
    )
    return config


def _build(config, implementation: str) -> torch.nn.Module:
    """A tiny BART with the same weights whatever the implementation, from a private generator."""
    from transformers import BartForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # upstream initialisation draws from the global RNG
        model = BartForConditionalGeneration._from_config(config, attn_implementation=implementation)
    generator = torch.Generator().manual_seed(20250)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            if "norm" in name and name.endswith(".weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:  # weights large enough that attention is far from uniform, so masking mistakes show
                tensor.copy_(0.25 * noise)
    return model.eval()


def _pairs(generator, layers: int, heads: int, length: int, head_dim: int, batch: int, scale: float = 1.0):
    shape = (batch, heads, length, head_dim)
    return [(scale * torch.randn(shape, generator=generator), scale * torch.randn(shape, generator=generator))
            for _ in range(layers)]


def _close(got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """None when ``got`` matches ``want`` within tolerance, else the difference."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    diff = (got.detach().double() - want.detach().double()).abs().max().item()
    bound = _TOLERANCE * max(1.0, want.detach().abs().max().item())
    return None if diff <= bound else f"max difference {diff:.2e} (tolerance {bound:.1e})"


class SelfCheck:
    """Tiny models and inputs; :meth:`prepare` before the forks are installed, :meth:`verify` after."""

    def __init__(self) -> None:
        self.config = config = _config()
        self.models = {name: _build(config, name) for name in IMPLEMENTATIONS}
        generator = torch.Generator().manual_seed(7)
        batch, vocab = 2, config.vocab_size
        # A padded source: the second row ends in two pads.
        self.ids = torch.randint(3, vocab, (batch, 7), generator=generator)
        self.mask = torch.ones(batch, 7, dtype=torch.long)
        self.ids[1, -2:], self.mask[1, -2:] = config.pad_token_id, 0
        self.other = torch.randint(3, vocab, (batch, 7), generator=generator)
        self.dec = torch.randint(3, vocab, (batch, 5), generator=generator)
        self.dec[:, 0] = config.decoder_start_token_id
        enc_dim = config.d_model // config.encoder_attention_heads
        dec_dim = config.d_model // config.decoder_attention_heads
        # All three sites, one prefix per example (batch B): beams must expand it.
        self.full = Prefix(
            encoder=_pairs(generator, config.encoder_layers, config.encoder_attention_heads, 3, enc_dim, batch, 2.0),
            decoder=_pairs(generator, config.decoder_layers, config.decoder_attention_heads, 4, dec_dim, batch, 2.0),
            cross=_pairs(generator, config.decoder_layers, config.decoder_attention_heads, 5, dec_dim, batch, 2.0),
        )
        # A cross prefix exactly as long as the source: stock transformers replaces the encoder with it.
        self.cross = Prefix(
            cross=_pairs(generator, config.decoder_layers, config.decoder_attention_heads, 7, dec_dim, 1, 2.0)
        )
        self.stock: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------ phases

    def prepare(self) -> None:
        """Record stock outputs without a prefix (call while the forks are not installed)."""
        with _quiet(), torch.no_grad():
            self.stock = {name: self._no_prefix_outputs(model) for name, model in self.models.items()}

    def verify(self) -> SelfCheckResult:
        """Run every check (call once the forks are installed)."""
        start = time.perf_counter()
        result = SelfCheckResult()
        for name, check in self._checks():
            for implementation, model in self.models.items():
                try:
                    with _quiet():
                        problem = check(model, implementation)
                except Exception as error:  # a check that raises has failed
                    problem = f"{type(error).__name__}: {error}"
                label = f"{name} [{implementation}]"
                result.checks.append(Check(label, problem is None, problem or "ok"))
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------ checks

    def _checks(self) -> list[tuple[str, Callable[[torch.nn.Module, str], Optional[str]]]]:
        return [
            ("no prefix: bitwise identical to unpatched", self._no_prefix_identical),
            ("no prefix: forward == reference", self._no_prefix_reference),
            ("all three sites: forward == reference", self._all_sites_reference),
            ("cross prefix keeps the encoder", self._cross_keeps_encoder),
            ("greedy generate == reference greedy decoding", self._greedy_reference),
            ("beam search with cache == without", self._beam_cache),
            ("gradients reach the prefix", self._gradients),
        ]

    def _no_prefix_outputs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.ids, attention_mask=self.mask, decoder_input_ids=self.dec).logits
        tokens = model.generate(self.ids, attention_mask=self.mask, max_new_tokens=4, do_sample=False, num_beams=1)
        return logits, tokens

    @torch.no_grad()
    def _no_prefix_identical(self, model, implementation):
        if implementation not in self.stock:
            return "prepare() did not run before the forks were installed"
        logits, tokens = self._no_prefix_outputs(model)
        stock_logits, stock_tokens = self.stock[implementation]
        if not torch.equal(logits, stock_logits):
            return "forward logits differ from unpatched transformers"
        if not torch.equal(tokens, stock_tokens):
            return "generate() differs from unpatched transformers"
        return None

    @torch.no_grad()
    def _no_prefix_reference(self, model, implementation):
        got = model(self.ids, attention_mask=self.mask, decoder_input_ids=self.dec).logits
        return _close(got, _reference.logits(model, self.ids, self.dec, attention_mask=self.mask))

    @torch.no_grad()
    def _all_sites_reference(self, model, implementation):
        got = model(self.ids, attention_mask=self.mask, decoder_input_ids=self.dec, prefix=self.full).logits
        return _close(got, _reference.logits(model, self.ids, self.dec, attention_mask=self.mask, prefix=self.full))

    @torch.no_grad()
    def _cross_keeps_encoder(self, model, implementation):
        outputs = []
        for ids in (self.ids, self.other):
            mask = self.mask if ids is self.ids else None
            got = model(ids, attention_mask=mask, decoder_input_ids=self.dec, prefix=self.cross).logits
            problem = _close(got, _reference.logits(model, ids, self.dec, attention_mask=mask, prefix=self.cross))
            if problem:
                return problem
            outputs.append(got)
        if (outputs[0] - outputs[1]).abs().max().item() < 1e-3:
            return "outputs do not depend on the source: the cross prefix replaced the encoder"
        return None

    @torch.no_grad()
    def _greedy_reference(self, model, implementation):
        got = model.generate(self.ids, attention_mask=self.mask, prefix=self.full, max_new_tokens=6,
                             do_sample=False, num_beams=1)
        want = _reference.greedy(model, self.ids, 6, attention_mask=self.mask, prefix=self.full)
        return None if torch.equal(got, want) else f"generated {got.tolist()}, reference {want.tolist()}"

    @torch.no_grad()
    def _beam_cache(self, model, implementation):
        kwargs = dict(attention_mask=self.mask, prefix=self.full, max_new_tokens=5, do_sample=False, num_beams=3,
                      num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
        cached = model.generate(self.ids, use_cache=True, **kwargs)
        uncached = model.generate(self.ids, use_cache=False, **kwargs)
        if cached.sequences.shape[0] != 2 * self.ids.shape[0]:
            return f"{cached.sequences.shape[0]} sequences returned, expected {2 * self.ids.shape[0]}"
        if not torch.equal(cached.sequences, uncached.sequences):
            return f"with cache {cached.sequences.tolist()}, without {uncached.sequences.tolist()}"
        scores = getattr(cached, "sequences_scores", None)
        if scores is not None:
            diff = (scores - uncached.sequences_scores).abs().max().item()
            if diff > 1e-4:
                return f"beam scores differ by {diff:.2e} with and without cache"
        return None

    def _gradients(self, model, implementation):
        with torch.enable_grad():
            leaves = Prefix(**{site: [tuple(t.detach().clone().requires_grad_(True) for t in pair)
                                      for pair in getattr(self.full, site)] for site in ("encoder", "decoder", "cross")})
            weights = torch.randn(self.dec.shape + (self.config.vocab_size,),
                                  generator=torch.Generator().manual_seed(3))
            got = model(self.ids, attention_mask=self.mask, decoder_input_ids=self.dec, prefix=leaves).logits
            tensors = [t for site in ("encoder", "decoder", "cross") for pair in getattr(leaves, site) for t in pair]
            grads = torch.autograd.grad((got * weights).sum(), tensors, allow_unused=True)
            want = _reference.logits(model, self.ids, self.dec, attention_mask=self.mask, prefix=leaves)
            wanted = torch.autograd.grad((want * weights.double()).sum(), tensors)
        for index, (grad, expected) in enumerate(zip(grads, wanted)):
            if grad is None or not torch.isfinite(grad).all() or grad.abs().max() == 0:
                return f"prefix tensor {index} gets no gradient"
            problem = _close(grad, expected)
            if problem:
                return f"prefix tensor {index}: gradient {problem}"
        return None


class _quiet(warnings.catch_warnings):
    """Discard warnings raised inside (generation-config notices and the like)."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("ignore")


def run_selfcheck(install: Callable[[], None], uninstall: Optional[Callable[[], None]] = None) -> SelfCheckResult:
    """Build, record stock outputs, ``install()`` the forks, verify; ``uninstall()`` if any check failed.

    A failure to build the models or to install counts as a failed check.
    """
    start = time.perf_counter()
    try:
        check = SelfCheck()
        check.prepare()
    except Exception as error:
        return SelfCheckResult([Check("build the tiny models (unpatched)", False, f"{type(error).__name__}: {error}")],
                               time.perf_counter() - start)
    try:
        install()
        result = check.verify()
    except Exception as error:
        result = SelfCheckResult([Check("install the forks", False, f"{type(error).__name__}: {error}")])
    result.seconds = time.perf_counter() - start
    if not result.passed and uninstall is not None:
        uninstall()
    return result
