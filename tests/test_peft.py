"""PEFT prefix-tuning (PrefixTuningConfig + get_peft_model) on BART, with the integration.

Oracle: the plain-PyTorch reference (tests/reference.py) fed the prefix the
integration documents (docs/peft.md), derived here independently from the
prompt encoder's rows. Legacy checkpoints (saved by stock PEFT) are checked
against stock PEFT's own forward, run with the integration switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_greedy, reference_logits, reference_sequence_logprob, tiny_model

import bart_prefix_patch as bpp
from bart_prefix_patch import _peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from peft.peft_model import PeftModelForSeq2SeqLM  # noqa: E402

NEW = 6
P = 4
#: name -> tiny_model overrides. "tiny": encoder 2 layers x 4 heads, decoder 3 x 2 (stock PEFT
#: crashes on it); "same": encoder and decoder alike (stock PEFT runs); "deep_encoder": 4
#: encoder layers, 2 decoder layers (the 12/6 shape of distilbart).
CONFIGS = {
    "tiny": {},
    "same": dict(decoder_layers=2, decoder_attention_heads=4),
    "deep_encoder": dict(encoder_layers=4, decoder_layers=2, decoder_attention_heads=4),
}


@pytest.fixture(autouse=True)
def _integration_on():
    assert bpp.apply(strict=True, peft=True)
    assert _peft.is_installed()
    yield
    bpp.apply(strict=True, peft=True)


def make_peft(config="tiny", attn="eager", projection=False, scale=2.0, seed=0, prepare=None):
    """A tiny BART wrapped by get_peft_model with a random (non-zero) prefix-tuning adapter.

    ``prepare(base)`` runs on the base model before ``get_peft_model`` (e.g. to attach a prefix).
    """
    base = tiny_model(seed=seed, attn_implementation=attn, **CONFIGS[config])
    if prepare is not None:
        prepare(base)
    peft_config = PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24
    )
    model = get_peft_model(base, peft_config)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def expected_prefix(model, semantics="full") -> bpp.Prefix:
    """docs/peft.md's mapping, from the prompt encoder's rows.

    The encoder yields 2 * L rows of d_model features per virtual token (L: PEFT's
    num_layers, the encoder's layer count). Decoder layer i uses PEFT's entry
    e = i mod L, whose self key/value and cross key/value are rows
    (4e + j) mod 2L for j = 0..3; each row is split into the decoder's heads.
    """
    config = model.active_peft_config
    core = model.get_base_model().model
    layers, width = config.num_layers, config.token_dim
    heads = core.config.decoder_attention_heads
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        if config.inference_mode:
            raw = encoder.embedding.weight
        else:
            raw = encoder(torch.arange(P)[None])[0]
    rows = raw.view(P, 2 * layers, width)

    def kv(row):
        return rows[:, row % (2 * layers)].reshape(P, heads, width // heads).transpose(0, 1)[None].clone()

    decoder, cross = [], []
    for index in range(core.config.decoder_layers):
        entry = index % layers
        decoder.append((kv(4 * entry), kv(4 * entry + 1)))
        cross.append((kv(4 * entry + 2), kv(4 * entry + 3)))
    return bpp.Prefix(decoder=decoder, cross=cross if semantics == "full" else None)


def _greedy(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=1, **kwargs
    )


def _stock(fn):
    """Run ``fn`` with PEFT's own code (the integration off), then switch it back on."""
    bpp.apply(peft=False)
    try:
        assert not _peft.is_installed()
        return fn()
    finally:
        bpp.apply(peft=True)


# ------------------------------------------------------------------ install


def test_switch_and_revert_restore_peft_exactly():
    on = {attr: PeftModelForSeq2SeqLM.__dict__[attr] for attr in ("forward", "generate")}
    bpp.apply(peft=False)
    off = {attr: PeftModelForSeq2SeqLM.__dict__[attr] for attr in ("forward", "generate")}
    assert all(on[attr] is not off[attr] for attr in on)
    assert all(getattr(off[attr], "__wrapped__", None) is None for attr in off)
    bpp.apply()  # None keeps the last choice: still off
    assert not _peft.is_installed()
    bpp.apply(peft=True)
    assert _peft.is_installed()
    bpp.revert()
    try:
        assert not _peft.is_installed()
        assert all(PeftModelForSeq2SeqLM.__dict__[attr] is off[attr] for attr in off)
    finally:
        bpp.apply()
    assert _peft.is_installed(), "apply() after revert() restores the integration with the last choice"


def test_prefix_tuning_semantics_reported():
    model = make_peft()
    assert bpp.peft_semantics(model) == "full"
    bpp.apply(peft=False)
    try:
        assert bpp.peft_semantics(model) is None
    finally:
        bpp.apply(peft=True)


# -------------------------------------------------- forward == reference


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_reference(config, attn):
    model = make_peft(config, attn)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config)
    dec_mask = torch.ones_like(dec)
    dec_mask[-1, -2:] = 0
    prefix = expected_prefix(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    want = reference_logits(base, ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask, prefix=prefix)
    torch.testing.assert_close(out.logits.double(), want, atol=1e-4, rtol=0)
    # The integration's own conversion is the documented one.
    got = bpp.peft_prefix(model)
    for site in ("decoder", "cross"):
        for (k, v), (ek, ev) in zip(getattr(got, site), getattr(prefix, site)):
            torch.testing.assert_close(k, ek)
            torch.testing.assert_close(v, ev)


def test_self_half_is_what_peft_puts_in_its_cache():
    """Where stock PEFT's cache fits the decoder, its self-attention half is ours, layer for layer."""
    model = make_peft("same")
    cache = model.get_prompt(batch_size=1)
    prefix = bpp.peft_prefix(model)
    for index, (key, value) in enumerate(prefix.decoder):
        layer = cache.self_attention_cache.layers[index]
        torch.testing.assert_close(key, layer.keys)
        torch.testing.assert_close(value, layer.values)


def test_loss_and_labels_match_reference():
    model = make_peft()
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    labels = target_batch(base.config)[:, 1:].contiguous()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    from transformers.models.bart.modeling_bart import shift_tokens_right

    dec = shift_tokens_right(labels, base.config.pad_token_id, base.config.decoder_start_token_id)
    logits = reference_logits(base, ids, dec, attention_mask=mask, prefix=expected_prefix(model))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(loss.double(), want, atol=1e-4, rtol=0)


def test_outputs_depend_on_the_input():
    model = make_peft()
    base = model.get_base_model()
    ids, mask = source_batch(base.config, batch=2)
    dec = target_batch(base.config, batch=2)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        second = model(input_ids=ids.flip(1), attention_mask=mask.flip(1), decoder_input_ids=dec).logits
    assert (first - second).abs().max() > 1e-2
    scores = [
        torch.stack(_greedy(model, i, m, output_scores=True, return_dict_in_generate=True).scores, dim=1)
        for i, m in ((ids, mask), (ids.flip(1), mask.flip(1)))
    ]
    assert (scores[0] - scores[1]).abs().max() > 1e-2, "generate() must see the source, not only the prefix"


# ----------------------------------------------------------------- generate


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_reference_and_teacher_forcing(config, attn):
    model = make_peft(config, attn)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    got = _greedy(model, ids, mask)
    want = reference_greedy(base, ids, NEW, attention_mask=mask, prefix=expected_prefix(model))
    assert got.tolist() == want.tolist()
    assert _greedy(model, ids, mask, use_cache=False).tolist() == got.tolist(), "cache == no cache"
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=got[:, :-1]).logits
    assert logits.argmax(-1).tolist() == got[:, 1:].tolist(), "greedy == argmax of the teacher-forced forward"
    with torch.no_grad():
        plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert plain.tolist() != got.tolist(), "the prefix must change generate()"


def test_greedy_scores_equal_teacher_forced_logits():
    model = make_peft("same")
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=1)
    out = _greedy(model, ids, mask, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.scores, dim=1), logits, atol=1e-4, rtol=0)


def test_beam_scores_equal_teacher_forced_logprob():
    model = make_peft()
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=1)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
        length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    want = reference_sequence_logprob(
        base, ids.repeat_interleave(2, 0), out.sequences, attention_mask=mask.repeat_interleave(2, 0),
        prefix=expected_prefix(model),
    )
    torch.testing.assert_close(out.sequences_scores.double(), want, atol=1e-4, rtol=0)


def test_generate_requires_input_ids_like_peft():
    model = make_peft()
    with pytest.raises(ValueError, match="input_ids must be provided"):
        model.generate(inputs_embeds=torch.zeros(1, 3, 32))


# ---------------------------------------- your own prefix next to the adapter


def composed(adapter, user):
    """docs/peft.md, "Your own prefix": per site and layer, ``[adapter ; user]`` along the prefix length."""
    sites = {}
    for site in ("encoder", "decoder", "cross"):
        ours, theirs = getattr(adapter, site), getattr(user, site)
        if ours is None or theirs is None:
            sites[site] = theirs if ours is None else ours
            continue
        sites[site] = [
            tuple(torch.cat([a.expand(u.shape[0], -1, -1, -1), u], dim=2) for a, u in zip(pair, user_pair))
            for pair, user_pair in zip(ours, theirs)
        ]
    return bpp.Prefix(**sites)


#: How the user's prefix reaches the PeftModel's call.
GIVEN = ["prefix=", "past_key_values=", "attached_before_get_peft_model", "attached_after", "module_attached_before"]


def with_user_prefix(how, attn="eager", batch=1):
    """``(peft model, the user's Prefix, extra call kwargs)`` for one way of giving it."""
    made = {}

    def prepare(base):
        made["user"] = make_prefix(base.config, batch=batch, enc_len=2, dec_len=3, cross_len=2, seed=5, scale=2.0)
        if how == "attached_before_get_peft_model":
            bpp.attach(base, made["user"])
        elif how == "module_attached_before":
            encoder = bpp.add_prefix_tuning(base, prefix_length=3, hidden_size=8)
            with torch.no_grad():
                for parameter in encoder.parameters():
                    parameter.normal_(0, 1.0, generator=torch.Generator().manual_seed(parameter.numel()))

    model = make_peft(attn=attn, prepare=prepare)
    base = model.get_base_model()
    if how == "attached_after":
        bpp.attach(base, made["user"])
    if how == "module_attached_before":
        with torch.no_grad():
            made["user"] = bpp.attached(base)()
    kwargs = {"prefix=": {"prefix": made["user"]}, "past_key_values=": {"past_key_values": made["user"]}}.get(how, {})
    return model, made["user"], kwargs


@pytest.mark.parametrize("how", GIVEN)
def test_user_prefix_composes_with_the_adapter_in_forward(how):
    model, user, kwargs = with_user_prefix(how)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **kwargs)
    want = reference_logits(base, ids, dec, attention_mask=mask, prefix=composed(expected_prefix(model), user))
    torch.testing.assert_close(out.logits.double(), want, atol=1e-4, rtol=0)
    adapter_only = reference_logits(base, ids, dec, attention_mask=mask, prefix=expected_prefix(model))
    assert (want - adapter_only).abs().max() > 1e-2, "the user's prefix must count (it was silently dropped)"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("how", GIVEN)
def test_user_prefix_composes_with_the_adapter_in_generate(how, attn):
    model, user, kwargs = with_user_prefix(how, attn)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    got = _greedy(model, ids, mask, **kwargs)
    want = reference_greedy(base, ids, NEW, attention_mask=mask, prefix=composed(expected_prefix(model), user))
    assert got.tolist() == want.tolist()
    assert _greedy(model, ids, mask, use_cache=False, **kwargs).tolist() == got.tolist(), "cache == no cache"
    alone = reference_greedy(base, ids, NEW, attention_mask=mask, prefix=expected_prefix(model))
    assert alone.tolist() != want.tolist(), "the user's prefix must change generate()"


def test_per_example_user_prefix_with_beams():
    """A batch-B user prefix meets B * returned rows; the adapter's batch-1 prefix is expanded to B."""
    model, user, kwargs = with_user_prefix("prefix=", batch=2)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=1)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
        length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True, return_dict_in_generate=True,
        **kwargs,
    )
    prefix = composed(expected_prefix(model), user)
    rows = bpp.Prefix(**{
        site: [tuple(t.repeat_interleave(2, 0) for t in pair) for pair in getattr(prefix, site)]
        for site in ("encoder", "decoder", "cross")
    })
    want = reference_sequence_logprob(
        base, ids.repeat_interleave(2, 0), out.sequences, attention_mask=mask.repeat_interleave(2, 0), prefix=rows,
    )
    torch.testing.assert_close(out.sequences_scores.double(), want, atol=1e-4, rtol=0)


def test_gradients_reach_the_adapter_and_the_user_prefix():
    model, user, _ = with_user_prefix("prefix=")
    model.train()
    tensors = [t.detach().clone().requires_grad_() for pair in user.decoder for t in pair]
    user = bpp.Prefix(encoder=user.encoder, decoder=list(zip(tensors[::2], tensors[1::2])), cross=user.cross)
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    labels = target_batch(base.config)[:, 1:].contiguous()
    model(input_ids=ids, attention_mask=mask, labels=labels, prefix=user).loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)
    prompt = [p for p in model.prompt_encoder.parameters() if p.requires_grad]
    assert prompt and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt)


def test_bad_user_prefix_is_refused_and_changes_nothing():
    model, user, _ = with_user_prefix("prefix=")
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    dec = target_batch(base.config)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    short = bpp.Prefix(decoder=user.decoder[:2])
    for call in (
        lambda p: model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=p),
        lambda p: _greedy(model, ids, mask, prefix=p),
    ):
        with pytest.raises(bpp.PrefixError, match=r"PEFT prefix-tuning adapter.*Prefix\.decoder: expected 3 .*got 2"):
            call(short)
        with pytest.raises(bpp.PrefixError, match="expected a bart_prefix_patch.Prefix.*got tuple"):
            call(tuple(user.decoder))
    with pytest.raises(bpp.PrefixError, match="two prefixes given"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=user, past_key_values=short)
    assert bpp.attached(base) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, before)


def test_user_prefix_with_the_adapter_disabled_is_the_user_prefix_alone():
    model, user, _ = with_user_prefix("prefix=")
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    dec = target_batch(base.config)
    want = reference_logits(base, ids, dec, attention_mask=mask, prefix=user)
    with torch.no_grad(), model.disable_adapter():
        given = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=user).logits
        bpp.attach(base, user)
        attached = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(given.double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(attached.double(), want, atol=1e-4, rtol=0)


def test_user_prefix_with_lora_reaches_the_base_model():
    base = tiny_model(seed=0)
    user = make_prefix(base.config, seed=5)
    # lora_B starts at zero: the LoRA model computes exactly the base model, so the reference applies.
    model = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q_proj", "v_proj"])).eval()
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=user).logits
    plain = tiny_model(seed=0)
    want = reference_logits(plain, ids, dec, attention_mask=mask, prefix=user)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)
    got = _greedy(model, ids, mask, prefix=user)
    assert got.tolist() == reference_greedy(plain, ids, NEW, attention_mask=mask, prefix=user).tolist()


# ------------------------------------------------------- other PEFT models


def test_disable_adapter_runs_the_base_model():
    model = make_peft()
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    with torch.no_grad():
        plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        with model.disable_adapter():
            assert _greedy(model, ids, mask).tolist() == plain.tolist()
            disabled = model(input_ids=ids, attention_mask=mask, decoder_input_ids=plain).logits
        torch.testing.assert_close(disabled, base(input_ids=ids, attention_mask=mask, decoder_input_ids=plain).logits)


def test_lora_on_bart_is_untouched():
    base = tiny_model(seed=0)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.eval()
    ids, mask = source_batch(base.config)
    dec = target_batch(base.config)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        stock = _stock(lambda: model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    assert torch.equal(ours, stock)
    assert _greedy(model, ids, mask).tolist() == _stock(lambda: _greedy(model, ids, mask)).tolist()


def test_prefix_tuning_of_another_architecture_is_untouched():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )
    adapter = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    model = get_peft_model(T5ForConditionalGeneration(config), adapter).eval()
    assert bpp.peft_semantics(model) is None
    ids = torch.randint(2, 64, (2, 5))
    dec = torch.randint(2, 64, (2, 4))

    def run():
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=dec).logits

    assert torch.equal(run(), _stock(run))


# ------------------------------------------------------------ legacy / save


def _save_stock_adapter(tmp_path, config="same"):
    model = make_peft(config)
    directory = tmp_path / "stock"
    _stock(lambda: model.save_pretrained(directory))
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert _peft.CONFIG_KEY not in saved
    return model, directory


def _load(directory, config="same", **kwargs):
    return PeftModel.from_pretrained(tiny_model(seed=0, **CONFIGS[config]), directory, **kwargs).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_legacy_checkpoint_runs_as_trained(tmp_path, attn):
    trained, directory = _save_stock_adapter(tmp_path)
    with pytest.warns(bpp.PeftIntegrationWarning, match="saved without bart_prefix_patch") as record:
        base = tiny_model(seed=0, attn_implementation=attn, **CONFIGS["same"])
        model = PeftModel.from_pretrained(base, directory).eval()
    messages = [str(w.message) for w in record if issubclass(w.category, bpp.PeftIntegrationWarning)]
    assert len(messages) == 1 and "set_peft_semantics(model, 'full')" in messages[0]
    assert bpp.peft_semantics(model) == "legacy"
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config)
    dec_mask = torch.ones_like(dec)
    dec_mask[-1, -2:] = 0
    args = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)

    def forward():
        with torch.no_grad():
            return model(**args).logits

    legacy = forward()
    stock = _stock(forward)
    torch.testing.assert_close(legacy, stock, atol=1e-5, rtol=0)  # stock PEFT's training-time forward

    out = _greedy(model, ids, mask, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.scores, dim=1), logits, atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == out.sequences[:, 1:].tolist()
    assert _greedy(model, ids, mask, use_cache=False).tolist() == out.sequences.tolist()

    # Opting in: the full semantics, recorded on save.
    bpp.set_peft_semantics(model, "full")
    with torch.no_grad():
        full = model(**args).logits
    want = reference_logits(
        base, ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask, prefix=expected_prefix(model)
    )
    torch.testing.assert_close(full.double(), want, atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "opted_in")
    saved = json.loads((tmp_path / "opted_in" / "adapter_config.json").read_text())
    assert saved[_peft.CONFIG_KEY]["semantics"] == "full"


def test_legacy_positions_are_shifted_and_cross_half_unused(tmp_path):
    _, directory = _save_stock_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bpp.PeftIntegrationWarning)
        model = _load(directory)
    base = model.get_base_model()
    ids, mask = source_batch(base.config)
    dec = target_batch(base.config)
    legacy = bpp.peft_prefix(model)
    assert legacy.cross is None
    # Reference with the positions shifted by P: the reference's decoder positions
    # are 0..T-1, so shift the learned position table instead.
    shifted = tiny_model(seed=0, **CONFIGS["same"])
    with torch.no_grad():
        table = shifted.model.decoder.embed_positions.weight
        table[2:-P] = table[2 + P:].clone()
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    want = reference_logits(shifted, ids, dec, attention_mask=mask, prefix=legacy)
    torch.testing.assert_close(logits.double(), want, atol=1e-4, rtol=0)


def test_train_save_load_round_trip(tmp_path):
    base = tiny_model(seed=0)
    torch.manual_seed(0)
    model = get_peft_model(
        base,
        PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=32
        ),
    )
    generator = torch.Generator().manual_seed(5)
    src = torch.randint(3, 64, (4, 6), generator=generator)
    labels = torch.randint(3, 64, (4, 5), generator=generator)
    labels[:, -1] = base.config.eos_token_id
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert trainable and all(parameter.requires_grad is False for parameter in base.parameters())
    # lr 1e-2: 3e-2 oscillated (loss back up to 1.9 by step 80) on some CPUs.
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(150):
        loss = model(input_ids=src, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] / 3, losses
    generated = model.generate(input_ids=src, max_new_tokens=NEW, do_sample=False)
    assert generated[:, 1:].tolist() == labels.tolist(), "generate() reproduces what the forward learned"

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved[_peft.CONFIG_KEY]["semantics"] == "full"
    with warnings.catch_warnings():
        warnings.simplefilter("error", bpp.PeftIntegrationWarning)  # no legacy warning
        warnings.filterwarnings("ignore", "bart_prefix_patch changes", bpp.PeftIntegrationWarning)
        loaded = PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "adapter").eval()
    assert bpp.peft_semantics(loaded) == "full"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=src, labels=labels).logits, model(input_ids=src, labels=labels).logits)
    assert loaded.generate(input_ids=src, max_new_tokens=NEW, do_sample=False).tolist() == generated.tolist()


def test_legacy_is_decided_by_the_weights_loaded(tmp_path):
    _, directory = _save_stock_adapter(tmp_path)
    from peft import PeftConfig

    adapter = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    config = PeftConfig.from_pretrained(directory)
    fresh = get_peft_model(tiny_model(seed=0, **CONFIGS["same"]), config)
    assert bpp.peft_semantics(fresh) == "full", "a new adapter from a stock config trains with the full semantics"
    with pytest.warns(bpp.PeftIntegrationWarning, match="saved without bart_prefix_patch"):
        explicit = PeftModel.from_pretrained(
            tiny_model(seed=0, **CONFIGS["same"]), directory, config=PrefixTuningConfig(**adapter)
        )
    assert bpp.peft_semantics(explicit) == "legacy", "weights from an unmarked checkpoint run as trained"
    ours = make_peft("same")
    ours.save_pretrained(tmp_path / "ours")
    explicit = PeftModel.from_pretrained(
        tiny_model(seed=0, **CONFIGS["same"]), tmp_path / "ours", config=PrefixTuningConfig(**adapter)
    )
    assert bpp.peft_semantics(explicit) == "full"


def test_marker_is_stripped_before_peft_sees_it(tmp_path):
    model = make_peft()
    model.save_pretrained(tmp_path)
    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Unexpected keyword arguments" from PEFT
        config = PeftConfig.from_pretrained(tmp_path)
    assert not hasattr(config, _peft.CONFIG_KEY)


def test_old_peft_is_left_alone(monkeypatch):
    bpp.apply(peft=False)
    monkeypatch.setattr(peft, "__version__", "0.17.1")
    monkeypatch.setattr(_peft._install, "_VERSION_WARNED", False)
    with pytest.warns(RuntimeWarning, match="older than 0.21"):
        bpp.apply(peft=True)
    assert not _peft.is_installed()
    monkeypatch.undo()
    bpp.apply(peft=True)
    assert _peft.is_installed()


# ------------------------------------------------- import order, switch, warning

_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("ignore", FutureWarning)
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
{imports}
from bart_prefix_patch import _peft
print("installed", _peft.is_installed())
from peft import PrefixTuningConfig, get_peft_model
from reference import tiny_model
model = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)).eval()
ids = torch.tensor([[5, 6, 7]])
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model(input_ids=ids, decoder_input_ids=ids)
    model.generate(input_ids=ids, max_new_tokens=2)
    model(input_ids=ids, decoder_input_ids=ids)
caught = [w for w in record if issubclass(w.category, bpp.PeftIntegrationWarning)]
print("warnings", len(caught), os.path.basename(caught[0].filename) if caught else None)
# The environment variable (read whenever apply() has not been told otherwise).
os.environ[_peft.ENV_VAR] = "0"
bpp.apply()
print("with {env}=0:", _peft.is_installed())
bpp.apply(peft=True)
print("then apply(peft=True):", _peft.is_installed())
"""


@pytest.mark.parametrize(
    "imports",
    ["import bart_prefix_patch as bpp\nimport peft", "import peft\nimport bart_prefix_patch as bpp"],
    ids=["bpp_first", "peft_first"],
)
def test_lazy_install_switch_and_one_warning(imports):
    env = {k: v for k, v in os.environ.items() if k != _peft.ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"
    code = _SCRIPT.format(tests=str(Path(__file__).parent), imports=imports, env=_peft.ENV_VAR)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "installed True" in out, out
    assert "warnings 1 <string>" in out, out  # once per process, pointing at the user's code
    assert f"with {_peft.ENV_VAR}=0: False" in out, out
    assert "then apply(peft=True): True" in out, out


# ------------------------------------------------------------- BART's relatives


def _relative_peft(model_type, **overrides):
    """A tiny relative wrapped by get_peft_model with a random (non-zero) prefix-tuning adapter."""
    from models import available, tiny_family_model

    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers release")
    model = get_peft_model(tiny_family_model(model_type, seed=0, **overrides),
                           PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    return model.eval()


@pytest.mark.parametrize("model_type", ["mbart", "marian", "pegasus", "m2m_100"])
def test_relatives_forward_and_generate_match_reference(model_type):
    """PEFT prefix tuning of a relative: forward and greedy generate() equal the reference with docs/peft.md's prefix."""
    from models import decoder_vocab_size
    from reference import reference_greedy

    model = _relative_peft(model_type)
    base = model.get_base_model()
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config).clamp(max=decoder_vocab_size(base.config) - 1)
    prefix = expected_prefix(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    want = reference_logits(base, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(out.logits.double(), want, atol=1e-4, rtol=0)
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=1)
    assert tokens.tolist() == reference_greedy(base, ids, NEW, attention_mask=mask, prefix=prefix).tolist()


@pytest.mark.parametrize("model_type", ["m2m_100", "marian"])
def test_relatives_legacy_semantics_equal_stock_peft(model_type):
    """Legacy positions on a relative: the shift hook finds each positional embedding's length argument by name
    (M2M100 passes it third), so the legacy forward equals stock PEFT's own training-time forward."""
    from models import decoder_vocab_size

    model = _relative_peft(model_type, **CONFIGS["same"])
    base = model.get_base_model()
    bpp.set_peft_semantics(model, "legacy")
    ids, mask = source_batch(base.config, pad_last=2)
    dec = target_batch(base.config).clamp(max=decoder_vocab_size(base.config) - 1)

    def forward():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits

    legacy = forward()
    torch.testing.assert_close(legacy, _stock(forward), atol=1e-5, rtol=0)
    full = bpp.set_peft_semantics(model, "full") or forward()
    assert (full - legacy).abs().max() > 1e-3, "the shift (and the cross half) must matter"
