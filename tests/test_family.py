"""Every guarantee of the core, for every supported model x attention implementation, against the reference.

Parametrised from one table of tiny configs (tests/models.py); the reference
(tests/reference.py) knows each relative's layer order, embedding scaling,
positions and norms, and never calls the model's modules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from models import MODELS, available, decoder_vocab_size, implementations, tiny_family_model
from reference import reference_encoder, reference_greedy, reference_logits, reference_sequence_logprob

import bart_prefix_patch as bpp
from bart_prefix_patch import _architectures

NEW = 5
ATOL = 1e-4

CASES = [
    pytest.param((model_type, implementation), id=f"{model_type}-{implementation}")
    for model_type in MODELS
    if available(model_type)
    for implementation in implementations(model_type)
]


def test_every_table_row_has_a_tiny_config():
    """The test table and the package's architecture table name the same models."""
    assert set(MODELS) == set(_architectures.ARCHITECTURES)


@pytest.fixture(params=CASES)
def family_model(request):
    model_type, implementation = request.param
    return tiny_family_model(model_type, seed=0, attn_implementation=implementation)


def _decoder_ids(model, batch=2, length=6):
    ids = target_batch(model.config, batch=batch, length=length)
    return ids.clamp(max=decoder_vocab_size(model.config) - 1)  # Marian's decoder has its own vocabulary


def test_forward_matches_reference(family_model):
    model = family_model
    ids, mask = source_batch(model.config, pad_last=2)
    dec = _decoder_ids(model)
    prefix = make_prefix(model.config, scale=2.0)
    got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits.double()
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    plain = reference_logits(model, ids, dec, attention_mask=mask)
    assert (want - plain).abs().max() > 0.1, "the prefix must change the output"
    # The bug this package fixes: with a cross prefix, the output still depends on the input.
    other, _ = source_batch(model.config, seed=7)
    moved = model(other, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    assert (moved.double() - got).abs().max() > 1e-3


def test_encoder_alone_matches_reference(family_model):
    model = family_model
    ids, mask = source_batch(model.config, pad_last=2)
    prefix = make_prefix(model.config, scale=2.0)
    got = model.get_encoder()(input_ids=ids, attention_mask=mask, prefix=prefix).last_hidden_state.double()
    torch.testing.assert_close(got, reference_encoder(model, ids, attention_mask=mask, prefix=prefix), atol=ATOL, rtol=ATOL)


def test_no_prefix_is_bitwise_stock(family_model):
    model = family_model
    ids, mask = source_batch(model.config, pad_last=2)
    dec = _decoder_ids(model)
    patched = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    bpp.revert()
    try:
        stock = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    finally:
        bpp.apply(strict=True)
    assert torch.equal(patched, stock)


@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_greedy_matches_reference(family_model, prefix_batch, decoding_path):
    model = family_model
    ids, mask = source_batch(model.config, pad_last=2)
    prefix = make_prefix(model.config, batch=prefix_batch, scale=2.0)
    got = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, do_sample=False, num_beams=1)
    want = reference_greedy(model, ids, NEW, attention_mask=mask, prefix=prefix)
    assert got.tolist() == want.tolist()


def test_beam_scores_equal_teacher_forced_logprob_and_cache_equals_no_cache(family_model, decoding_path):
    model = family_model
    if decoder_vocab_size(model.config) != model.config.vocab_size:
        # Stock beam search reshapes scores by config.vocab_size, not the LM head's width, on 4.x - 5.3
        # at least (Marian's decoder_vocab_size): test beams with one vocabulary.
        model = tiny_family_model(model.config.model_type, attn_implementation=model.config._attn_implementation,
                                  decoder_vocab_size=model.config.vocab_size)
    ids, mask = source_batch(model.config, pad_last=1)
    prefix = make_prefix(model.config, batch=2, scale=2.0)
    kwargs = dict(attention_mask=mask, prefix=prefix, max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
                  length_penalty=0.0, early_stopping=True, do_sample=False)
    out = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kwargs)
    expanded = bpp.Prefix(
        **{site: [(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)) for k, v in getattr(prefix, site)]
           for site in ("encoder", "decoder", "cross")}
    )
    want = reference_sequence_logprob(
        model, ids.repeat_interleave(2, 0), out.sequences, attention_mask=mask.repeat_interleave(2, 0), prefix=expanded
    )
    torch.testing.assert_close(out.sequences_scores.double(), want, atol=ATOL, rtol=0)
    assert model.generate(ids, use_cache=False, **kwargs).tolist() == out.sequences.tolist()


def test_prefix_encoder_trains_saves_and_loads(family_model, tmp_path):
    model = family_model
    ids, mask = source_batch(model.config, pad_last=2)
    dec = _decoder_ids(model)
    encoder = bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=16)
    loss = model(ids, attention_mask=mask, decoder_input_ids=dec, labels=dec).loss
    loss.backward()
    assert all(p.grad is not None for p in encoder.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("bpp_prefix."))
    with torch.no_grad():
        want = reference_logits(model, ids, dec, attention_mask=mask, prefix=encoder())
    bpp.save_prefix(encoder, tmp_path)
    bpp.detach(model)
    loaded = bpp.load_prefix(tmp_path, model=model)
    bpp.attach(model, loaded)
    got = model(ids, attention_mask=mask, decoder_input_ids=dec).logits.double()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


CAUSAL = [
    pytest.param(t, id=t) for t, family in MODELS.items() if family.causal_lm is not None and available(t)
]


@pytest.mark.parametrize("model_type", CAUSAL)
def test_causal_lm_takes_a_decoder_prefix_and_refuses_the_others(model_type):
    import transformers

    from models import family_config

    causal = getattr(transformers, MODELS[model_type].causal_lm)
    # Equal depths: stock caches of a causal LM size themselves by num_hidden_layers (= encoder_layers).
    # Marian's ForCausalLM predicts over vocab_size but embeds decoder_vocab_size tokens: keep them equal.
    extra = {"decoder_vocab_size": 64} if model_type == "marian" else {}
    config = family_config(model_type, encoder_layers=3, **extra)
    config.is_decoder, config.is_encoder_decoder = True, False
    torch.manual_seed(0)
    model = causal._from_config(config, attn_implementation="eager").eval()
    prefix = make_prefix(model.config, scale=2.0)
    ids = _decoder_ids(model)
    decoder_only = bpp.Prefix(decoder=prefix.decoder)
    plain = model(ids).logits
    with_prefix = model(ids, prefix=decoder_only).logits
    assert (with_prefix - plain).abs().max() > 0.1
    # Incremental decoding == full forward; greedy generate (cached) == teacher-forced argmax and == no cache.
    first = model(ids[:, :3], prefix=decoder_only, use_cache=True)
    step = model(ids[:, 3:4], past_key_values=first.past_key_values, prefix=decoder_only).logits
    torch.testing.assert_close(step[:, 0], with_prefix[:, 3], atol=ATOL, rtol=ATOL)
    model.generation_config.pad_token_id = model.config.pad_token_id
    # An explicit mask: Marian and Pegasus start with the pad token, which generate() would mask out.
    prompt = dict(attention_mask=torch.ones_like(ids[:, :2]), max_new_tokens=NEW, do_sample=False)
    out = model.generate(ids[:, :2], prefix=decoder_only, **prompt)
    assert model.generate(ids[:, :2], prefix=decoder_only, use_cache=False, **prompt).tolist() == out.tolist()
    teacher = model(out[:, :-1], prefix=decoder_only).logits.argmax(-1)[:, 1:]
    finished = torch.cumsum(out[:, 2:-1] == model.config.eos_token_id, dim=1) > 0
    finished = torch.cat([torch.zeros_like(finished[:, :1]), finished], dim=1)
    assert ((teacher == out[:, 2:]) | finished).all()
    for site in ("encoder", "cross"):
        with pytest.raises(bpp.PrefixError, match="decoder-only"):
            model(ids, prefix=bpp.Prefix(**{"decoder": prefix.decoder, site: getattr(prefix, site)}))


def test_marian_from_tokens_uses_the_decoder_vocabulary():
    model = tiny_family_model("marian")
    decoder_vocabulary = model.get_decoder().embed_tokens.num_embeddings
    if decoder_vocabulary == model.config.vocab_size:
        pytest.skip("this release builds Marian's decoder embedding with the encoder's vocabulary size")
    ids = torch.tensor([[decoder_vocabulary + 3, 5, 6]])
    with pytest.raises(bpp.PrefixError, match="decoder_input_ids"):
        bpp.PrefixEncoder.from_tokens(model, ids)
    encoder = bpp.PrefixEncoder.from_tokens(model, ids, decoder_input_ids=torch.tensor([[7, 8]]))
    assert encoder.prefix_lengths == {"encoder": 3, "decoder": 2, "cross": 3}
    prefix = encoder()
    src, mask = source_batch(model.config)
    dec = _decoder_ids(model)
    got = model(src, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits.double()
    torch.testing.assert_close(got, reference_logits(model, src, dec, attention_mask=mask, prefix=prefix), atol=ATOL, rtol=ATOL)


def test_stacked_prefixes_match_each_example_alone(family_model):
    """Prefix.stack on every model: rows of different prefix lengths, a missing site and no prefix."""
    model = family_model
    config = model.config
    entries = [
        make_prefix(config, enc_len=3, dec_len=4, cross_len=5, scale=2.0, seed=0),
        make_prefix(config, enc_len=6, dec_len=2, cross_len=1, scale=2.0, seed=1),
        make_prefix(config, dec_len=7, cross_len=3, sites=("decoder", "cross"), scale=2.0, seed=2),
        None,
    ]
    ids, mask = source_batch(config, batch=4, pad_last=2)
    dec = _decoder_ids(model, batch=4)
    stacked = bpp.Prefix.stack(entries)
    got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=stacked).logits.double()
    tokens = model.generate(ids, attention_mask=mask, prefix=stacked, max_new_tokens=NEW, do_sample=False, num_beams=1)
    for row, entry in enumerate(entries):
        one = slice(row, row + 1)
        want = reference_logits(model, ids[one], dec[one], attention_mask=mask[one], prefix=entry)
        torch.testing.assert_close(got[one], want, atol=ATOL, rtol=ATOL)
        alone = reference_greedy(model, ids[one], NEW, attention_mask=mask[one], prefix=entry)
        assert tokens[one, : alone.shape[1]].tolist() == alone.tolist()


@pytest.mark.parametrize("model_type", ["marian", "m2m_100", "mbart"])
def test_save_pretrained_and_load_prefix_tuned(model_type, tmp_path):
    """save_pretrained writes the base weights and the prefix beside them; load_prefix_tuned builds the
    checkpoint's own head (AutoModelForSeq2SeqLM) with the prefix attached."""
    from bart_prefix_patch.trainer import load_prefix_tuned

    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers release")
    model = tiny_family_model(model_type)
    encoder = bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=16)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.5)
    ids, mask = source_batch(model.config)
    dec = _decoder_ids(model)
    want = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    model.save_pretrained(tmp_path)
    loaded = load_prefix_tuned(tmp_path)
    assert type(loaded) is type(model) and bpp.attached(loaded) is not None
    torch.testing.assert_close(loaded(ids, attention_mask=mask, decoder_input_ids=dec).logits, want, atol=1e-5, rtol=0)
