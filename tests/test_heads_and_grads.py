"""Other BART heads, gradients into attached modules, gradient checkpointing, isolation."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_logits, tiny_model
from test_generate import CountingPrefix
from transformers import BartForQuestionAnswering, BartForSequenceClassification, BartModel

import bart_prefix_patch as bpp


def _same_weights(cls, model):
    other = cls(model.config).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    core = other if isinstance(other, BartModel) else other.model
    core.load_state_dict(model.model.state_dict())
    return other


@pytest.mark.parametrize("cls", [BartModel, BartForSequenceClassification, BartForQuestionAnswering])
def test_other_heads_use_the_prefix(model, cls):
    config = model.config
    head = _same_weights(cls, model)
    ids, mask = source_batch(config, pad_last=1)
    ids[:, -2] = config.eos_token_id  # sequence classification pools the last eos
    ids[-1, -2] = config.eos_token_id
    decoder_ids = target_batch(config)
    prefix = make_prefix(config)
    if cls is BartModel:
        got = head(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).last_hidden_state
        want_logits = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=prefix)
        # Tie hidden states to logits through the LM head, which the reference applied.
        got_logits = model.lm_head(got) + model.final_logits_bias
        torch.testing.assert_close(got_logits.double(), want_logits, atol=1e-4, rtol=0)
    else:
        # These heads build decoder inputs from input_ids themselves.
        with_prefix = head(ids, attention_mask=mask, prefix=prefix)
        without = head(ids, attention_mask=mask)
        first = with_prefix[0]
        assert (first - without[0]).abs().max() > 1e-4
        bpp.attach(head, prefix)
        try:
            torch.testing.assert_close(head(ids, attention_mask=mask)[0], first)
        finally:
            bpp.detach(head)


def test_gradients_reach_attached_module(model):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config)
    module = CountingPrefix(make_prefix(config))
    bpp.attach(model, module)
    try:
        assert any(p is module.params["decoder_0_k"] for p in model.parameters())
        model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.square().mean().backward()
        grads = {name: p.grad for name, p in module.params.items()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    finally:
        bpp.detach(model)
    assert not any(p is module.params["decoder_0_k"] for p in model.parameters())


def _loss_and_grads(model, module, ids, mask, labels, checkpointing, per_call):
    model.zero_grad(set_to_none=True)
    module.zero_grad(set_to_none=True)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    kwargs = {"prefix": module()} if per_call else {}
    loss = model(ids, attention_mask=mask, labels=labels, **kwargs).loss
    loss.backward()
    model.eval()
    grads = {name: p.grad.clone() for name, p in module.params.items()}
    grads["scale"] = module.scale.grad.clone()
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("per_call", [False, True], ids=["attached", "per-call"])
def test_gradient_checkpointing_matches(model, per_call, reentrant):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    labels = target_batch(config)
    module = CountingPrefix(make_prefix(config))
    if not per_call:
        bpp.attach(model, module)
    try:
        plain = _loss_and_grads(model, module, ids, mask, labels, None, per_call)
        checkpointed = _loss_and_grads(model, module, ids, mask, labels, reentrant, per_call)
    finally:
        bpp.detach(model)
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(plain[0], checkpointed[0])
    for name in plain[1]:
        torch.testing.assert_close(plain[1][name], checkpointed[1][name], atol=1e-6, rtol=1e-5)


def test_prefix_does_not_leak_across_models_or_threads():
    a = tiny_model(seed=0, attn_implementation="sdpa")
    b = tiny_model(seed=0, attn_implementation="sdpa")
    config = a.config
    ids, mask = source_batch(config)
    decoder_ids = target_batch(config)
    plain = b(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    bpp.attach(a, make_prefix(config))
    try:
        seen = {}

        def other_thread():
            seen["b"] = b(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits

        thread = threading.Thread(target=other_thread)
        thread.start()
        with_prefix = a(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        thread.join()
        assert torch.equal(seen["b"], plain)
        assert torch.equal(b(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits, plain)
        assert not torch.equal(with_prefix, plain)
    finally:
        bpp.detach(a)
