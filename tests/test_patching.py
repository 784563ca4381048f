"""apply / revert / idempotence, import order, version gate."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import fresh_dynamo, make_prefix, source_batch, target_batch
from reference import tiny_model
from transformers.models.bart import modeling_bart

import bart_prefix_patch as bpp
from bart_prefix_patch import _compat, _patcher


def _logits(model, **kwargs):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    return model(ids, attention_mask=mask, decoder_input_ids=target_batch(config), **kwargs).logits


def test_no_prefix_is_bitwise_identical_to_unpatched(model):
    patched = _logits(model)
    with_cache = model(*source_batch(model.config)[:1], decoder_input_ids=target_batch(model.config), use_cache=True)
    bpp.revert()
    assert not bpp.is_applied()
    stock = _logits(model)
    stock_cache = model(*source_batch(model.config)[:1], decoder_input_ids=target_batch(model.config), use_cache=True)
    assert torch.equal(patched, stock)
    assert torch.equal(with_cache.logits, stock_cache.logits)


def test_revert_restores_exact_originals():
    forked = modeling_bart.BartAttention.forward
    assert hasattr(forked, "__wrapped__")
    original = bpp.get_original(modeling_bart.BartAttention, "forward")
    bpp.revert()
    assert modeling_bart.BartAttention.__dict__["forward"] is original
    assert bpp.apply() is True
    assert modeling_bart.BartAttention.__dict__["forward"].__wrapped__ is original


def test_apply_twice_is_a_no_op():
    before = modeling_bart.BartAttention.__dict__["forward"]
    assert bpp.apply() and bpp.apply()
    assert modeling_bart.BartAttention.__dict__["forward"] is before
    bpp.revert()
    bpp.revert()
    assert bpp.apply()
    # Original recorded once: revert after a re-apply still gives upstream code.
    bpp.revert()
    assert not hasattr(modeling_bart.BartAttention.__dict__["forward"], "__self_wrapper__")
    assert modeling_bart.BartAttention.__dict__["forward"] is bpp.get_original(modeling_bart.BartAttention, "forward")


def test_prefix_without_patch_raises(model):
    prefix = make_prefix(model.config)
    bpp.revert()
    with pytest.raises(bpp.PatchNotAppliedError):
        _logits(model, prefix=prefix)
    with pytest.raises(bpp.PatchNotAppliedError):
        _logits(model, past_key_values=prefix)
    with pytest.raises(bpp.PatchNotAppliedError):
        model.generate(source_batch(model.config)[0], prefix=prefix, max_new_tokens=2)
    with pytest.raises(bpp.PatchNotAppliedError):
        bpp.attach(model, prefix)


def test_attached_model_after_revert_raises(model):
    bpp.attach(model, make_prefix(model.config))
    bpp.revert()
    with pytest.raises(bpp.PatchNotAppliedError):
        _logits(model)
    bpp.apply()
    bpp.detach(model)
    _logits(model)


def test_prefix_does_not_leak_into_next_call(model):
    plain = _logits(model)
    _logits(model, prefix=make_prefix(model.config))
    assert torch.equal(_logits(model), plain)


def test_model_built_before_import_is_covered():
    code = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        from reference import tiny_model, random_prefix, reference_logits
        model = tiny_model(seed=0, attn_implementation="sdpa")   # built before the patch
        import bart_prefix_patch as bpp
        ns = random_prefix(model.config)
        prefix = bpp.Prefix(encoder=ns.encoder, decoder=ns.decoder, cross=ns.cross)
        ids = torch.randint(3, 60, (2, 5)); dec = torch.randint(3, 60, (2, 4))
        got = model(ids, decoder_input_ids=dec, prefix=prefix).logits
        want = reference_logits(model, ids, dec, prefix=prefix)
        assert (got.double() - want).abs().max() < 1e-4, (got.double() - want).abs().max()
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_altered_model_function_refuses_that_model_alone(monkeypatch):
    """Each model is gated on its own: BART's drifted attention refuses BART, the relatives stay patched."""
    from transformers.models.marian import modeling_marian

    bpp.revert()

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        raise AssertionError("a changed upstream forward")

    monkeypatch.setattr(modeling_bart.BartAttention, "forward", forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bpp.apply(unknown="refuse") is True  # whatever BART_PREFIX_PATCH_UNKNOWN says
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("bart is not patched" in m and "BartAttention.forward" in m for m in messages), messages
    assert modeling_bart.BartAttention.__dict__["forward"] is forward  # left unpatched
    assert modeling_marian.MarianAttention.__dict__["forward"] is not bpp.get_original(modeling_marian.MarianAttention, "forward")
    assert bpp.gate().models["bart"] is not None and bpp.gate().models["marian"] is None
    model = tiny_model(seed=0)
    with pytest.raises(bpp.PatchNotAppliedError, match="does not patch bart"):
        model(torch.tensor([[5, 6]]), decoder_input_ids=torch.tensor([[2]]), prefix=make_prefix(model.config))
    with pytest.raises(bpp.PatchNotAppliedError, match="does not patch bart"):
        bpp.attach(model, make_prefix(model.config))
    bpp.revert()
    with pytest.raises(bpp.UnsupportedTransformersError, match="bart"):
        bpp.apply(strict=True, unknown="refuse")
    bpp.revert()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bpp.apply(unknown="verify") is True  # this forward raises: BART's self-check fails, BART stays refused
    assert any("self-check" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert modeling_bart.BartAttention.__dict__["forward"] is forward and bpp.gate().models["bart"] is not None
    bpp.revert()
    monkeypatch.undo()
    bpp.revert()
    assert bpp.apply(strict=True)
    assert bpp.gate().models["bart"] is None


def test_altered_shared_function_refuses_everything(monkeypatch):
    from transformers.generation.utils import GenerationMixin

    bpp.revert()

    def _expand_inputs_for_generation(*args, **kwargs):
        raise AssertionError("a changed upstream beam expansion")

    # Used by generate() with beams on every supported release.
    monkeypatch.setattr(GenerationMixin, "_expand_inputs_for_generation", staticmethod(_expand_inputs_for_generation))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bpp.apply(unknown="refuse") is False
    assert not bpp.is_applied()
    message = str(caught[-1].message)
    assert "GenerationMixin._expand_inputs_for_generation" in message and "supported" in message
    assert "BART_PREFIX_PATCH_UNKNOWN=verify" in message
    with pytest.raises(bpp.UnsupportedTransformersError):
        bpp.apply(strict=True, unknown="refuse")
    with pytest.raises(bpp.UnsupportedTransformersError, match="self-check"):
        bpp.apply(strict=True, unknown="verify")  # beam search raises: the self-check fails
    monkeypatch.undo()
    assert bpp.apply(strict=True)


def test_unknown_release_is_refused(monkeypatch):
    bpp.revert()
    monkeypatch.setattr(_compat, "load_table", lambda: {"keys": ["x:y"], "sets": {"s": {"family": "E2", "fingerprints": {"x:y": "0"}}}, "releases": {"5.24.0": "s"}})
    with pytest.warns(RuntimeWarning, match="not patched"):
        assert bpp.apply(unknown="refuse") is False
    monkeypatch.undo()


def test_gate_reports_family():
    result = bpp.gate()
    assert result is not None and result.ok
    assert result.family in _compat.FORK_MODULES
    assert _patcher.is_applied()


def test_torch_compile_with_and_without_prefix():
    """Without a prefix a compiled model is stock; a prefixed call runs eagerly and stays correct."""
    from reference import tiny_model

    fresh_dynamo()
    model = tiny_model(seed=0, attn_implementation="sdpa")
    prefix = make_prefix(model.config)
    eager_plain, eager_prefixed = _logits(model), _logits(model, prefix=prefix)
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(_logits(compiled), eager_plain)
    torch.testing.assert_close(_logits(compiled, prefix=prefix), eager_prefixed)
    bpp.attach(model, prefix)
    try:
        torch.testing.assert_close(_logits(compiled), eager_prefixed)
    finally:
        bpp.detach(model)
    assert torch.equal(_logits(compiled), eager_plain)
