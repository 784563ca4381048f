"""Bad input gets a clear exception naming expected and given values."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import tiny_model

import bart_prefix_patch as bpp


@pytest.fixture
def setup():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config)
    return model, ids, target_batch(model.config), make_prefix(model.config)


def _run(model, ids, dec, prefix):
    return model(ids, decoder_input_ids=dec, prefix=prefix)


def test_wrong_layer_count(setup):
    model, ids, dec, prefix = setup
    bad = bpp.Prefix(decoder=list(prefix.decoder)[:-1])
    with pytest.raises(bpp.PrefixError, match=r"expected 3 .*got 2"):
        _run(model, ids, dec, bad)


def test_wrong_head_count(setup):
    model, ids, dec, prefix = setup
    k, v = prefix.encoder[0]
    bad = bpp.Prefix(encoder=[(k.reshape(1, 2, 3, 16), v.reshape(1, 2, 3, 16))] * 2)
    with pytest.raises(bpp.PrefixError, match=r"expected 4 heads .*got 2"):
        _run(model, ids, dec, bad)


def test_wrong_head_dim(setup):
    model, ids, dec, prefix = setup
    bad = bpp.Prefix(cross=[(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))] * 3)
    with pytest.raises(bpp.PrefixError, match=r"expected head_dim 16 .*got 8"):
        _run(model, ids, dec, bad)


def test_key_value_shape_mismatch(setup):
    model, ids, dec, prefix = setup
    k, v = prefix.decoder[0]
    bad = bpp.Prefix(decoder=[(k, v[:, :, :2])] + list(prefix.decoder[1:]))
    with pytest.raises(bpp.PrefixError, match=r"key shape .* != value shape"):
        _run(model, ids, dec, bad)


def test_not_four_dimensional(setup):
    model, ids, dec, prefix = setup
    bad = bpp.Prefix(decoder=[(torch.zeros(2, 4, 16), torch.zeros(2, 4, 16))] * 3)
    with pytest.raises(bpp.PrefixError, match=r"expected shape"):
        _run(model, ids, dec, bad)


def test_batch_not_one_or_input(setup):
    model, ids, dec, _ = setup
    bad = make_prefix(model.config, batch=3)
    with pytest.raises(bpp.PrefixError, match=r"batch 1 or the input batch 2 .*got 3"):
        _run(model, ids, dec, bad)


def test_device_mismatch(setup, monkeypatch):
    model, ids, dec, prefix = setup
    meta = bpp.Prefix(decoder=[(k.to("meta"), v.to("meta")) for k, v in prefix.decoder])
    with pytest.raises(bpp.PrefixError, match=r"model's device cpu.*meta"):
        _run(model, ids, dec, meta)


def test_not_a_prefix(setup):
    model, ids, dec, _ = setup
    with pytest.raises(bpp.PrefixError, match="expected a bart_prefix_patch.Prefix"):
        _run(model, ids, dec, [(torch.zeros(1), torch.zeros(1))])


def test_attach_non_bart_model():
    with pytest.raises(bpp.PrefixError, match="expected a BART model"):
        bpp.attach(torch.nn.Linear(2, 2), bpp.Prefix())


def test_attach_validates_prefix(setup):
    model, _, _, prefix = setup
    with pytest.raises(bpp.PrefixError, match=r"expected 2 .*got 1"):
        bpp.attach(model, bpp.Prefix(encoder=list(prefix.encoder)[:1]))


def test_module_must_return_prefix(setup):
    model, *_ = setup
    class NotAPrefix(torch.nn.Module):
        def forward(self):
            return [torch.zeros(1)]

    with pytest.raises(bpp.PrefixError, match="must return a bart_prefix_patch.Prefix, got list"):
        bpp.attach(model, NotAPrefix())


def test_two_prefixes(setup):
    model, ids, dec, prefix = setup
    with pytest.raises(bpp.PrefixError, match="two prefixes"):
        model(ids, decoder_input_ids=dec, prefix=prefix, past_key_values=make_prefix(model.config))


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_flash_or_flex_attention_refused(setup, implementation):
    """Refused before any layer runs (flash cannot run on CPU; neither takes our masks)."""
    model, ids, dec, prefix = setup
    model.config._attn_implementation = implementation
    with pytest.raises(bpp.UnsupportedConfigurationError, match=implementation):
        _run(model, ids, dec, prefix)
    with pytest.raises(bpp.UnsupportedConfigurationError, match=implementation):
        model.generate(ids, prefix=prefix, max_new_tokens=2)


def test_from_legacy():
    k = torch.zeros(1, 2, 3, 4)
    p = bpp.Prefix.from_legacy([(k, k, k, k)] * 2)
    assert len(p.decoder) == 2 and len(p.cross) == 2 and p.encoder is None
    p = bpp.Prefix.from_legacy([(k, k)] * 2)
    assert p.cross is None
    with pytest.raises(bpp.PrefixError, match="entry lengths"):
        bpp.Prefix.from_legacy([(k, k, k)])
