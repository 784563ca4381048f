"""``python -m bart_prefix_patch``: doctor, demo --quick, train + generate, error messages.

The commands run in-process through ``main(argv)`` (a new interpreter costs ~10 s of imports here);
one test runs the module as ``__main__``, as ``python -m`` does.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

import bart_prefix_patch as bpp
from bart_prefix_patch.__main__ import main

WORDS = [f"w{i}" for i in range(12)] + ["ok"]


# --------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))


def build_tiny_bart(directory: Path) -> Path:
    """A tiny BART and a word-level tokenizer, both built in code and saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],  # as BART's tokenizers (no token_type_ids)
    )
    tokenizer.save_pretrained(directory)
    config = BartConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _pairs(count, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in torch.randint(0, 12, (int(torch.randint(2, 5, (1,), generator=generator)),), generator=generator)]
        rows.append({"src": " ".join(words), "tgt": f"ok {words[0]}", "id": len(rows)})
    return rows


# ------------------------------------------------------------------ doctor


def test_doctor_exits_0(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "self-check: all passed" in out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("doctor", "demo", "train", "generate"):
        assert command in out


def test_module_entry_point_exit_code(tmp_path, monkeypatch, capsys):
    """``python -m bart_prefix_patch`` (run as __main__): a user error is exit code 2 and one line."""
    missing = tmp_path / "missing.jsonl"
    argv = ["bart_prefix_patch", "train", "--model", str(tmp_path), "--train", str(missing), "--output", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "bart_prefix_patch.__main__")  # runpy executes a fresh copy
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bart_prefix_patch", run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m bart_prefix_patch train: error: --train {missing}: file not found"
    ]


# -------------------------------------------------------------------- demo


def test_demo_quick(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"exact match ([\d.]+)% -> ([\d.]+)%", out).groups())
    assert after > before, out
    assert after - before >= 50, out  # clearly learned, not a lucky trajectory (seeds 0-9 here: 77 to 100 points)
    assert "summary" in out and "loss curve" in out and "generate() examples" in out
    if "skipped:" not in out:  # transformers releases whose BART takes a cache object
        assert "input-independent" in out, out
        stock = re.search(r"prefix-tuned, stock transformers \(cache\)\s+([\d.]+)%\s+(\d+)", out)
        assert stock and int(stock.group(2)) == 1, out
    assert bpp.is_applied()


# ------------------------------------------------------- train + generate


def test_train_then_generate_round_trip(model_dir, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(24, seed=1))
    dev = _write_jsonl(tmp_path / "dev.jsonl", _pairs(6, seed=2))
    out = tmp_path / "prefix"
    code = main([
        "train", "--model", str(model_dir), "--train", str(train), "--eval", str(dev), "--source-field", "src",
        "--target-field", "tgt", "--output", str(out), "--prefix-length", "4", "--hidden-size", "32",
        "--epochs", "3", "--batch-size", "8", "--lr", "2e-2", "--eval-every", "4", "--max-new-tokens", "6",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (out / "prefix_config.json").is_file() and (out / "prefix_model.safetensors").is_file()
    info = json.loads((out / "prefix_training.json").read_text())
    losses = [h["loss"] for h in info["loss_history"]]
    assert len(losses) == 9 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert [e["step"] for e in info["evaluations"]] == [0, 4, 8, 9]
    assert "eval @ step 4" in printed and "prefix saved to" in printed

    # generate: --input JSONL (records kept, prediction added), model folder taken from the run info.
    inputs = _write_jsonl(tmp_path / "new.jsonl", [{"src": "w1 w2", "id": 1}, {"src": "w7 w3 w3", "id": 2}])
    predictions = tmp_path / "predictions.jsonl"
    assert main(["generate", "--prefix", str(out), "--input", str(inputs), "--output", str(predictions),
                 "--num-beams", "2", "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all("prediction" in r for r in rows)

    # The same predictions in Python: base model + loaded prefix + stock generate().
    from transformers import AutoTokenizer, BartForConditionalGeneration

    model = BartForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bpp.attach(model, bpp.load_prefix(out, model=model))
    for row in rows:
        batch = tokenizer([row["src"]], return_tensors="pt")
        tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=6)
        assert row["prediction"] == " ".join(tokenizer.batch_decode(tokens, skip_special_tokens=True)[0].split())

    # generate: --text, printed one per line.
    assert main(["generate", "--prefix", str(out), "--model", str(model_dir), "--text", "w1 w2", "--text", "w7 w3 w3",
                 "--num-beams", "2", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines() == [r["prediction"] for r in rows]


@pytest.mark.parametrize("model_type", ["marian", "m2m_100"])
def test_train_and_generate_accept_a_relative(model_type, tmp_path, capsys):
    """`train` / `generate` take any supported model type (here a tiny relative with BART's word tokenizer)."""
    import transformers

    bart_dir = build_tiny_bart(tmp_path / "bart")
    config = transformers.BartConfig.from_pretrained(bart_dir).to_dict()
    dims = {k: config[k] for k in ("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                                   "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                                   "decoder_ffn_dim", "max_position_embeddings", "pad_token_id", "bos_token_id",
                                   "eos_token_id", "decoder_start_token_id")}
    classes = {"marian": ("MarianConfig", "MarianMTModel"), "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration")}
    config_class, model_class = (getattr(transformers, name) for name in classes[model_type])
    directory = tmp_path / model_type
    transformers.AutoTokenizer.from_pretrained(bart_dir).save_pretrained(directory)
    torch.manual_seed(0)
    model_class(config_class(**dims, dropout=0.0, attention_dropout=0.0)).save_pretrained(directory)
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(8, seed=1))
    out = tmp_path / "prefix"
    assert main(["train", "--model", str(directory), "--train", str(train), "--output", str(out), "--epochs", "1",
                 "--prefix-length", "2", "--hidden-size", "0", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--prefix", str(out), "--text", "w1 w2", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 1


# ------------------------------------------------------------------ errors


def _error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


TRAIN_CASES = {
    "missing file": (None, "train.jsonl: file not found"),
    "bad json": (['{"src": "w1", "tgt": "ok"}', '{"src": "w1", "tgt": }'], "train.jsonl:2: invalid JSON"),
    "missing field": (['{"src": "w1", "tgt": "ok"}', "", '{"src": "w2"}'], "train.jsonl:3: missing field 'tgt'"),
    "not a string": (['{"src": 5, "tgt": "ok"}'], "train.jsonl:1: field 'src' must be a string, got int"),
    "not an object": (['["w1", "ok"]'], "train.jsonl:1: expected a JSON object, got list"),
    "empty": ([], "train.jsonl: no examples"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_data_errors(case, model_dir, tmp_path, capsys):
    lines, message = TRAIN_CASES[case]
    train = tmp_path / "train.jsonl"
    if lines is not None:
        _write_jsonl(train, lines)
    err = _error(["train", "--model", str(model_dir), "--train", str(train), "--output", str(tmp_path / "o")], capsys)
    assert message in err and str(train) in err


def test_eval_file_errors_name_the_eval_file(model_dir, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(2, seed=1))
    dev = _write_jsonl(tmp_path / "dev.jsonl", ['{"source": "w1", "tgt": "ok"}'])
    err = _error(["train", "--model", str(model_dir), "--train", str(train), "--eval", str(dev),
                  "--output", str(tmp_path / "o")], capsys)
    assert f"{dev}:1: missing field 'src'" in err and "'source'" in err


def test_model_folder_errors(model_dir, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(2, seed=1))
    common = ["--train", str(train), "--output", str(tmp_path / "o")]
    assert "directory not found" in _error(["train", "--model", str(tmp_path / "nope"), *common], capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(["train", "--model", str(tmp_path / "empty"), *common], capsys)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((model_dir / "config.json").read_text())
    assert "no model weights" in _error(["train", "--model", str(partial), *common], capsys)
    (partial / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert "no tokenizer" in _error(["train", "--model", str(partial), *common], capsys)
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert "model_type 't5' is not supported" in _error(["train", "--model", str(other), *common], capsys)
    err = _error(["train", "--model", str(model_dir), *common, "--sites", "encoder,bogus"], capsys)
    assert "--sites encoder,bogus" in err


def test_generate_errors(model_dir, tmp_path, capsys):
    assert "directory not found" in _error(["generate", "--prefix", str(tmp_path / "nope"), "--text", "w1"], capsys)
    (tmp_path / "p").mkdir()
    err = _error(["generate", "--prefix", str(tmp_path / "p"), "--text", "w1"], capsys)
    assert "no prefix_config.json" in err
    bpp.save_prefix(bpp.PrefixEncoder(_config(model_dir), prefix_length=2, hidden_size=None), tmp_path / "p")
    assert "--model is required" in _error(["generate", "--prefix", str(tmp_path / "p"), "--text", "w1"], capsys)
    bad = _write_jsonl(tmp_path / "in.jsonl", ['{"text": "w1"}'])
    err = _error(["generate", "--prefix", str(tmp_path / "p"), "--model", str(model_dir), "--input", str(bad)], capsys)
    assert f"{bad}:1: missing field 'src'" in err
    err = _error(["generate", "--prefix", str(tmp_path / "p"), "--model", str(model_dir)], capsys)
    assert "--input" in err and "--text" in err


def test_missing_required_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train", "x.jsonl"])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err


def _config(model_dir):
    from transformers import BartConfig

    return BartConfig.from_pretrained(model_dir)


# ------------------------------------------- bad arguments: one line, exit code 2


def _no_traceback(argv, capsys) -> str:
    """Exit code 2 and exactly one stderr line, with no traceback (main() returns or argparse exits)."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def saved_prefix(model_dir, tmp_path):
    """A valid prefix folder (with run info pointing at the tiny model), and an input file."""
    directory = tmp_path / "prefix"
    bpp.save_prefix(bpp.PrefixEncoder(_config(model_dir), prefix_length=2, hidden_size=4), directory)
    (directory / "prefix_training.json").write_text(json.dumps({"model": str(model_dir), "source_field": "src"}))
    return directory


GENERATE_ARGUMENTS = {
    "--num-beams 0": (["--num-beams", "0"], "--num-beams 0: expected a positive integer"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    "--max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens 0: expected a positive integer"),
    "--max-source-length -3": (["--max-source-length", "-3"], "--max-source-length -3: expected a positive integer"),
    "--num-beams x": (["--num-beams", "x"], "invalid int value: 'x'"),
    "--device banana": (["--device", "banana"], "--device banana: not a torch device"),
}


@pytest.mark.parametrize("case", list(GENERATE_ARGUMENTS))
def test_generate_bad_arguments(case, saved_prefix, capsys):
    extra, message = GENERATE_ARGUMENTS[case]
    err = _no_traceback(["generate", "--prefix", str(saved_prefix), "--text", "w1", *extra], capsys)
    assert message in err


def test_generate_output_in_a_missing_directory(saved_prefix, tmp_path, capsys):
    target = tmp_path / "missing" / "out.jsonl"
    err = _no_traceback(["generate", "--prefix", str(saved_prefix), "--text", "w1", "--output", str(target)], capsys)
    assert f"--output {target}: directory {target.parent} not found" in err
    err = _no_traceback(["generate", "--prefix", str(saved_prefix), "--text", "w1", "--output", str(tmp_path)], capsys)
    assert "is a directory" in err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _pickle(path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, path)


PREFIX_FAULTS = {
    "weights truncated": ("prefix_model.safetensors", _truncate, "truncated"),
    "weights empty": ("prefix_model.safetensors", lambda p: p.write_bytes(b""), "truncated"),
    "weights a pickle": ("prefix_model.safetensors", _pickle, "a pickle (torch.save) file, not safetensors"),
    "weights garbage": ("prefix_model.safetensors", lambda p: p.write_bytes(b"\x10" + b"\0" * 7 + b"not json!" * 2),
                        "not a valid safetensors file"),
    "config bad JSON": ("prefix_config.json", lambda p: p.write_text('{"format": 1,'), "invalid JSON"),
    "config not UTF-8": ("prefix_config.json", lambda p: p.write_bytes(b'{"format": "\xff"}'), "not UTF-8"),
    "config a list": ("prefix_config.json", lambda p: p.write_text("[1]"), "expected a JSON object, got list"),
    "config disagrees with weights": (
        "prefix_config.json",
        lambda p: p.write_text(p.read_text().replace('"hidden_size": 4', '"hidden_size": 5')),
        "config and weights disagree: prefixes.encoder.mlp.0.weight has shape (4, 32), prefix_config.json implies (5",
        "prefix_model.safetensors",  # the message names the weights file and the config it disagrees with
    ),
    "run info bad JSON": ("prefix_training.json", lambda p: p.write_text("{"), "invalid JSON"),
    "run info wrong type": ("prefix_training.json", lambda p: p.write_text('{"model": 3}'), "field 'model' must be str"),
}


@pytest.mark.parametrize("fault", list(PREFIX_FAULTS))
def test_generate_damaged_prefix_folder(fault, saved_prefix, capsys):
    name, damage, message, *named = PREFIX_FAULTS[fault]
    damage(saved_prefix / name)
    err = _no_traceback(["generate", "--prefix", str(saved_prefix), "--text", "w1"], capsys)
    assert message in err and str(saved_prefix / (named[0] if named else name)) in err, err


def test_generate_prefix_of_another_model(saved_prefix, model_dir, tmp_path, capsys):
    config = _config(model_dir)
    config.decoder_layers = 1
    bpp.save_prefix(bpp.PrefixEncoder(config, prefix_length=2, hidden_size=None), saved_prefix)
    err = _no_traceback(["generate", "--prefix", str(saved_prefix), "--text", "w1"], capsys)
    assert "decoder_layers: model 2, prefix 1" in err and "prefix_config.json" in err


TRAIN_ARGUMENTS = {
    "--lr -1": (["--lr", "-1"], "--lr -1.0: expected a positive learning rate"),
    "--lr nan": (["--lr", "nan"], "--lr nan: expected a positive learning rate"),
    "--dropout 2": (["--dropout", "2"], "--dropout 2.0: expected a probability in [0, 1)"),
    "--hidden-size -1": (["--hidden-size", "-1"], "--hidden-size -1: expected 0 or a positive integer"),
    "--num-beams 0": (["--num-beams", "0"], "--num-beams 0: expected a positive integer"),
    "--device banana": (["--device", "banana"], "--device banana: not a torch device"),
    "--device meta": (["--device", "meta"], "--device meta: the meta device holds no data"),
}


@pytest.mark.parametrize("case", list(TRAIN_ARGUMENTS))
def test_train_bad_arguments(case, model_dir, tmp_path, capsys):
    extra, message = TRAIN_ARGUMENTS[case]
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(2, seed=1))
    err = _no_traceback(
        ["train", "--model", str(model_dir), "--train", str(train), "--output", str(tmp_path / "o"), *extra], capsys
    )
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_cuda(model_dir, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(2, seed=1))
    err = _no_traceback(
        ["train", "--model", str(model_dir), "--train", str(train), "--output", str(tmp_path / "o"), "--device", "cuda"],
        capsys,
    )
    assert "--device cuda: not usable here" in err and "--device cpu" in err


def test_train_file_not_utf8(model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"src": "w1", "tgt": "ok"}\n{"src": "caf\xe9", "tgt": "ok"}\n')
    err = _no_traceback(["train", "--model", str(model_dir), "--train", str(train), "--output", str(tmp_path / "o")],
                        capsys)
    assert f"{train}:2: not UTF-8 text (byte 0xe9" in err


def test_train_file_with_byte_order_mark_is_read(tmp_path):
    from bart_prefix_patch._cli import read_jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"src": "w1", "tgt": "ok"}\n'.encode("utf-8"))
    assert read_jsonl(str(path), ("src", "tgt"), "--train") == [{"src": "w1", "tgt": "ok"}]


def test_argparse_errors_are_one_line(capsys):
    err = _no_traceback(["generate", "--prefix", "p", "--num-beams", "two"], capsys)
    assert "--num-beams" in err and "(see --help)" in err


@pytest.mark.parametrize("command", ["demo", "train", "generate"])
def test_help_shows_every_default(command, capsys):
    import argparse

    from bart_prefix_patch._cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if not action.option_strings or action.required or action.nargs == 0:
            continue
        help_text = " ".join(sub._get_formatter()._expand_help(action).split())
        assert "default" in help_text, (action.option_strings, help_text)
        assert help_text in text
        if action.default is not None:
            assert str(action.default) in help_text or "default:" in help_text
