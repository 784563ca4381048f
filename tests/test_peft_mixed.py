"""PEFT mixed batches: several prefix-tuning adapters, ``adapter_names=[...]`` per example."""

from __future__ import annotations

import pytest
import torch
from conftest import target_batch
from reference import reference_logits, tiny_model

import bart_prefix_patch as bpp
from bart_prefix_patch import _peft

peft = pytest.importorskip("peft")
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

ATOL = 1e-4
LENGTHS = {"default": 4, "b": 2, "c": 6}


@pytest.fixture(autouse=True)
def _integration_on():
    assert bpp.apply(strict=True, peft=True)
    assert _peft.is_installed()
    yield
    bpp.apply(strict=True, peft=True)


def make_multi(attn="eager"):
    base = tiny_model(seed=0, attn_implementation=attn, decoder_layers=2, decoder_attention_heads=4)
    model = None
    generator = torch.Generator().manual_seed(3)
    for name, length in LENGTHS.items():
        config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=length, prefix_projection=(name == "c"),
                                    encoder_hidden_size=24)
        if model is None:
            model = get_peft_model(base, config)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    return model.eval()


def _inputs(config, n):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, config.vocab_size, (n, 6), generator=generator)
    mask = torch.ones(n, 6, dtype=torch.long)
    ids[2, -2:], mask[2, -2:] = config.pad_token_id, 0
    return ids, mask


def _alone(model, name, fn):
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter(previous)


NAMES = ["b", "__base__", "c", "default", "b"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_rows_equal_each_adapter_alone(attn):
    model = make_multi(attn)
    config = model.get_base_model().config
    ids, mask = _inputs(config, len(NAMES))
    dec = target_batch(config, batch=len(NAMES))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            want = _alone(model, name, lambda: model(
                input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], decoder_input_ids=dec[row : row + 1]
            ).logits)
            torch.testing.assert_close(got[row : row + 1], want, atol=ATOL, rtol=0)
    # and against the reference with the adapter's prefix
    prefix = _alone(model, "c", lambda: bpp.peft_prefix(model))
    want = reference_logits(model.get_base_model(), ids[2:3], dec[2:3], mask[2:3], prefix=prefix)
    torch.testing.assert_close(got[2:3].double(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3, num_return_sequences=2)])
def test_generate_rows_equal_each_adapter_alone(kwargs):
    model = make_multi()
    config = model.get_base_model().config
    ids, mask = _inputs(config, len(NAMES))
    gen = dict(max_new_tokens=5, do_sample=False, **kwargs)
    k = kwargs.get("num_return_sequences", 1)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **gen)
        outputs = set()
        for row, name in enumerate(NAMES):
            want = _alone(model, name, lambda: model.generate(
                input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], **gen))
            assert got[row * k : (row + 1) * k, : want.shape[1]].tolist() == want.tolist(), (row, name)
            outputs.add(tuple(want[0].tolist()))
    assert len(outputs) > 1


def test_training_step_sends_gradients_to_the_batch_adapters_only():
    model = make_multi().train()
    config = model.get_base_model().config
    ids, mask = _inputs(config, 3)
    dec = target_batch(config, batch=3)
    model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=dec, adapter_names=["b", "__base__", "c"]).loss.backward()
    for name, encoder in model.prompt_encoder.items():
        grads = [p.grad for p in encoder.parameters()]
        if name in ("b", "c"):
            assert all(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), name


def test_bad_adapter_names():
    model = make_multi()
    config = model.get_base_model().config
    ids, mask = _inputs(config, 3)
    dec = target_batch(config, batch=3)
    with pytest.raises(bpp.PrefixError, match=r"adapter_names: expected 3 names \(one per example of the batch\), got 2"):
        model(input_ids=ids, decoder_input_ids=dec, adapter_names=["b", "c"])
    with pytest.raises(bpp.PrefixError, match=r"adapter_names\[1\]: expected one of .* got 'nope'"):
        model.generate(input_ids=ids, adapter_names=["b", "nope", "c"], max_new_tokens=2)
    # PEFT refuses other adapter types next to prefix tuning in one model; a config in the table is enough here.
    model.peft_config["prompt"] = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)
    with pytest.raises(bpp.PrefixError, match=r"adapter_names\[2\]: expected a PREFIX_TUNING adapter .* got 'prompt'"):
        model(input_ids=ids, decoder_input_ids=dec, adapter_names=["b", "c", "prompt"])
