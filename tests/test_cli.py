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
