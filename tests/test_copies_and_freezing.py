"""Copies, pickles and torch.save of prefixed models; freezing across add_prefix_tuning/attach/detach."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_logits, tiny_model

import bart_prefix_patch as bpp


def _check_against_reference(model, prefix):
    ids, mask = source_batch(model.config, pad_last=2)
    dec = target_batch(model.config)
    got = model(ids, attention_mask=mask, decoder_input_ids=dec).logits.double()
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return got


def _roundtrips():
    def deepcopy(model):
        return copy.deepcopy(model)

    def pickled(model):
        return pickle.loads(pickle.dumps(model))

    def torch_saved(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return [deepcopy, pickled, torch_saved]


@pytest.mark.parametrize("roundtrip", _roundtrips(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["prefix", "encoder"])
def test_copy_runs_its_own_prefix(roundtrip, kind):
    model = tiny_model(seed=0, attn_implementation="sdpa")
    if kind == "prefix":
        prefix = make_prefix(model.config, scale=2.0)
        bpp.attach(model, prefix)
    else:
        encoder = bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=16)
        with torch.no_grad():
            for parameter in encoder.parameters():
                parameter.normal_(0.0, 0.5)
        prefix = encoder()
    original = _check_against_reference(model, prefix)

    clone = roundtrip(model)
    source = bpp.attached(clone)
    assert source is not None and source is not bpp.attached(model)
    clone_prefix = source() if isinstance(source, torch.nn.Module) else source
    torch.testing.assert_close(_check_against_reference(clone, clone_prefix), original)

    # Independent: changing the clone's prefix or detaching it leaves the original alone.
    if kind == "encoder":
        with torch.no_grad():
            for parameter in bpp.attached(clone).parameters():
                parameter.add_(1.0)
        assert not torch.allclose(_check_against_reference(clone, bpp.attached(clone)()), original)
        assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("bpp_prefix."))
        bpp.detach(clone)
        assert all(p.requires_grad for p in clone.parameters())
        assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("bpp_prefix."))
    else:
        bpp.detach(clone)
    torch.testing.assert_close(_check_against_reference(model, prefix), original)
    assert bpp.attached(clone) is None and bpp.attached(model) is not None


def _frozen_fraction(model):
    counts = bpp.trainable_parameters(model)
    return counts["trainable"], counts["total"]


def test_second_add_prefix_tuning_keeps_the_base_frozen():
    model = tiny_model(seed=0)
    model.model.shared.weight.requires_grad_(False)  # the user had frozen something before
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    first = bpp.add_prefix_tuning(model, prefix_length=2, hidden_size=8)
    second = bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"bpp_prefix.{name}" for name, _ in second.named_parameters()}
    assert not any(p.requires_grad for p in first.parameters()) or first is not bpp.attached(model)
    bpp.detach(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_attach_after_add_prefix_tuning_keeps_the_base_frozen():
    model = tiny_model(seed=0)
    bpp.add_prefix_tuning(model, prefix_length=2, hidden_size=8)
    prefix = make_prefix(model.config)
    bpp.attach(model, prefix)
    assert _frozen_fraction(model)[0] == 0, "every base parameter stays frozen"
    bpp.detach(model)
    assert all(p.requires_grad for p in model.parameters()), "detach restores the state before the first prefix"


def test_attach_alone_never_changes_requires_grad():
    model = tiny_model(seed=0)
    model.lm_head.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    bpp.attach(model, make_prefix(model.config))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    bpp.detach(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_failed_add_prefix_tuning_leaves_the_model_as_it_was():
    model = tiny_model(seed=0)
    with pytest.raises(bpp.PrefixError):
        bpp.add_prefix_tuning(model, sites=("nowhere",))
    assert all(p.requires_grad for p in model.parameters()) and bpp.attached(model) is None
