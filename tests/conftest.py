"""Shared fixtures: every test starts with the patch applied and leaves it so."""

from __future__ import annotations

import gc

import pytest
import torch

import bart_prefix_patch as bpp
from reference import random_prefix, tiny_model

# Tiny models on 2 shared cores: OpenMP hand-offs cost more than the math
# (a 14x32 linear takes ~10 us on one thread, milliseconds on two).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _patch_applied():
    assert bpp.apply(strict=True)
    torch.manual_seed(0)
    yield
    bpp.apply(strict=True)


def fresh_dynamo() -> None:
    """``torch._dynamo.reset()`` after collecting garbage, before a test compiles in this process.

    A model an earlier test attached a prefix to and left in a reference cycle is finalized
    whenever the collector runs, possibly while dynamo traces the next test's model: the
    finalizer flips ``_attach._ANY_ATTACHED``, which the entry guard's graph is guarded on, and
    dynamo fails with "Guard failed on the same frame it was created" (seen once in CI).
    """
    gc.collect()
    torch._dynamo.reset()


def make_prefix(config, **kwargs) -> bpp.Prefix:
    """A random :class:`bpp.Prefix` (see ``reference.random_prefix``)."""
    ns = random_prefix(config, **kwargs)
    return bpp.Prefix(encoder=ns.encoder, decoder=ns.decoder, cross=ns.cross)


@pytest.fixture(params=["split", "join"])
def decoding_path(request, monkeypatch):
    """Force how decoder self-attention decoding steps meet the prefix: scores joined, or keys/values joined.

    The forks choose by the prefix's size (``_decoding.SPLIT_MIN_BYTES``,
    by default 0: every prefix splits on the CPU); the join is the path of
    other devices, so tests that must cover both paths take this fixture.
    """
    from bart_prefix_patch.forks import _decoding

    monkeypatch.setattr(_decoding, "SPLIT_MIN_BYTES", 0 if request.param == "split" else float("inf"))
    return request.param


@pytest.fixture(params=["eager", "sdpa"])
def model(request):
    """A tiny random BART, once per attention implementation."""
    return tiny_model(seed=0, attn_implementation=request.param)


def source_batch(config, batch=2, length=7, pad_last=0, seed=1):
    """Random source ids and mask; the last example gets ``pad_last`` right pads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        ids[-1, -pad_last:] = config.pad_token_id
        mask[-1, -pad_last:] = 0
    return ids, mask


def target_batch(config, batch=2, length=6, seed=2):
    """Random decoder inputs starting with the decoder start token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    ids[:, 0] = config.decoder_start_token_id
    return ids
