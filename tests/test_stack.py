"""Prefix.stack: per-example prefixes of different lengths in one batch, against each example run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_greedy, reference_logits, reference_sequence_logprob, tiny_model

import bart_prefix_patch as bpp

ATOL = 1e-4
NEW = 6
SITES = ("encoder", "decoder", "cross")


def _entries(config, seed=0):
    """Four examples: full prefix, other lengths, a missing site, no prefix."""
    return [
        make_prefix(config, enc_len=3, dec_len=4, cross_len=5, scale=2.0, seed=seed),
        make_prefix(config, enc_len=6, dec_len=2, cross_len=1, scale=2.0, seed=seed + 1),
        make_prefix(config, enc_len=2, dec_len=7, cross_len=3, sites=("decoder", "cross"), scale=2.0, seed=seed + 2),
        None,
    ]


def _batch(config, n=4, pad=3):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, config.vocab_size, (n, 7), generator=generator)
    mask = torch.ones(n, 7, dtype=torch.long)
    for row in range(1, n, 2):  # every other row padded
        ids[row, -pad:] = config.pad_token_id
        mask[row, -pad:] = 0
    return ids, mask


def _alone(entry):
    return entry if entry is not None else bpp.Prefix()


def test_stack_shapes_and_lengths():
    config = tiny_model().config
    entries = _entries(config)
    stacked = bpp.Prefix.stack(entries)
    assert stacked.encoder[0][0].shape == (4, 4, 6, 8)
    assert stacked.decoder[0][0].shape == (4, 2, 7, 16)
    assert stacked.lengths["encoder"].tolist() == [3, 6, 0, 0]
    assert stacked.lengths["decoder"].tolist() == [4, 2, 7, 0]
    assert stacked.lengths["cross"].tolist() == [5, 1, 3, 0]
    torch.testing.assert_close(stacked.decoder[1][0][1, :, :2], entries[1].decoder[1][0][0])
    assert stacked.decoder[1][0][1, :, 2:].abs().sum() == 0


def test_equal_lengths_need_no_mask():
    config = tiny_model().config
    entries = [make_prefix(config, seed=s) for s in range(3)]
    stacked = bpp.Prefix.stack(entries)
    assert stacked.lengths is None
    assert stacked.decoder[0][0].shape[0] == 3
    assert bpp.Prefix.stack([None, None]).sites() == ()


@pytest.mark.parametrize("pad", [0, 3])
def test_forward_rows_match_solo_reference(model, pad):
    config = model.config
    entries = _entries(config)
    ids, mask = _batch(config, pad=pad) if pad else (_batch(config)[0].clamp(min=3), None)
    dec = target_batch(config, batch=4)
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=bpp.Prefix.stack(entries)).logits
    for row, entry in enumerate(entries):
        want = reference_logits(
            model, ids[row : row + 1], dec[row : row + 1], None if mask is None else mask[row : row + 1], prefix=entry
        )
        torch.testing.assert_close(got[row : row + 1].double(), want, atol=ATOL, rtol=0)
        solo = model(
            input_ids=ids[row : row + 1],
            attention_mask=None if mask is None else mask[row : row + 1],
            decoder_input_ids=dec[row : row + 1],
            prefix=_alone(entry),
        ).logits
        torch.testing.assert_close(got[row : row + 1], solo, atol=ATOL, rtol=0)


def test_gradients_reach_every_stacked_tensor(model):
    config = model.config
    entries = _entries(config)
    for entry in entries:
        if entry is not None:
            for site in entry.sites():
                for key, value in getattr(entry, site):
                    key.requires_grad_(True)
                    value.requires_grad_(True)
    ids, mask = _batch(config)
    dec = target_batch(config, batch=4)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=dec, prefix=bpp.Prefix.stack(entries))
    out.loss.backward()
    for index, entry in enumerate(entries):
        if entry is None:
            continue
        for site in entry.sites():
            for layer, (key, value) in enumerate(getattr(entry, site)):
                assert key.grad is not None and key.grad.abs().sum() > 0, (index, site, layer)
                assert value.grad is not None and value.grad.abs().sum() > 0, (index, site, layer)


def test_gradient_checkpointing_matches():
    model = tiny_model(attn_implementation="eager").train()
    config = model.config
    entries = _entries(config)
    ids, mask = _batch(config)
    dec = target_batch(config, batch=4)

    def grads(checkpointing):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_disable()
        leaves = [
            [[(k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()) for k, v in getattr(e, s)]
             if getattr(e, s) is not None else None for s in SITES]
            if e is not None else None
            for e in entries
        ]
        prefixes = [bpp.Prefix(*sites) if sites is not None else None for sites in leaves]
        model.zero_grad()
        loss = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=dec, prefix=bpp.Prefix.stack(prefixes)
        ).loss
        loss.backward()
        return loss.detach(), [k.grad for p in prefixes if p is not None for s in p.sites() for k, _ in getattr(p, s)]

    loss_a, grads_a = grads(False)
    loss_b, grads_b = grads(True)
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_greedy_rows_match_solo(model, decoding_path):
    config = model.config
    entries = _entries(config)
    ids, mask = _batch(config)
    got = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=1, prefix=bpp.Prefix.stack(entries)
    )
    for row, entry in enumerate(entries):
        want = reference_greedy(model, ids[row : row + 1], NEW, attention_mask=mask[row : row + 1], prefix=entry)
        solo = got[row, : want.shape[1]]
        assert solo.tolist() == want[0].tolist(), row
        assert (got[row, want.shape[1] :] == config.pad_token_id).all()


@pytest.mark.parametrize("beams,returned", [(3, 2), (1, 3)])
def test_beam_and_returned_sequences_follow_their_example(model, beams, returned, decoding_path):
    config = model.config
    entries = _entries(config)
    ids, mask = _batch(config)
    kwargs = dict(max_new_tokens=NEW, num_beams=beams, num_return_sequences=returned, do_sample=False)
    if beams == 1:
        kwargs.update(do_sample=True, top_k=0)
    torch.manual_seed(0)
    got = model.generate(
        ids, attention_mask=mask, prefix=bpp.Prefix.stack(entries), output_scores=True,
        return_dict_in_generate=True, **kwargs
    )
    for row, entry in enumerate(entries):
        rows = slice(row * returned, (row + 1) * returned)
        sequences = got.sequences[rows]
        want = reference_sequence_logprob(
            model, ids[row : row + 1].expand(returned, -1), sequences, mask[row : row + 1].expand(returned, -1),
            prefix=entry,
        )
        if beams > 1:
            solo = model.generate(ids[row : row + 1], attention_mask=mask[row : row + 1], prefix=_alone(entry), **kwargs)
            assert sequences[:, : solo.shape[1]].tolist() == solo.tolist(), row
            lengths = (sequences[:, 1:] != config.pad_token_id).sum(dim=1).double()
            penalty = getattr(model.generation_config, "length_penalty", 1.0) or 1.0
            torch.testing.assert_close(got.sequences_scores[rows].double(), want / lengths**penalty, atol=1e-3, rtol=0)
        else:
            # Sampling: each returned sequence's log-prob under its own prefix equals the scores generate used.
            steps = torch.stack(got.scores, dim=1)[rows].double().log_softmax(-1)
            targets = sequences[:, 1:]
            token = steps.gather(-1, targets[..., None]).squeeze(-1)
            alive = torch.ones_like(token, dtype=torch.bool)
            finished = torch.cumsum((targets == config.eos_token_id).long(), dim=1) - (targets == config.eos_token_id).long()
            alive &= finished == 0
            torch.testing.assert_close(token.masked_fill(~alive, 0).sum(1), want, atol=1e-3, rtol=0)


def test_sampling_rows_match_solo_with_same_seed(model):
    """With one example per batch the RNG is consumed identically: a batch of one stacked entry equals its solo run."""
    config = model.config
    entry = _entries(config)[1]
    ids, mask = _batch(config)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(3)
    got = model.generate(ids[1:2], attention_mask=mask[1:2], prefix=bpp.Prefix.stack([entry]), **kwargs)
    torch.manual_seed(3)
    want = model.generate(ids[1:2], attention_mask=mask[1:2], prefix=entry, **kwargs)
    assert got.tolist() == want.tolist()


def test_eager_equals_sdpa_for_stacked():
    eager, sdpa = tiny_model(attn_implementation="eager"), tiny_model(attn_implementation="sdpa")
    entries = _entries(eager.config)
    ids, mask = _batch(eager.config)
    dec = target_batch(eager.config, batch=4)
    a = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=bpp.Prefix.stack(entries)).logits
    b = sdpa(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=bpp.Prefix.stack(entries)).logits
    # float32 kernels differ by CPU (1.2e-5 at |logit| 0.4 on an AVX-512 EPYC); a wrong mask is off by far more.
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_attached_stacked_prefix_and_output_attentions(model):
    config = model.config
    entries = _entries(config)
    ids, mask = _batch(config)
    dec = target_batch(config, batch=4)
    stacked = bpp.Prefix.stack(entries)
    want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=stacked).logits
    bpp.attach(model, stacked)
    try:
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    finally:
        bpp.detach(model)
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
    if not got.decoder_attentions or got.decoder_attentions[0] is None:  # sdpa (4.53+) returns no weights
        return
    # Row 1 has a 2-column decoder prefix in a 7-column stack: the padding columns get no weight.
    assert got.decoder_attentions[0][1, :, :, 2:7].abs().max() == 0
    assert got.cross_attentions[0][3, :, :, :5].abs().max() == 0  # the "no prefix" row


# ------------------------------------------------------------------ errors


def test_errors_name_the_entry():
    config = tiny_model().config
    good = make_prefix(config)
    with pytest.raises(bpp.PrefixError, match=r"entry 1 Prefix.encoder\[0\] key: expected batch 1 .* got batch 2"):
        bpp.Prefix.stack([good, make_prefix(config, batch=2)])
    fewer = bpp.Prefix(encoder=good.encoder, decoder=good.decoder[:2], cross=good.cross)
    with pytest.raises(bpp.PrefixError, match=r"entry 2 Prefix.decoder: expected 3 layers \(as entry 0\), got 2"):
        bpp.Prefix.stack([good, None, fewer])
    other = tiny_model(decoder_attention_heads=4).config
    with pytest.raises(bpp.PrefixError, match=r"entry 1 Prefix.decoder\[0\] key: expected 2 heads .* got 4"):
        bpp.Prefix.stack([good, make_prefix(other, sites=("decoder",))])
    with pytest.raises(bpp.PrefixError, match=r"entry 0: expected a Prefix of batch 1 or None, got dict"):
        bpp.Prefix.stack([{}])
    with pytest.raises(bpp.PrefixError, match="empty sequence"):
        bpp.Prefix.stack([])


def test_bad_lengths_are_refused(model):
    config = model.config
    ids, _ = source_batch(config)
    dec = target_batch(config)
    prefix = make_prefix(config, batch=2)
    bad = bpp.Prefix(prefix.encoder, prefix.decoder, prefix.cross, lengths={"decoder": [4, 5]})
    with pytest.raises(bpp.PrefixError, match=r"lengths\['decoder'\]: expected lengths in 0..4"):
        model(input_ids=ids, decoder_input_ids=dec, prefix=bad)
    bad = bpp.Prefix(prefix.encoder, prefix.decoder, prefix.cross, lengths={"decoder": [4]})
    with pytest.raises(bpp.PrefixError, match=r"expected 2 integer lengths"):
        model(input_ids=ids, decoder_input_ids=dec, prefix=bad)
    bad = bpp.Prefix(decoder=prefix.decoder, lengths={"cross": [1, 2]})
    with pytest.raises(bpp.PrefixError, match=r"lengths\['cross'\]: expected a site that carries a prefix"):
        model(input_ids=ids, decoder_input_ids=dec, prefix=bad)
