"""The packaged reference (``bart_prefix_patch/_reference.py``, used by the self-check)
agrees with the suite's oracle (``tests/reference.py``), and shares no code with the patch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from reference import (
    random_prefix,
    reference_encoder,
    reference_greedy,
    reference_logits,
    reference_sequence_logprob,
    tiny_model,
)

from bart_prefix_patch import _reference

CONFIGS = [
    {},
    {"scale_embedding": False, "activation_function": "relu"},
    {"encoder_attention_heads": 2, "decoder_attention_heads": 4, "activation_function": "gelu_new"},
]
PREFIXES = [
    dict(sites=()),
    dict(sites=("encoder",)),
    dict(sites=("cross",), cross_len=7),
    dict(sites=("encoder", "decoder", "cross"), batch=2),
    dict(sites=("decoder", "cross"), dec_len=1, cross_len=2),
]


def _inputs(seed=5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -3:] = 0
    dec = torch.randint(3, 60, (2, 5), generator=generator)
    dec[:, 0] = 2
    dec_mask = torch.ones(2, 5, dtype=torch.long)
    dec_mask[0, -1] = 0
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("spec", PREFIXES)
def test_logits_agree(implementation, overrides, spec):
    model = tiny_model(seed=3, attn_implementation=implementation, **overrides)
    prefix = random_prefix(model.config, **spec)
    ids, mask, dec, dec_mask = _inputs()
    for masks in ((None, None), (mask, None), (mask, dec_mask)):
        want = reference_logits(model, ids, dec, *masks, prefix=prefix)
        got = _reference.logits(model, ids, dec, *masks, prefix=prefix)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        _reference.encoder_states(model, ids, mask, prefix=prefix),
        reference_encoder(model, ids, mask, prefix=prefix),
        rtol=0,
        atol=1e-12,
    )


def test_bare_model_gives_decoder_states():
    model = tiny_model(seed=4).model
    prefix = random_prefix(model.config)
    ids, mask, dec, _ = _inputs()
    torch.testing.assert_close(
        _reference.logits(model, ids, dec, mask, prefix=prefix), reference_logits(model, ids, dec, mask, prefix=prefix)
    )


@pytest.mark.parametrize("spec", PREFIXES[2:])
def test_greedy_and_logprob_agree(spec):
    model = tiny_model(seed=6, attn_implementation="sdpa")
    prefix = random_prefix(model.config, scale=2.0, **spec)
    ids, mask, _, _ = _inputs(seed=9)
    want = reference_greedy(model, ids, 8, attention_mask=mask, prefix=prefix)
    got = _reference.greedy(model, ids, 8, attention_mask=mask, prefix=prefix)
    assert torch.equal(got, want)
    torch.testing.assert_close(
        _reference.sequence_logprob(model, ids, want, mask, prefix=prefix),
        reference_sequence_logprob(model, ids, want, mask, prefix=prefix),
    )


def test_gradients_flow_to_the_prefix():
    model = tiny_model(seed=2)
    ns = random_prefix(model.config, batch=2)
    leaves = type(ns)(**{site: tuple(tuple(t.clone().requires_grad_(True) for t in pair) for pair in getattr(ns, site))
                         for site in ("encoder", "decoder", "cross")})
    ids, mask, dec, _ = _inputs()
    _reference.logits(model, ids, dec, mask, prefix=leaves).sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() > 0 for site in ("encoder", "decoder", "cross")
               for pair in getattr(leaves, site) for t in pair)


def test_packaged_reference_imports_only_torch_and_the_standard_library():
    tree = ast.parse(Path(_reference.__file__).read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the reference must not use the patch's code"
            modules.add(node.module.split(".")[0])
    assert modules <= {"__future__", "math", "typing", "torch"}, modules
