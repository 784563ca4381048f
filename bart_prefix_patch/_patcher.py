"""Applying and reverting the patch, and the hooks integrations register on both.

``apply()`` installs, for every row of the architecture table, the entry
guards (once, permanently: see :mod:`._guards`) and, when the version gate
accepts the installed transformers, the attention forks of the gate's fork
family. Every replacement goes through the one registry
(:mod:`._registry`), which ``revert()`` empties of everything but the
guards. Integrations (saving next to ``save_pretrained``, the Trainer, PEFT)
live above this layer and are never imported here: they call
:func:`register_integration` when imported, and their hooks run after every
``apply()`` and ``revert()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from . import _compat, _registry, _state, _verify
from ._architectures import ARCHITECTURES
from ._guards import (
    carried,
    entry_forward,
    guard_targets,
    method_wrapper,
    model_input_targets,
    refusal_targets,
    traced_forward,
)
from ._models import head_classes, modeling_module
from .forks import _cache
from .errors import UnsupportedTransformersError

_GATE: Optional[_compat.GateResult] = None


@dataclass(frozen=True)
class Integration:
    """Hooks of one integration.

    Attributes:
        name: Its registry owner name.
        on_apply: ``on_apply(applied, options)`` after every :func:`apply`;
            ``applied`` is apply's result, ``options`` its keyword options
            (e.g. ``{"peft": None}``).
        on_revert: Called after every :func:`revert`.
    """

    name: str
    on_apply: Optional[Callable[[bool, dict], None]] = None
    on_revert: Optional[Callable[[], None]] = None


_INTEGRATIONS: dict[str, Integration] = {}


def register_integration(
    name: str,
    on_apply: Optional[Callable[[bool, dict], None]] = None,
    on_revert: Optional[Callable[[], None]] = None,
) -> None:
    """Register (or replace) an integration's hooks; if the patch is applied, run ``on_apply`` now."""
    with _registry.LOCK:
        _INTEGRATIONS[name] = Integration(name, on_apply, on_revert)
        if _registry.is_applied() and on_apply is not None:
            on_apply(True, {})


def apply(strict: bool = False, peft: Optional[bool] = None, unknown: Optional[str] = None) -> bool:
    """Patch transformers so the attention of every supported model honours prefixes.

    Args:
        strict: Raise instead of warning when the installed transformers is
            not a known release.
        peft: The PEFT prefix-tuning integration (docs/peft.md): True or False
            records the choice; None keeps the last one (initially on, unless
            the environment variable ``BART_PREFIX_PATCH_PEFT=0``). It is only
            active while the patch is applied.
        unknown: What to do with a release whose fingerprints are in no table
            entry: ``"refuse"`` (leave it unpatched, with a warning) or
            ``"verify"`` (pick the fork by feature detection and patch only
            if the behavioural self-check passes; a warning says which).
            None: the environment variable ``BART_PREFIX_PATCH_UNKNOWN``,
            else ``"refuse"``. Under ``"verify"`` a release where only BART's
            own code drifted is verified the same way.

    Returns:
        True when the patch is applied (also when it already was), False when
        the version gate refused the installed transformers (a warning says
        what was found and what is supported).

    Raises:
        UnsupportedTransformersError: With ``strict=True`` on a refused release.
        ValueError: ``unknown`` is neither ``"refuse"`` nor ``"verify"``.
    """
    _verify.resolve_mode(unknown)  # a bad value is refused before anything changes
    applied = _apply(strict, unknown)
    options = {"peft": peft}
    for integration in list(_INTEGRATIONS.values()):
        if integration.on_apply is not None:
            integration.on_apply(applied, options)
    return applied


def _present_rows() -> list:
    """The table rows whose modeling module this transformers release has."""
    rows = []
    for row in ARCHITECTURES.values():
        try:
            modeling_module(row)
        except ImportError:
            continue
        rows.append(row)
    return rows


def _install_guards() -> None:
    for row in _present_rows():
        for owner, attr, guard in guard_targets(head_classes(row, modeling_module(row))):
            traced = traced_forward if guard is entry_forward else None  # generate() itself runs eagerly
            _registry.install("guards", owner, attr, method_wrapper(guard, traced), permanent=True)
    for owner, attr, make in refusal_targets():
        _registry.install("guards", owner, attr, make, permanent=True)


def _apply(strict: bool, unknown: Optional[str] = None) -> bool:
    global _GATE
    with _registry.LOCK:
        _install_guards()
        if _registry.is_applied():
            return True
        _GATE = _compat.check(_registry.original_if_patched)
        if (not _GATE.ok and not _GATE.in_table) or _VERIFIABLE in _GATE.drifted:
            # Code the table does not know: refused, or verified by behaviour (_verify.py).
            _GATE = _verify.unknown_release(_GATE, unknown, _install_fork, revert, _registry.original_if_patched)
            if _GATE.accepted_by == "self-check":  # the self-check vouches for BART's own code too
                _GATE = replace(
                    _GATE,
                    models={**_GATE.models, _VERIFIABLE: None},
                    drifted={m: why for m, why in _GATE.drifted.items() if m != _VERIFIABLE},
                )
            elif _GATE.ok and _verify.resolve_mode(unknown) == "verify":
                # BART alone drifted and the self-check refused it (or could not run): say why.
                warnings.warn(_GATE.message, RuntimeWarning, stacklevel=3)
        if not _GATE.ok:
            _registry.set_status(False, _GATE.message)
            if strict:
                raise UnsupportedTransformersError(_GATE.message)
            warnings.warn(_GATE.message, RuntimeWarning, stacklevel=3)
            return False
        if strict and _GATE.selfcheck is not None and not _GATE.selfcheck.passed:
            raise UnsupportedTransformersError(_GATE.message)
        if strict and _GATE.drifted:
            raise UnsupportedTransformersError(
                "; ".join(f"bart_prefix_patch: {model} is not patched: {why}" for model, why in _GATE.drifted.items())
            )
        if _GATE.accepted_by == "self-check":
            warnings.warn(_GATE.message, RuntimeWarning, stacklevel=3)
        _install_fork(_GATE.fork, _GATE.models)
        for model, why in _GATE.drifted.items():  # drifted code, not merely absent from this release
            warnings.warn(f"bart_prefix_patch: {model} is not patched (the other models are): {why}", RuntimeWarning, stacklevel=3)
        return True


#: The model the self-check exercises: the only one whose drifted code ``unknown="verify"`` can vouch for.
_VERIFIABLE = "bart"


def _install_fork(fork: Any, models: Optional[dict] = None) -> None:
    """Install ``fork`` for every present model not refused in ``models`` and mark the patch applied.

    Args:
        models: Model type -> None (patch it) or why not; None patches only the
            self-check's model (what a verification run exercises).
    """
    refused = {m: why for m, why in (models or {}).items() if why} if models is not None else None
    for owner, attr, wrapper in _cache.patches():  # model-independent: beam search's cache reordering
        _registry.install("forks", owner, attr, method_wrapper(wrapper))
    traceable: set = set()
    for row in _present_rows():
        wanted = row.model_type == _VERIFIABLE if refused is None else row.model_type not in refused
        if wanted:
            module = modeling_module(row)
            for owner, attr, wrapper in fork.patches(module, row.prefix):
                # The attention wrapper also serves traced calls: it takes the state from its keyword.
                _registry.install("forks", owner, attr, method_wrapper(wrapper, carried(wrapper)))
            if getattr(fork, "traceable", None) is not None and fork.traceable(module, row.prefix):
                traceable |= set(head_classes(row, module))
    for owner, attr, wrapper in model_input_targets(traceable):  # the state travels with each step's inputs
        _registry.install("forks", owner, attr, method_wrapper(wrapper))
    _state.set_traceable(frozenset(traceable))
    _registry.set_status(True, models=refused if refused is not None else {
        row.model_type: "not verified (the self-check runs BART)" for row in _present_rows() if row.model_type != _VERIFIABLE
    })


def revert() -> None:
    """Undo :func:`apply`: every patch but the entry guards is removed.

    The exact original objects come back. An attribute that somebody else
    replaced after us is left alone (their object is not ours to remove).
    The entry guards stay and keep refusing prefixes while the patch is not
    applied.
    """
    with _registry.LOCK:
        _registry.count_revert()  # before and after: see _guards.run_whole
        _registry.uninstall()
        _registry.set_status(False)
        _state.set_traceable(frozenset())
        _registry.count_revert()
        for integration in list(_INTEGRATIONS.values()):
            if integration.on_revert is not None:
                integration.on_revert()


def is_applied() -> bool:
    """Whether the patch is currently applied."""
    return _registry.is_applied()


def gate() -> Optional[_compat.GateResult]:
    """The last version-gate result (None before the first :func:`apply`)."""
    return _GATE


def get_original(owner: type, attr: str) -> Any:
    """The upstream object behind any attribute this package patched or guarded."""
    return _registry.get_original(owner, attr)


def integrations() -> list[str]:
    """Names of the registered integrations."""
    return list(_INTEGRATIONS)
