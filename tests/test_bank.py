"""PrefixBank: named prefixes, per-example selection, gradients only to the selected tasks, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_prefix, target_batch
from reference import reference_logits, tiny_model

import bart_prefix_patch as bpp

ATOL = 1e-4


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self):
        self.calls += 1
        return self.inner()


def _bank(config):
    torch.manual_seed(0)
    return bpp.PrefixBank(
        {
            "summarize": Counting(bpp.PrefixEncoder(config, prefix_length=3, hidden_size=8)),
            "translate": Counting(bpp.PrefixEncoder(config, prefix_length={"decoder": 5, "cross": 2}, sites=("decoder", "cross"), hidden_size=None)),
            "fixed": make_prefix(config, enc_len=2, dec_len=6, cross_len=4, scale=2.0),
        }
    )


def _inputs(config, n):
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, config.vocab_size, (n, 6), generator=generator)
    mask = torch.ones(n, 6, dtype=torch.long)
    ids[1, -2:], mask[1, -2:] = config.pad_token_id, 0
    return ids, mask, target_batch(config, batch=n)


def test_select_calls_each_selected_module_once_and_matches_solo(model):
    config = model.config
    bank = _bank(config)
    names = ["translate", None, "fixed", "translate", "summarize"]
    prefix = bank.select(names)
    assert bank.entries["translate"].calls == 1 and bank.entries["summarize"].calls == 1
    ids, mask, dec = _inputs(config, len(names))
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    for row, name in enumerate(names):
        solo = bank.entries[name]() if name is not None else None
        want = reference_logits(model, ids[row : row + 1], dec[row : row + 1], mask[row : row + 1], prefix=solo)
        torch.testing.assert_close(got[row : row + 1].double(), want, atol=ATOL, rtol=0)


def test_unselected_entries_are_not_called_and_get_no_gradient():
    model = tiny_model()
    config = model.config
    bank = _bank(config)
    names = ["translate", None, "fixed"]
    ids, mask, dec = _inputs(config, 3)
    loss = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=dec, prefix=bank.select(names)).loss
    loss.backward()
    assert bank.entries["summarize"].calls == 0
    assert all(p.grad is None for p in bank.entries["summarize"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.entries["translate"].parameters())


def test_one_task_batch_broadcasts():
    config = tiny_model().config
    bank = _bank(config)
    prefix = bank.select(["fixed", "fixed", "fixed"])
    assert prefix.decoder[0][0].shape[0] == 1 and prefix.lengths is None


def test_generate_with_bank(model):
    config = model.config
    bank = _bank(config)
    names = ["translate", "fixed", None, "summarize"]
    ids, mask, _ = _inputs(config, 4)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, prefix=bank.select(names), max_new_tokens=5, num_beams=2)
        for row, name in enumerate(names):
            solo = bank.entries[name]() if name else bpp.Prefix()
            want = model.generate(ids[row : row + 1], attention_mask=mask[row : row + 1], prefix=solo, max_new_tokens=5, num_beams=2)
            assert got[row, : want.shape[1]].tolist() == want[0].tolist()


def test_missing_name_and_bad_names():
    config = tiny_model().config
    bank = _bank(config)
    with pytest.raises(bpp.PrefixError, match=r"example 1: expected one of \['summarize', 'translate', 'fixed'\] or None, got 'qa'"):
        bank.select(["fixed", "qa"])
    with pytest.raises(bpp.PrefixError, match="without '.'"):
        bpp.PrefixBank({"a.b": make_prefix(config)})
    with pytest.raises(bpp.PrefixError, match="entry 'x': expected a Prefix or a module"):
        bpp.PrefixBank({"x": 3})
    with pytest.raises(bpp.PrefixError, match="one per example"):
        bank.select("fixed")


def test_save_and_load_round_trip(tmp_path, model):
    config = model.config
    bank = _bank(config)
    plain = bpp.PrefixBank({name: entry.inner if isinstance(entry, Counting) else entry for name, entry in bank.entries.items()})
    plain.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "prefix_bank.json").read_text())
    assert manifest["names"] == ["summarize", "translate", "fixed"]
    loaded = bpp.PrefixBank.load(tmp_path / "bank", model=model)
    assert loaded.names() == ["summarize", "translate", "fixed"]
    names = ["fixed", "summarize", None, "translate"]
    ids, mask, dec = _inputs(config, 4)
    a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=plain.select(names)).logits
    b = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=loaded.select(names)).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fixed_prefix_without_config_cannot_be_saved(tmp_path):
    config = tiny_model().config
    bank = bpp.PrefixBank({"fixed": make_prefix(config)})
    with pytest.raises(bpp.PrefixError, match="pass config=model.config"):
        bank.save(tmp_path)
    bank.save(tmp_path / "ok", config=config)
    assert bpp.PrefixBank.load(tmp_path / "ok").names() == ["fixed"]


def test_from_prefix_dirs_and_errors(tmp_path, model):
    config = model.config
    first = bpp.PrefixEncoder(config, prefix_length=3, hidden_size=8)
    second = bpp.PrefixEncoder(config, prefix_length=5, sites=("decoder",), hidden_size=None)
    bpp.save_prefix(first, tmp_path / "a")
    bpp.save_prefix(second, tmp_path / "b")
    bank = bpp.PrefixBank.from_prefix_dirs({"a": tmp_path / "a", "b": tmp_path / "b"}, model=model)
    ids, mask, dec = _inputs(config, 2)
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix=bank.select(["b", "a"])).logits
    want = model(input_ids=ids[1:], attention_mask=mask[1:], decoder_input_ids=dec[1:], prefix=first()).logits
    torch.testing.assert_close(got[1:], want, atol=1e-5, rtol=0)
    with pytest.raises(bpp.PrefixError, match="directory not found"):
        bpp.PrefixBank.from_prefix_dirs({"a": tmp_path / "a", "c": tmp_path / "missing"})
    with pytest.raises(bpp.PrefixError, match="no prefix_bank.json"):
        bpp.PrefixBank.load(tmp_path / "a")
