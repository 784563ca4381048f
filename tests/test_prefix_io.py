"""The on-disk prefix format (bart_prefix_patch.io): every damaged file is named, nothing is changed.

Each fault is applied to a freshly saved prefix; ``load_prefix`` and ``restore_prefix`` (the
Trainer's resume path) must raise one PrefixError naming the file and the problem, leave the
model and an attached encoder exactly as they were, and never surface a raw SafetensorError,
JSONDecodeError or "size mismatch" RuntimeError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import tiny_model

import bart_prefix_patch as bpp
from bart_prefix_patch import io
from bart_prefix_patch.trainer import restore_prefix


@pytest.fixture
def model():
    return tiny_model(seed=0)


@pytest.fixture
def saved(model, tmp_path):
    torch.manual_seed(1)
    directory = tmp_path / "p"
    bpp.save_prefix(bpp.PrefixEncoder(model.config, prefix_length={"encoder": 2, "cross": 3}, sites=("encoder", "cross"),
                                      hidden_size=4), directory)
    return directory


def _edit_config(**changes):
    def edit(path: Path) -> None:
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return edit


def _drop_config(key):
    def edit(path: Path) -> None:
        config = json.loads(path.read_text())
        del config[key]
        path.write_text(json.dumps(config))

    return edit


def _weights(transform):
    from safetensors.torch import load_file, save_file

    def edit(path: Path) -> None:
        save_file(transform(load_file(str(path))), str(path))

    return edit


FAULTS = {
    "config missing": (io.CONFIG_NAME, lambda p: p.unlink(), "no prefix_config.json"),
    "weights missing": (io.WEIGHTS_NAME, lambda p: p.unlink(), "no prefix_model.safetensors"),
    "config bad JSON": (io.CONFIG_NAME, lambda p: p.write_text("{"), "invalid JSON"),
    "config not UTF-8": (io.CONFIG_NAME, lambda p: p.write_bytes(b"\xfe\xff{}"), "not UTF-8 text"),
    "config not an object": (io.CONFIG_NAME, lambda p: p.write_text('"x"'), "expected a JSON object, got str"),
    "unknown format": (io.CONFIG_NAME, _edit_config(format=9), "expected format 1, got 9"),
    "field missing": (io.CONFIG_NAME, _drop_config("sites"), "missing field(s) sites"),
    "bad sites": (io.CONFIG_NAME, _edit_config(sites=["encoder", "bogus"]), "sites must be a non-empty list"),
    "bad length": (io.CONFIG_NAME, _edit_config(prefix_length={"encoder": 0, "cross": 3}), "prefix_length must be"),
    "bad hidden size": (io.CONFIG_NAME, _edit_config(hidden_size="4"), "hidden_size must be a positive integer"),
    "bad dropout": (io.CONFIG_NAME, _edit_config(dropout=1.5), "dropout must be a number in [0, 1)"),
    "bad dims": (io.CONFIG_NAME, _edit_config(d_model=0), "d_model must be a positive integer"),
    "indivisible heads": (io.CONFIG_NAME, _edit_config(encoder_attention_heads=5), "not divisible"),
    "config disagrees": (io.CONFIG_NAME, _edit_config(hidden_size=6), "config and weights disagree"),
    "weights truncated": (io.WEIGHTS_NAME, lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a valid safetensors"),
    "weights header cut": (io.WEIGHTS_NAME, lambda p: p.write_bytes(p.read_bytes()[:30]), "truncated"),
    "weights empty": (io.WEIGHTS_NAME, lambda p: p.write_bytes(b""), "truncated (0 bytes"),
    "weights a pickle": (io.WEIGHTS_NAME, lambda p: torch.save({"a": torch.ones(1)}, p), "a pickle"),
    "weights text": (io.WEIGHTS_NAME, lambda p: p.write_text("hello, world, not tensors"), "safetensors"),
    "tensor missing": (io.WEIGHTS_NAME, _weights(lambda t: dict(list(t.items())[1:])), "missing ["),
    "tensor extra": (io.WEIGHTS_NAME, _weights(lambda t: {**t, "extra": torch.ones(1)}), "unexpected ['extra']"),
    "tensor reshaped": (io.WEIGHTS_NAME, _weights(lambda t: {k: v.reshape(-1) for k, v in t.items()}), "has shape"),
    "integer tensor": (io.WEIGHTS_NAME, _weights(lambda t: {k: v.long() for k, v in t.items()}), "floating-point"),
    "NaN weights": (io.WEIGHTS_NAME, _weights(lambda t: {k: v * float("nan") for k, v in t.items()}), "NaN"),
    "run info bad JSON": (io.RUN_INFO, lambda p: p.write_text("[1,"), "invalid JSON"),
}


def _state(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def _same(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_prefix_is_named_and_changes_nothing(fault, model, saved):
    name, damage, message = FAULTS[fault]
    damage(saved / name)
    model_before = _state(model)
    with pytest.raises(bpp.PrefixError) as info:
        bpp.load_prefix(saved, model=model)
    text = str(info.value)
    assert message in text, text
    assert str(saved) in text and name in text, text
    assert _same(model_before, model) and bpp.attached(model) is None

    # The Trainer's resume path: the attached encoder is left exactly as it was.
    encoder = bpp.add_prefix_tuning(model, prefix_length={"encoder": 2, "cross": 3}, sites=("encoder", "cross"),
                                    hidden_size=4)
    encoder_before = _state(encoder)
    if fault in ("config missing", "weights missing"):
        assert restore_prefix(model, saved) is False  # no saved prefix there: nothing to restore
    else:
        with pytest.raises(bpp.PrefixError, match=str(saved)):
            restore_prefix(model, saved)
    assert _same(encoder_before, encoder)


def test_read_prefix_returns_validated_parts(model, saved):
    (saved / io.RUN_INFO).write_text(json.dumps({"model": "somewhere", "max_source_length": 12}))
    read = io.read_prefix(saved, model.config)
    assert read.config["sites"] == ["encoder", "cross"] and read.run_info["max_source_length"] == 12
    assert set(read.tensors) == set(bpp.load_prefix(saved).state_dict())


def test_not_a_directory(tmp_path):
    with pytest.raises(bpp.PrefixError, match="directory not found"):
        bpp.load_prefix(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(bpp.PrefixError, match="not a directory"):
        bpp.load_prefix(tmp_path / "file")


def test_other_model_dimensions_name_the_config(model, saved):
    other = tiny_model(seed=0, d_model=16)
    with pytest.raises(bpp.PrefixError, match=r"prefix_config.json: the prefix was saved for another model shape "
                                              r"\(d_model: model 16, prefix 32\)"):
        bpp.load_prefix(saved, model=other)


def test_restore_into_an_encoder_of_another_shape(model, saved):
    encoder = bpp.add_prefix_tuning(model, prefix_length=2, hidden_size=4)
    before = _state(encoder)
    with pytest.raises(bpp.PrefixError, match="does not fit the attached PrefixEncoder"):
        restore_prefix(model, saved)
    assert _same(before, encoder)
