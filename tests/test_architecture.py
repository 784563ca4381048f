"""The package's shape: layered imports, one registry, model knowledge as data, documented API.

The layer order is the one docs/how-it-works.md draws; a module may import
its own layer or lower ones, never a higher one, and the package's import
graph (imports inside functions included) has no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import bart_prefix_patch as bpp
from bart_prefix_patch import _architectures, _models, _registry

PACKAGE = Path(bpp.__file__).parent
ROOT = PACKAGE.parent

#: Layer of every module, bottom first (docs/how-it-works.md, "Layers").
LAYERS = {
    # 0: errors, version, shared names
    "errors": 0, "_version": 0, "_constants": 0,
    # 1: per-call state, the patch registry, the architecture table, fingerprint hashing
    "_state": 1, "_registry": 1, "_architectures": 1, "_fingerprint": 1, "_reference": 1,
    # 2: model knowledge (introspection over the table)
    "_models": 2,
    # 3: the Prefix type, the version gate, the forks
    "prefix": 3, "_compat": 3, "forks": 3, "forks._common": 3, "forks._decoding": 3, "forks._masks": 3,
    "forks.bart_v4_tuple": 3, "forks.bart_v4_cache": 3, "forks.bart_v5": 3,
    # 4: attach/detach, entry guards, apply/revert
    "_attach": 4, "_guards": 4, "_selfcheck": 4, "_verify": 4, "_patcher": 4,
    # 5: PrefixEncoder, the on-disk format, tuning
    "encoder": 5, "io": 5, "tuning": 5, "bank": 5,
    # 6: integrations, which register themselves with the patcher
    "_saving": 6, "trainer": 6, "_peft": 6,
    # 7: wiring, diagnostics, CLI
    "__init__": 7, "_doctor": 7, "_cli": 7, "_demo": 7, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    for name in (module, module.split(".")[0]):
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(module)


def _exists(module: str) -> bool:
    base = PACKAGE.joinpath(*module.split(".")) if module != "__init__" else PACKAGE / "__init__"
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Package modules imported anywhere in ``path`` (functions included), as LAYERS names."""
    here = _module_name(path)
    package_parts = here.split(".")[:-1] if path.name != "__init__.py" else here.split(".")
    if here == "__init__":
        package_parts = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)] if node.level > 1 else package_parts
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "bart_prefix_patch":
                target = ".".join(node.module.split(".")[1:])
            else:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if _exists(f"{target}.{n}".lstrip("."))]
            found.update(submodules or [target or "__init__"])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bart_prefix_patch":
                    found.add(".".join(alias.name.split(".")[1:]) or "__init__")
    found.discard(here)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if not any(n in LAYERS for n in (m, m.split(".")[0]))]
    assert not missing, f"add these modules to LAYERS (and to docs/how-it-works.md): {missing}"


def test_imports_point_down_only():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path, monkeypatch):
    """The two checks above can fail: a planted upward import is found."""
    fake = tmp_path / "bart_prefix_patch"
    fake.mkdir()
    (fake / "errors.py").write_text("from ._patcher import apply\n")
    (fake / "_patcher.py").write_text("def f():\n    from .errors import X\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = _graph()
    assert graph == {"errors": {"_patcher"}, "_patcher": {"errors"}}
    with pytest.raises(AssertionError, match="errors"):
        test_imports_point_down_only()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()


def test_no_architecture_is_named_outside_the_table():
    """Model knowledge is data: no modeling module is referenced outside the table (docstrings aside)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("_architectures.py", "_doctor.py", "_demo.py", "_selfcheck.py", "_reference.py"):
            continue  # the table itself; the self-checks build a tiny BART on purpose
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "modeling_" in node.value:
                if node.value.lstrip().startswith(("``", "Fork", "The ", "Upstream")) or "\n" in node.value:
                    continue  # a docstring or message describing upstream code
                offenders.append(f"{path.name}: {node.value!r}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
                if any(n.startswith("transformers.models") for n in names):
                    offenders.append(f"{path.name}: imports {names}")
    assert not offenders, offenders


def test_table_rows_resolve_on_this_release():
    """Every row names an importable module whose classes the guards and forks find."""
    for row in _architectures.ARCHITECTURES.values():
        module = _models.modeling_module(row)
        assert hasattr(module, row.pretrained_class) and hasattr(module, row.head_class)
        assert _models.attention_classes(row, module), row
        heads = _models.head_classes(row, module)
        assert getattr(module, row.head_class) in heads


def test_one_registry_holds_every_patch():
    owners = {patch.owner for patch in _registry.installed()}
    assert {"guards", "forks", "saving"} <= owners, owners
    for patch in _registry.installed():
        assert getattr(patch.target, patch.attr) is patch.installed or patch.target.__dict__.get(patch.attr) is patch.installed
        assert bpp.get_original(patch.target, patch.attr) is not patch.installed


def test_revert_undoes_everything_but_the_guards():
    before = {(p.owner, p.name) for p in _registry.installed()}
    bpp.revert()
    try:
        after = {(p.owner, p.name) for p in _registry.installed()}
        assert after == {entry for entry in before if entry[0] in ("guards", "saving")}, after
        for patch in _registry.installed():
            assert patch.permanent
    finally:
        bpp.apply()
    assert {(p.owner, p.name) for p in _registry.installed()} == before


def test_trainer_hooks_are_in_the_registry_and_reverted():
    pytest.importorskip("accelerate")
    from transformers import Trainer

    original = bpp.get_original(Trainer, "_load_from_checkpoint")
    assert Trainer.__dict__["_load_from_checkpoint"] is not original
    assert any(p.owner == "trainer" for p in _registry.installed())
    bpp.revert()
    try:
        assert Trainer.__dict__["_load_from_checkpoint"] is original
    finally:
        bpp.apply()
    assert Trainer.__dict__["_load_from_checkpoint"] is not original


def test_doctor_lists_patches_by_owner(capsys):
    from bart_prefix_patch._doctor import _print_patches

    _print_patches()
    out = capsys.readouterr().out
    assert re.search(r"^  forks \(\d+\): .*Attention\.forward", out, re.M), out
    assert re.search(r"^  guards \(\d+\): .*\.generate", out, re.M), out
    assert "PEFT integration:" in out


def test_every_public_name_is_documented():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in bpp.__all__ if name != "__version__" and f"`{name}" not in api]
    assert not missing, f"docs/api.md lacks: {missing}"
    assert "__version__" in api


def test_version_is_defined_once():
    definitions = [
        path.name for path in PACKAGE.rglob("*.py") if re.search(r"^__version__\s*=", path.read_text(), re.M)
    ]
    assert definitions == ["_version.py"], definitions
