"""Property-based tests: random tiny BARTs, prefixes, batches and padding, always equal to the reference.

Hypothesis draws the model shape (layers and heads per stack, d_model), a prefix length of 0..64
per site (0: the site has no prefix), the batch size, the prefix batch (1 or the input batch), a
padding pattern (none, right, left, a length-1 source, an all-padding row) and the attention
implementation. Forward logits, greedy tokens and beam scores are compared with the
plain-PyTorch reference in tests/reference.py, and must be finite.

The budget is fixed and derandomized (the same examples on every run, a few dozen in all), so CI
is reproducible and the file stays well under a minute on one thread.
"""

from __future__ import annotations

import pytest
import torch
from reference import random_prefix, reference_logits, reference_sequence_logprob, tiny_model

import bart_prefix_patch as bpp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SITES = ("encoder", "decoder", "cross")
PADDING = ("none", "right", "left", "length-1", "all-padding row")
TOL = 1e-4
NEW = 4


def _settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@st.composite
def cases(draw):
    d_model = draw(st.sampled_from([8, 16, 32]))
    heads = st.sampled_from([h for h in (1, 2, 4) if d_model % h == 0 and d_model // h >= 2])
    config = dict(
        d_model=d_model,
        encoder_layers=draw(st.integers(1, 2)),
        decoder_layers=draw(st.integers(1, 2)),
        encoder_attention_heads=draw(heads),
        decoder_attention_heads=draw(heads),
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
    )
    lengths = {site: draw(st.sampled_from([0, 1, 2, 5, 17, 64])) for site in SITES}
    batch = draw(st.integers(1, 3))
    return dict(
        config=config,
        lengths=lengths,
        batch=batch,
        prefix_batch=draw(st.sampled_from([1, batch])),
        padding=draw(st.sampled_from(PADDING)),
        source_length=draw(st.integers(2, 7)),
        attn=draw(st.sampled_from(["eager", "sdpa"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _case(padding, attn, lengths, batch=2, prefix_batch=1, source_length=5, seed=3, heads=(4, 2)):
    """A hand-written case: the corners always run, whatever Hypothesis draws."""
    config = dict(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=heads[0],
                  decoder_attention_heads=heads[1], encoder_ffn_dim=32, decoder_ffn_dim=32)
    return dict(config=config, lengths=dict(zip(SITES, lengths)), batch=batch, prefix_batch=prefix_batch,
                padding=padding, source_length=source_length, attn=attn, seed=seed)


CORNERS = [
    _case("all-padding row", "sdpa", (64, 64, 64), prefix_batch=2),
    _case("all-padding row", "eager", (0, 3, 0)),  # no encoder or cross prefix: the row sees only padding
    _case("left", "sdpa", (0, 0, 0)),  # an empty Prefix: stock results
    _case("length-1", "eager", (1, 64, 1), batch=3, prefix_batch=3),
    _case("right", "sdpa", (5, 0, 17), batch=1),
]


def _build(case):
    model = tiny_model(seed=case["seed"] % 7, attn_implementation=case["attn"], **case["config"])
    config = model.config
    sites = [site for site in SITES if case["lengths"][site] > 0]
    lengths = case["lengths"]
    ns = random_prefix(
        config, batch=case["prefix_batch"], enc_len=max(lengths["encoder"], 1), dec_len=max(lengths["decoder"], 1),
        cross_len=max(lengths["cross"], 1), sites=sites, scale=1.5, seed=case["seed"],
    )
    prefix = bpp.Prefix(encoder=ns.encoder, decoder=ns.decoder, cross=ns.cross)
    generator = torch.Generator().manual_seed(case["seed"])
    batch, length = case["batch"], case["source_length"]
    padding = case["padding"]
    if padding == "length-1":
        length = 1
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    last = batch - 1
    if padding == "right":
        mask[last, length // 2 + 1:] = 0
    elif padding == "left":
        mask[last, : length // 2] = 0
    elif padding == "all-padding row":
        mask[last] = 0
    ids[mask == 0] = config.pad_token_id
    return model, prefix, ids, mask


@_settings(examples=30)
@given(case=cases(), target_length=st.integers(1, 6))
@example(case=CORNERS[0], target_length=4)
@example(case=CORNERS[1], target_length=4)
@example(case=CORNERS[2], target_length=1)
@example(case=CORNERS[3], target_length=6)
@example(case=CORNERS[4], target_length=3)
def test_forward_equals_reference(case, target_length):
    model, prefix, ids, mask = _build(case)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    dec = torch.randint(3, model.config.vocab_size, (case["batch"], target_length), generator=generator)
    dec[:, 0] = model.config.decoder_start_token_id
    got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    assert torch.isfinite(got).all()
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=TOL)


def _assert_greedy_steps(model, ids, mask, prefix, sequences):
    """Each generated token is the reference's argmax (up to float32 ties) until its row ends."""
    logits = reference_logits(model, ids, sequences[:, :-1], attention_mask=mask, prefix=prefix)
    assert torch.isfinite(logits).all()
    eos = model.config.eos_token_id
    for row in range(sequences.shape[0]):
        for step in range(sequences.shape[1] - 1):
            token = int(sequences[row, step + 1])
            scores = logits[row, step]
            assert scores[token] >= scores.max() - TOL, (row, step, token, int(scores.argmax()))
            if token == eos:
                break


@_settings(examples=16)
@given(case=cases())
@example(case=CORNERS[0])
@example(case=CORNERS[1])
@example(case=CORNERS[3])
def test_greedy_generate_equals_reference(case):
    model, prefix, ids, mask = _build(case)
    sequences = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, num_beams=1,
                               do_sample=False)
    _assert_greedy_steps(model, ids, mask, prefix, sequences)


def _repeat(prefix, times):
    def site(pairs):
        if pairs is None:
            return None
        return [(k.repeat_interleave(times, 0), v.repeat_interleave(times, 0)) if k.shape[0] > 1 else (k, v)
                for k, v in pairs]

    return bpp.Prefix(encoder=site(prefix.encoder), decoder=site(prefix.decoder), cross=site(prefix.cross))


@_settings(examples=12)
@given(case=cases(), beams=st.integers(2, 3))
@example(case=CORNERS[0], beams=3)
@example(case=CORNERS[3], beams=2)
def test_beam_scores_equal_reference_logprob(case, beams):
    model, prefix, ids, mask = _build(case)
    out = model.generate(
        ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, num_beams=beams, num_return_sequences=2,
        length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    assert torch.isfinite(out.sequences_scores).all()
    want = reference_sequence_logprob(
        model, ids.repeat_interleave(2, 0), out.sequences, attention_mask=mask.repeat_interleave(2, 0),
        prefix=_repeat(prefix, 2),
    )
    torch.testing.assert_close(out.sequences_scores.double(), want, atol=TOL, rtol=TOL)
