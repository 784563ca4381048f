"""``generate --prefix NAME=DIR ...``: rows of several tasks batched together, each equal to its task alone."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _config, _no_traceback, _write_jsonl, build_tiny_bart

import bart_prefix_patch as bpp
from bart_prefix_patch.__main__ import main


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model_dir = build_tiny_bart(root / "model")
    folders = {}
    torch.manual_seed(1)
    for name, length in (("sum", 2), ("qa", 5), ("tr", 3)):
        encoder = bpp.PrefixEncoder(_config(model_dir), prefix_length=length, hidden_size=None)
        with torch.no_grad():
            for site in encoder.prefixes.values():
                site.flat.normal_(0, 3.0)  # strong enough to change the outputs
        folders[name] = bpp.save_prefix(encoder, root / name)
        (folders[name] / "prefix_training.json").write_text(json.dumps({"model": str(model_dir), "source_field": "src"}))
    return model_dir, folders


def _prefix_args(folders, names=None):
    args = []
    for name in names or folders:
        args += ["--prefix", f"{name}={folders[name]}"]
    return args


def test_mixed_batch_equals_each_task_alone(tasks, tmp_path):
    model_dir, folders = tasks
    rows = [
        {"src": "w1 w2 w3", "task": "qa", "id": 0},
        {"src": "w4", "task": "sum", "id": 1},
        {"src": "w5 w6", "id": 2},  # no task: the first --prefix (sum)
        {"src": "w7 w8 w9 w1", "task": None, "id": 3},  # null: no prefix
        {"src": "w2 w2", "task": "tr", "id": 4},
    ]
    inputs = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["generate", *_prefix_args(folders), "--input", str(inputs), "--output", str(out),
                 "--num-beams", "2", "--max-new-tokens", "5", "--batch-size", "4"]) == 0
    mixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in mixed] == [0, 1, 2, 3, 4]
    assert [r.get("task", "absent") for r in mixed] == ["qa", "sum", "absent", None, "tr"]
    alone = {}
    for name in folders:
        single = tmp_path / f"{name}.jsonl"
        _write_jsonl(single, [{"src": r["src"]} for r in rows])
        target = tmp_path / f"{name}.out.jsonl"
        assert main(["generate", "--prefix", str(folders[name]), "--input", str(single), "--output", str(target),
                     "--num-beams", "2", "--max-new-tokens", "5", "--batch-size", "1"]) == 0
        alone[name] = [json.loads(line)["prediction"] for line in target.read_text().splitlines()]
    expected = [alone["qa"][0], alone["sum"][1], alone["sum"][2], None, alone["tr"][4]]
    for row, want in zip(mixed, expected):
        if want is not None:
            assert row["prediction"] == want, row
    assert len({tuple(alone[name]) for name in folders}) > 1, ("the prefixes must change the output", alone)


def test_bad_task_name_is_one_line_exit_2(tasks, tmp_path, capsys):
    _, folders = tasks
    inputs = _write_jsonl(tmp_path / "in.jsonl", [{"src": "w1", "task": "sum"}, {"src": "w2", "task": "poem"}])
    err = _no_traceback(["generate", *_prefix_args(folders), "--input", str(inputs)], capsys)
    assert "example 2: task 'poem' is not a --prefix name (expected one of sum, qa, tr" in err
    inputs = _write_jsonl(tmp_path / "in2.jsonl", [{"src": "w1", "task": 3}])
    assert "task 3 is not a --prefix name" in _no_traceback(["generate", *_prefix_args(folders), "--input", str(inputs)], capsys)


def test_prefix_argument_errors(tasks, tmp_path, capsys):
    _, folders = tasks
    twice = ["--prefix", f"sum={folders['sum']}", "--prefix", f"sum={folders['qa']}"]
    assert "name 'sum' given twice" in _no_traceback(["generate", *twice, "--text", "w1"], capsys)
    mixed = ["--prefix", str(folders["sum"]), "--prefix", f"qa={folders['qa']}"]
    assert "name every prefix" in _no_traceback(["generate", *mixed, "--text", "w1"], capsys)
    missing = ["--prefix", f"sum={tmp_path / 'nope'}"]
    assert f"--prefix sum={tmp_path / 'nope'}: " in _no_traceback(["generate", *missing, "--text", "w1"], capsys)
