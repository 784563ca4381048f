"""Teacher-forced outputs of the patched model against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_encoder, reference_logits, tiny_model

import bart_prefix_patch as bpp

ATOL = 1e-4

SITE_SETS = [
    ("encoder",),
    ("decoder",),
    ("cross",),
    ("decoder", "cross"),
    ("encoder", "decoder", "cross"),
]


@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_logits_match_reference(model, sites, prefix_batch):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config, batch=prefix_batch, sites=sites, enc_len=3, dec_len=4, cross_len=5)
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).logits
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    # The prefix must matter, or this comparison proves nothing.
    plain = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (got - plain).abs().max() > 1e-3


def test_decoder_padding_mask(model):
    config = model.config
    ids, mask = source_batch(config)
    decoder_ids = target_batch(config)
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[0, 2] = 0  # a hole in the middle: only that real token is hidden
    prefix = make_prefix(config)
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask, prefix=prefix)
    want = reference_logits(
        model, ids, decoder_ids, attention_mask=mask, decoder_attention_mask=decoder_mask, prefix=prefix
    )
    torch.testing.assert_close(got.logits.double(), want, atol=ATOL, rtol=0)


def test_different_layer_and_head_counts():
    model = tiny_model(
        seed=3, attn_implementation="sdpa", encoder_layers=3, decoder_layers=1, encoder_attention_heads=8,
        decoder_attention_heads=1,
    )
    config = model.config
    ids, mask = source_batch(config, pad_last=3)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config, enc_len=2, dec_len=7, cross_len=1)
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).logits
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


def test_eager_equals_sdpa():
    eager = tiny_model(seed=4, attn_implementation="eager")
    sdpa = tiny_model(seed=4, attn_implementation="sdpa")
    config = eager.config
    ids, mask = source_batch(config, pad_last=1)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config, batch=2)
    a = eager(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).logits
    b = sdpa(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_encoder_alone(model):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    prefix = make_prefix(config, sites=("encoder",))
    got = model.get_encoder()(input_ids=ids, attention_mask=mask, prefix=prefix).last_hidden_state
    want = reference_encoder(model, ids, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


def test_supplied_encoder_outputs_skip_encoder_prefix(model):
    """With encoder_outputs given the encoder does not run; decoder and cross prefixes still apply."""
    config = model.config
    ids, mask = source_batch(config)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config)
    encoder_out = model.get_encoder()(input_ids=ids, attention_mask=mask)  # no prefix: the caller's choice
    got = model(
        attention_mask=mask, decoder_input_ids=decoder_ids, encoder_outputs=encoder_out, prefix=prefix
    ).logits
    no_encoder_prefix = bpp.Prefix(decoder=prefix.decoder, cross=prefix.cross)
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=no_encoder_prefix)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


def test_incremental_decoding_matches_full_forward(model):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config, length=7)
    prefix = make_prefix(config)
    full = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix).logits
    first = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :3], prefix=prefix, use_cache=True)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    pieces = [first.logits]
    encoder_outputs = (first.encoder_last_hidden_state,)
    for step in range(3, 7):
        out = model(
            attention_mask=mask, decoder_input_ids=decoder_ids[:, step : step + 1], encoder_outputs=encoder_outputs,
            past_key_values=cache, prefix=prefix, use_cache=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def _self_attention_cache(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder self-attention keys/values of ``layer`` in any release's cache format."""
    if isinstance(cache, tuple):  # 4.44 - 4.51: legacy tuples (self k, self v, cross k, cross v)
        return cache[layer][0], cache[layer][1]
    cache = getattr(cache, "self_attention_cache", cache)
    if hasattr(cache, "layers"):  # 4.54+
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _decode_incrementally(model, ids, mask, decoder_ids, **kwargs):
    first = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :3], use_cache=True, **kwargs)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    for step in range(3, decoder_ids.shape[1]):
        out = model(
            attention_mask=mask, decoder_input_ids=decoder_ids[:, step : step + 1],
            encoder_outputs=(first.encoder_last_hidden_state,), past_key_values=cache, use_cache=True, **kwargs,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return cache


def test_cache_holds_real_tokens_only(model):
    """The decoder self-attention prefix never enters the cache (positions and generate() count on it).

    Layer 0's self-attention keys depend on the decoder embeddings alone, so a
    prefixed run must cache exactly what a run without prefix (the upstream
    code) caches there; the last layer's must differ, or the prefix did nothing.
    """
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config, length=6)
    prefix = make_prefix(config, dec_len=4)
    cached = _decode_incrementally(model, ids, mask, decoder_ids, prefix=prefix)
    stock = _decode_incrementally(model, ids, mask, decoder_ids)
    for got, want in zip(_self_attention_cache(cached, 0), _self_attention_cache(stock, 0)):
        assert got.shape == want.shape == (2, config.decoder_attention_heads, 6, config.d_model // config.decoder_attention_heads)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    last = config.decoder_layers - 1
    assert (_self_attention_cache(cached, last)[0] - _self_attention_cache(stock, last)[0]).abs().max() > 1e-3


def test_cross_prefix_keeps_encoder(model):
    """The seed's bug: a cross prefix replaced the encoder, so every input gave the same output."""
    config = model.config
    decoder_ids = target_batch(config, batch=1)
    prefix = make_prefix(config, sites=("cross",), cross_len=7)  # same length as the source: stock assigned it
    a, _ = source_batch(config, batch=1, seed=10)
    b, _ = source_batch(config, batch=1, seed=11)
    out_a = model(a, decoder_input_ids=decoder_ids, past_key_values=prefix).logits
    out_b = model(b, decoder_input_ids=decoder_ids, past_key_values=prefix).logits
    assert (out_a - out_b).abs().max() > 1e-2


def test_output_attentions_include_prefix_columns():
    model = tiny_model(seed=0, attn_implementation="eager")
    config = model.config
    ids, _ = source_batch(config)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config, enc_len=3, dec_len=4, cross_len=5)
    out = model(ids, decoder_input_ids=decoder_ids, prefix=prefix, output_attentions=True)
    assert out.encoder_attentions[0].shape[-1] == 3 + ids.shape[1]
    assert out.decoder_attentions[0].shape[-1] == 4 + decoder_ids.shape[1]
    assert out.cross_attentions[0].shape[-1] == 5 + ids.shape[1]
    # Causality over real tokens: decoder query 0 sees the prefix and itself only.
    assert out.decoder_attentions[0][0, :, 0, 4 + 1 :].abs().max() == 0


def test_dtype_cast_keeps_gradient(model):
    config = model.config
    ids, _ = source_batch(config)
    decoder_ids = target_batch(config)
    raw = make_prefix(config, dtype=torch.float64)
    leaves = [t.requires_grad_() for pairs in (raw.encoder, raw.decoder, raw.cross) for pair in pairs for t in pair]
    loss = model(ids, decoder_input_ids=decoder_ids, prefix=raw).logits.sum()
    loss.backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
