"""Attribute probes on a Prefix, and accelerate-offloaded models (cpu_offload, dispatch_model, device_map).

accelerate's hooks probe every keyword argument with ``hasattr(x, "to")`` and leave the
offloaded weights on the ``meta`` device between calls; a prefix must pass through the
probe untouched and be checked against the device the layer runs on. Every result is
compared with the plain-PyTorch reference, computed from the model before it was offloaded.
"""

from __future__ import annotations

import inspect

import warnings

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_greedy, reference_logits, tiny_model

import bart_prefix_patch as bpp

accelerate = pytest.importorskip("accelerate")

NEW = 5


# ------------------------------------------------------------ attribute probes


def test_hasattr_is_false_for_unknown_attributes():
    prefix = bpp.Prefix()
    assert not hasattr(prefix, "to")
    assert not hasattr(prefix, "get_seq_length")
    assert getattr(prefix, "to", None) is None
    with pytest.raises(AttributeError):
        prefix.to  # noqa: B018 - the lookup is the test
    assert hasattr(prefix, "sites") and prefix.decoder is None


def test_unknown_attribute_error_names_the_cause_while_applied():
    with pytest.raises(bpp.PrefixAttributeError) as info:
        bpp.Prefix().get_seq_length()
    error = info.value
    assert isinstance(error, AttributeError) and isinstance(error, bpp.PrefixMisplacedError)
    assert isinstance(error, bpp.BartPrefixPatchError)
    message = str(error)
    assert "Prefix.get_seq_length" in message and "cache object is expected" in message
    assert "is applied" not in message  # the old message blamed a patch that was in fact applied


def test_unknown_attribute_error_names_the_cause_while_reverted():
    bpp.revert()
    with pytest.raises(bpp.PatchNotAppliedError) as info:
        bpp.Prefix().get_seq_length()
    assert isinstance(info.value, AttributeError) and isinstance(info.value, bpp.PrefixAttributeError)
    assert "not applied" in str(info.value) and "bpp.apply()" in str(info.value)


@pytest.mark.parametrize("use", ["index", "iter", "len"], ids=str)
def test_protocols_still_fail_loudly(use):
    prefix = bpp.Prefix()
    calls = {"index": lambda: prefix[0], "iter": lambda: iter(prefix), "len": lambda: len(prefix)}
    with pytest.raises(bpp.PrefixMisplacedError, match="used as a cache object"):
        calls[use]()
    bpp.revert()
    with pytest.raises(bpp.PatchNotAppliedError, match="not applied"):
        calls[use]()


def test_unsupported_model_class_is_named():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 60, (1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values -> cache rename on 5.x
        for kwargs in ({"past_key_values": bpp.Prefix()}, {"prefix": bpp.Prefix()}):
            with pytest.raises(bpp.UnsupportedModelError, match=r"T5ForConditionalGeneration.*'t5'.*Supported model types: bart"):
                model(ids, decoder_input_ids=ids, **kwargs)
        with pytest.raises(bpp.UnsupportedModelError, match=r"generate\(\).*Supported model types"):
            model.generate(ids, prefix=bpp.Prefix(), max_new_tokens=2)
        with pytest.raises(bpp.PrefixError, match=r"model types: bart"):
            bpp.attach(model, bpp.Prefix())


def test_prefix_as_a_layer_cache_is_named():
    model = tiny_model(seed=0)
    attention = model.model.decoder.layers[0].self_attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(bpp.PrefixMisplacedError, match=r"called directly"):
            # The cache argument's name changed across releases (past_key_value <= 4.55, cache on 5.24+).
            parameters = inspect.signature(attention.forward).parameters
            name = next(n for n in ("cache", "past_key_values", "past_key_value") if n in parameters)
            attention(torch.zeros(1, 3, model.config.d_model), **{name: bpp.Prefix()})


# ------------------------------------------------------------ accelerate


@pytest.fixture
def base():
    """The model the references are computed from (never offloaded)."""
    return tiny_model(seed=0, attn_implementation="sdpa")


@pytest.fixture
def saved(base, tmp_path):
    directory = tmp_path / "tiny"
    base.save_pretrained(directory)
    return directory


def _inputs(config):
    ids, mask = source_batch(config, pad_last=2)
    return ids, mask, target_batch(config)


def _assert_matches_reference(base, model, prefix, attach: bool):
    """Forward and greedy generate of ``model`` (offloaded) equal the reference on ``base``."""
    ids, mask, dec = _inputs(base.config)
    kwargs = {} if attach else {"prefix": prefix}
    if attach:
        bpp.attach(model, prefix)
    try:
        logits = model(ids, attention_mask=mask, decoder_input_ids=dec, **kwargs).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False, **kwargs)
    finally:
        bpp.detach(model)
    want = reference_logits(base, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(logits.double(), want, atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == reference_greedy(base, ids, NEW, attention_mask=mask, prefix=prefix).tolist()


def _offloaded_somewhere(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _load(saved, **kwargs):
    from transformers import BartForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate's notes on tied weights and offloading
        return BartForConditionalGeneration.from_pretrained(saved, attn_implementation="sdpa", **kwargs).eval()


# Encoder layers offloaded to disk, everything else on the CPU. (The tied embeddings stay on one device:
# offloading model.encoder as a whole fails in stock accelerate, prefix or not.)
DISK_MAP = {
    "model.shared": "cpu",
    "model.encoder.embed_tokens": "cpu",
    "model.encoder.embed_positions": "cpu",
    "model.encoder.layernorm_embedding": "cpu",
    "model.encoder.layers": "disk",
    "model.decoder": "cpu",
    "lm_head": "cpu",
    "final_logits_bias": "cpu",
}


def _cpu_offload(base, saved, tmp_path):
    model = _load(saved)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def _dispatch_model(base, saved, tmp_path):
    model = _load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accelerate.dispatch_model(model, device_map=DISK_MAP, offload_dir=str(tmp_path / "offload"))


def _device_map_disk(base, saved, tmp_path):
    return _load(saved, device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))


def _device_map_auto(base, saved, tmp_path):
    return _load(saved, device_map="auto")


LOADERS = {
    "cpu_offload": _cpu_offload,
    "dispatch_model": _dispatch_model,
    "device_map_disk": _device_map_disk,
    "device_map_auto": _device_map_auto,
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("how", ["prefix=", "attach"])
def test_offloaded_model_matches_reference(loader, how, base, saved, tmp_path):
    model = LOADERS[loader](base, saved, tmp_path)
    if loader != "device_map_auto":  # "auto" on a CPU-only machine places everything on the CPU
        assert _offloaded_somewhere(model)
    prefix = make_prefix(base.config, scale=2.0)
    _assert_matches_reference(base, model, prefix, attach=how == "attach")


@pytest.mark.parametrize("hidden_size", [None, 8], ids=["flat", "mlp"])
def test_prefix_encoder_attached_before_cpu_offload(base, hidden_size):
    """The attached PrefixEncoder is offloaded with the model; its hooks load it when it runs."""
    model = tiny_model(seed=0, attn_implementation="sdpa")
    torch.manual_seed(3)
    encoder = bpp.PrefixEncoder(model.config, prefix_length=3, hidden_size=hidden_size)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_()
        prefix = encoder()
    bpp.attach(model, encoder)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in encoder.parameters())
    ids, mask, dec = _inputs(base.config)
    logits = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(
        logits.double(), reference_logits(base, ids, dec, attention_mask=mask, prefix=prefix), atol=1e-4, rtol=1e-4
    )
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False)
    assert tokens.tolist() == reference_greedy(base, ids, NEW, attention_mask=mask, prefix=prefix).tolist()


def test_meta_model_without_hooks_is_refused_and_left_untouched():
    """Weights on meta and no accelerate hook: nothing says where the layers run."""
    with torch.device("meta"):
        model = tiny_model(seed=0)
    prefix = make_prefix(model.config)
    with pytest.raises(bpp.PrefixError, match=r"on meta without an accelerate hook"):
        bpp.attach(model, prefix)
    assert bpp.attached(model) is None and "bpp_prefix" not in model._modules


def test_prefix_on_the_wrong_device_for_an_offloaded_model(saved, base, tmp_path):
    model = _cpu_offload(base, saved, tmp_path)
    prefix = bpp.Prefix(decoder=[(k.to("meta"), v.to("meta")) for k, v in make_prefix(base.config).decoder])
    with pytest.raises(bpp.PrefixError, match=r"model's device cpu, got key on meta"):
        bpp.attach(model, prefix)
    assert bpp.attached(model) is None
