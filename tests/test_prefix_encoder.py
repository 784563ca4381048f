"""PrefixEncoder, add_prefix_tuning, trainable_parameters, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import source_batch, target_batch
from reference import reference_encoder, reference_logits, tiny_model

import bart_prefix_patch as bpp


@pytest.mark.parametrize("hidden_size", [16, None], ids=["mlp", "flat"])
def test_shapes_and_per_site_lengths(hidden_size):
    config = tiny_model().config
    encoder = bpp.PrefixEncoder(config, prefix_length={"encoder": 2, "decoder": 3, "cross": 4}, hidden_size=hidden_size)
    prefix = encoder()
    assert len(prefix.encoder) == config.encoder_layers and len(prefix.cross) == config.decoder_layers
    assert prefix.encoder[0][0].shape == (1, config.encoder_attention_heads, 2, config.d_model // config.encoder_attention_heads)
    assert prefix.decoder[0][1].shape == (1, config.decoder_attention_heads, 3, config.d_model // config.decoder_attention_heads)
    assert prefix.cross[-1][0].shape[2] == 4
    only = bpp.PrefixEncoder(config, prefix_length=5, sites=("decoder",), hidden_size=hidden_size)()
    assert only.encoder is None and only.cross is None and only.decoder[0][0].shape[2] == 5


def test_bad_arguments():
    config = tiny_model().config
    with pytest.raises(bpp.PrefixError, match="sites"):
        bpp.PrefixEncoder(config, sites=("encoder", "bogus"))
    with pytest.raises(bpp.PrefixError, match="prefix_length"):
        bpp.PrefixEncoder(config, prefix_length={"encoder": 2}, sites=("encoder", "cross"))


def test_to_flat_gives_identical_outputs(model):
    config = model.config
    ids, mask = source_batch(config, pad_last=1)
    decoder_ids = target_batch(config)
    encoder = bpp.PrefixEncoder(config, prefix_length=3, hidden_size=24)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.5)  # large enough that the prefix matters
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=encoder()).logits
    flat = encoder.to_flat()
    assert flat.hidden_size is None and all(m.is_flat for m in flat.prefixes.values())
    torch.testing.assert_close(model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=flat()).logits, got)
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=flat())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def test_from_tokens_uses_the_models_own_activations(model):
    """An encoder prefix equal to each layer's keys/values of the same text duplicates every key:
    softmax attention is unchanged, so the encoder output equals the prefix-free one."""
    config = model.config
    ids, _ = source_batch(config, batch=1)
    encoder = bpp.PrefixEncoder.from_tokens(model, ids, sites=("encoder",))
    assert encoder.prefix_lengths == {"encoder": ids.shape[1]}
    with_prefix = model.get_encoder()(input_ids=ids, prefix=encoder()).last_hidden_state
    plain = reference_encoder(model, ids)
    torch.testing.assert_close(with_prefix.double(), plain, atol=1e-4, rtol=0)
    # Other text gives another prefix, which does change the output.
    other = bpp.PrefixEncoder.from_tokens(model, source_batch(config, batch=1, seed=9)[0], sites=("encoder",))
    moved = model.get_encoder()(input_ids=ids, prefix=other()).last_hidden_state
    assert (moved.double() - plain).abs().max() > 1e-3
    full = bpp.PrefixEncoder.from_tokens(model, ids)
    assert set(full.prefix_lengths) == {"encoder", "decoder", "cross"}


def test_add_prefix_tuning_freezes_and_detach_restores(model):
    model.model.shared.weight.requires_grad_(False)  # a user's own choice, to be restored as it was
    encoder = bpp.add_prefix_tuning(model, prefix_length=4, hidden_size=8)
    assert bpp.attached(model) is encoder
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("bpp_prefix.") for name in trainable)
    counts = bpp.trainable_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in encoder.parameters())
    assert 0 < counts["percent"] < 100 and counts["total"] > counts["trainable"]
    bpp.detach(model)
    assert bpp.attached(model) is None
    assert not model.model.shared.weight.requires_grad
    assert model.lm_head.weight.requires_grad is False  # tied to shared
    assert model.model.encoder.layers[0].fc1.weight.requires_grad


def test_training_steps_lower_the_loss():
    model = tiny_model(seed=1, attn_implementation="sdpa")
    config = model.config
    ids, mask = source_batch(config, batch=4, pad_last=2)
    labels = target_batch(config, batch=4)
    encoder = bpp.add_prefix_tuning(model, prefix_length=4, hidden_size=32)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses


def test_save_load_round_trip(tmp_path, model):
    config = model.config
    encoder = bpp.add_prefix_tuning(model, prefix_length={"encoder": 2, "decoder": 3, "cross": 1}, hidden_size=8)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.5)
    ids, mask = source_batch(config)
    decoder_ids = target_batch(config)
    want = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    bpp.save_prefix(model, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "prefix_config.json").read_text())
    assert saved["prefix_length"] == {"encoder": 2, "decoder": 3, "cross": 1} and saved["hidden_size"] == 8
    assert saved["bart_prefix_patch_version"] == bpp.__version__
    assert not list((tmp_path / "p").glob("*.bin")) and not list((tmp_path / "p").glob("*.pt"))
    bpp.detach(model)
    loaded = bpp.load_prefix(tmp_path / "p", model=model)
    assert bpp.attached(model) is None, "load_prefix returns, never attaches"
    got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=loaded()).logits
    assert torch.equal(got, want)
    assert torch.equal(bpp.load_prefix(tmp_path / "p")().decoder[0][0], loaded().decoder[0][0])


def test_load_errors(tmp_path, model):
    with pytest.raises(bpp.PrefixError, match="prefix_config.json"):
        bpp.load_prefix(tmp_path)
    bpp.save_prefix(bpp.PrefixEncoder(model.config, prefix_length=2, hidden_size=None), tmp_path / "p")
    other = tiny_model(seed=0, decoder_layers=1)
    with pytest.raises(bpp.PrefixError, match="decoder_layers: model 1, prefix 3"):
        bpp.load_prefix(tmp_path / "p", model=other)
    with pytest.raises(bpp.PrefixError, match="PrefixEncoder"):
        bpp.save_prefix(model, tmp_path / "q")
