"""Manual decoding with a returned cache, and the empty-site rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_logits

import bart_prefix_patch as bpp


def _first_step(model, prefix):
    ids, mask = source_batch(model.config, pad_last=2)
    dec = target_batch(model.config)
    first = model(ids, attention_mask=mask, decoder_input_ids=dec[:, :3], prefix=prefix, use_cache=True)
    return ids, mask, dec, first


def test_reused_cache_with_the_prefix_matches_the_reference(model):
    prefix = make_prefix(model.config, scale=2.0)
    ids, mask, dec, first = _first_step(model, prefix)
    step = model(
        encoder_outputs=(first.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=dec[:, 3:4],
        past_key_values=first.past_key_values, prefix=prefix, use_cache=True,
    )
    want = reference_logits(model, ids, dec[:, :4], attention_mask=mask, prefix=prefix)[:, 3]
    torch.testing.assert_close(step.logits[:, 0].double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("encoder_from", ["encoder_outputs", "input_ids"])
def test_reused_cache_without_the_prefix_is_refused(model, encoder_from):
    prefix = make_prefix(model.config, scale=2.0)
    ids, mask, dec, first = _first_step(model, prefix)
    source = {"encoder_outputs": (first.encoder_last_hidden_state,)} if encoder_from == "encoder_outputs" else {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(bpp.PrefixError, match="holds a cross-attention prefix .* pass the same prefix= again"):
            model(**source, attention_mask=mask, decoder_input_ids=dec[:, 3:4], past_key_values=first.past_key_values)


def test_reused_cache_of_a_plain_call_still_runs(model):
    ids, mask, dec, first = _first_step(model, None)
    step = model(
        encoder_outputs=(first.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=dec[:, 3:4],
        past_key_values=first.past_key_values, use_cache=True,
    )
    want = reference_logits(model, ids, dec[:, :4], attention_mask=mask)[:, 3]
    torch.testing.assert_close(step.logits[:, 0].double(), want, atol=1e-4, rtol=1e-4)


def test_empty_sites_are_no_prefix(model):
    """None, an empty sequence and a prefix of length 0 all mean "no prefix there"."""
    ids, mask = source_batch(model.config, pad_last=2)
    dec = target_batch(model.config)
    full = make_prefix(model.config, scale=2.0)
    zero = make_prefix(model.config, enc_len=0, dec_len=0, cross_len=0)
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=bpp.Prefix(decoder=full.decoder))
    for prefix in (
        bpp.Prefix(encoder=[], decoder=full.decoder, cross=()),
        bpp.Prefix(encoder=zero.encoder, decoder=full.decoder, cross=zero.cross),
    ):
        got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits.double()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=bpp.Prefix()).logits, plain)
    assert torch.equal(model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=zero).logits, plain)
