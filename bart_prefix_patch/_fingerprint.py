"""Normalised source fingerprints of upstream transformers functions.

The fork of a function is only correct for the upstream code it was written
against. A fingerprint is a hash of that code's AST with docstrings removed
(comments and formatting never reach the AST), so cosmetic edits upstream do
not matter but any change to the logic does. The same function hashes the
source of an installed release (at import) and of a downloaded wheel (in
``tools/gen_fingerprints.py``), which is what makes the two comparable.

Standard library only: ``tools/gen_fingerprints.py`` loads this file by path.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

_MISSING = "missing"


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


def _find(tree: ast.AST, qualname: str) -> ast.AST | None:
    node = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        matches = [
            n
            for n in body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part
        ]
        if not matches:
            return None
        node = matches[-1]  # a later definition wins, as at runtime
    return node


def _digest(node: ast.AST) -> str:
    node = _StripDocstrings().visit(node)
    # Decorators are part of behaviour (deprecate_kwarg renames, no_grad), so
    # they stay in; line numbers and the like do not.
    dumped = ast.dump(node, annotate_fields=True, include_attributes=False)
    return hashlib.sha256(dumped.encode()).hexdigest()[:16]


def fingerprint_source(source: str, qualname: str) -> str:
    """Hash one function of a module's source text.

    Args:
        source: The full text of the module.
        qualname: ``"Class.method"`` or ``"function"``.

    Returns:
        A 16-hex-digit hash of the normalised AST, or ``"missing"`` when the
        module defines no such function.
    """
    node = _find(ast.parse(source), qualname)
    if node is None:
        return _MISSING
    return _digest(node)


#: id(code object) -> (that code object, its fingerprint): an ``apply()`` after ``revert()`` hashes the
#: same restored upstream functions again, and parsing their source is most of its time.
_BY_CODE: dict[int, tuple[Any, str]] = {}


def fingerprint_object(obj: Any) -> str:
    """Hash a live function the same way :func:`fingerprint_source` hashes text.

    The live object is what actually runs, so a function replaced at runtime
    (another monkey-patch) is noticed even though the file on disk is intact.
    Wrappers that keep ``__wrapped__`` (functools.wraps, wrapt) are unwrapped
    to the function they decorate, whose source includes its decorators.
    A function whose code object was hashed before gets that hash again.
    """
    function = inspect.unwrap(obj)
    code = getattr(function, "__code__", None)
    known = _BY_CODE.get(id(code)) if code is not None else None
    if known is not None and known[0] is code:
        return known[1]
    digest = _fingerprint_function(function)
    if code is not None:
        _BY_CODE[id(code)] = (code, digest)
    return digest


def _fingerprint_function(function: Any) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return _MISSING
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return _MISSING
    return _digest(tree.body[0])


def module_source(module_name: str) -> str | None:
    """Read an installed module's source without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text(encoding="utf-8")


def resolve(module_name: str, qualname: str) -> Optional[Any]:
    """The live object ``module:qualname`` (read from class ``__dict__``s), or None."""
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", {})
        if part in namespace:
            obj = namespace[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            return None
    return obj


def installed_fingerprints(
    targets: dict[str, tuple[str, ...]], original: Optional[Callable[[str, str], Any]] = None
) -> dict[str, str]:
    """Fingerprints of the ``targets`` functions as they run now.

    Args:
        targets: Module -> qualified names (``_architectures.fingerprinted()``).
        original: Optional ``(module, qualname) -> object`` lookup that returns
            the saved original where this package has wrapped the attribute, so
            that the gate hashes upstream code and never its own wrappers.
    """
    result = {}
    for module_name, names in targets.items():
        for name in names:
            obj = original(module_name, name) if original else None
            if obj is None:
                obj = resolve(module_name, name)
            result[f"{module_name}:{name}"] = _MISSING if obj is None else fingerprint_object(obj)
    return result
