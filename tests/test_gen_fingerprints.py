"""``tools/gen_fingerprints.py --add``: one release into the table, family assigned or proposed.

Offline: the "wheel" is built from the installed transformers' own files, with
one function altered where a case needs it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import pytest

import bart_prefix_patch as bpp
from bart_prefix_patch import _architectures, _compat, _fingerprint

ROOT = Path(__file__).resolve().parents[1]
BART = "transformers.models.bart.modeling_bart"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("gen_fingerprints", ROOT / "tools" / "gen_fingerprints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _altered(source: str, qualname: str) -> str:
    tree = ast.parse(source)
    node = _fingerprint._find(tree, qualname)
    node.body.insert(0, ast.parse("_changed = 1").body[0])
    return ast.unparse(ast.fix_missing_locations(tree))


def _wheel(tmp_path: Path, alter: tuple[str, str] | None = None) -> Path:
    path = tmp_path / "transformers-9.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for module in _architectures.fingerprinted():
            source = _fingerprint.module_source(module)
            if source is None:
                continue
            if alter and alter[0] == module:
                source = _altered(source, alter[1])
            wheel.writestr(module.replace(".", "/") + ".py", source)
    return path


@pytest.fixture
def table(tmp_path):
    if not bpp.gate().in_table:
        pytest.skip("the installed transformers is not in the table")
    path = tmp_path / "table.json"
    shutil.copy(_compat.TABLE_PATH, path)
    return path


def _add(tool, monkeypatch, tmp_path, table, alter=None, family=None):
    wheel = _wheel(tmp_path, alter)
    monkeypatch.setattr(tool, "fetch_wheel", lambda version, cache: wheel)
    return tool.add_release("9.9.0", table, tmp_path, family)


def test_identical_release_joins_its_set(tool, monkeypatch, tmp_path, table):
    assert _add(tool, monkeypatch, tmp_path, table) == 0
    data = json.loads(table.read_text())
    gate = bpp.gate()
    assert data["releases"]["9.9.0"] == data["releases"][gate.release]
    assert list(data["releases"])[-1] == "9.9.0"  # version order


def test_helper_change_keeps_the_family_of_identical_bart_code(tool, monkeypatch, tmp_path, table):
    models = {row.module for row in _architectures.ARCHITECTURES.values()}
    helper = next(key for key, value in bpp.gate().fingerprints.items()
                  if key.split(":")[0] not in models and value != "missing")
    module, qualname = helper.split(":")
    assert _add(tool, monkeypatch, tmp_path, table, alter=(module, qualname)) == 0
    data = json.loads(table.read_text())
    new = data["sets"][data["releases"]["9.9.0"]]
    assert new["family"] == bpp.gate().family
    assert new["fingerprints"][helper] != bpp.gate().fingerprints[helper]


def test_bart_change_is_only_proposed_until_confirmed(tool, monkeypatch, tmp_path, table, capsys):
    before = table.read_text()
    assert _add(tool, monkeypatch, tmp_path, table, alter=(BART, "BartAttention.forward")) == 2
    assert "PROPOSED family" in capsys.readouterr().out
    assert table.read_text() == before
    family = bpp.gate().family
    assert _add(tool, monkeypatch, tmp_path, table, alter=(BART, "BartAttention.forward"), family=family) == 0
    data = json.loads(table.read_text())
    assert data["sets"][data["releases"]["9.9.0"]]["family"] == family
