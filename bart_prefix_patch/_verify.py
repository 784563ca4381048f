"""Releases the fingerprint table does not know: refuse, or verify by behaviour.

``apply(unknown=...)`` or the environment variable ``BART_PREFIX_PATCH_UNKNOWN``
(the argument wins) choose the policy:

* ``"refuse"`` (default): leave transformers unpatched, with a warning;
* ``"verify"``: choose the fork by feature detection
  (:func:`._compat.detect_fork`), run the behavioural self-check
  (:mod:`._selfcheck`) with the fork installed, and keep the patch only if
  every check passes.

Either way a ``RuntimeWarning`` names the version, the differing functions
and the outcome. The self-check runs once per process for a given set of
installed fingerprints: a later ``apply()`` (after ``revert()``) reuses its
result.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional

from . import _compat

MODES = ("refuse", "verify")

#: Installed fingerprints -> (family, fork, self-check result), once per process.
_RESULTS: dict[tuple, tuple[Optional[str], Any, Any]] = {}


def resolve_mode(unknown: Optional[str]) -> str:
    """The policy: ``unknown`` if given, else the environment variable, else ``"refuse"``.

    Raises:
        ValueError: ``unknown`` is not one of :data:`MODES`.
    """
    if unknown is not None:
        if unknown not in MODES:
            raise ValueError(f"unknown= must be one of {MODES}, got {unknown!r}")
        return unknown
    value = os.environ.get(_compat.UNKNOWN_ENV, "").strip().lower()
    if not value:
        return "refuse"
    if value not in MODES:
        warnings.warn(
            f"bart_prefix_patch: {_compat.UNKNOWN_ENV}={value!r} is not one of {MODES}; using 'refuse'",
            RuntimeWarning,
            stacklevel=4,
        )
        return "refuse"
    return value


def unknown_release(
    gate: _compat.GateResult,
    unknown: Optional[str],
    install: Callable[[Any], None],
    uninstall: Callable[[], None],
    original: Optional[Callable[[str, str], Any]] = None,
) -> _compat.GateResult:
    """Decide about a release whose fingerprints are in no table entry.

    Args:
        gate: The table's refusal (:func:`._compat.check` with ``in_table`` False).
        unknown: ``"refuse"``, ``"verify"`` or None (the environment variable decides).
        install: ``install(fork)`` installs the fork's patches and marks the patch applied.
        uninstall: Removes them again (``revert``).
        original: Lookup of saved originals, for feature detection.

    Returns:
        The gate result: ``accepted_by="self-check"`` with the fork installed,
        or a refusal whose message says why (the fork then is not installed).
    """
    if resolve_mode(unknown) == "refuse":
        return gate
    differing = ", ".join(gate.mismatched) or "none"
    key = tuple(sorted(gate.fingerprints.items()))
    if key in _RESULTS:
        family, fork, result = _RESULTS[key]
        if fork is not None and result.passed:
            install(fork)
    else:
        family, fork, how = _compat.detect_fork(original)
        if fork is None:
            result = None
            _RESULTS[key] = (None, None, how)
        else:
            from . import _selfcheck

            result = _selfcheck.run_selfcheck(lambda: install(fork), uninstall)
            _RESULTS[key] = (family, fork, result)
    if fork is None:
        how = _RESULTS[key][2]
        return replace(gate, message=(
            f"bart_prefix_patch: transformers {gate.version} is not patched: its code does not match any release in "
            f"the fingerprint table (differing functions: {differing}) and {how}, so the self-check "
            f"({_compat.UNKNOWN_ENV}=verify) cannot run. Supported: {_compat.SUPPORTED_RANGE}; see "
            "docs/adding-a-transformers-version.md."
        ))
    if not result.passed:
        return replace(gate, family=family, selfcheck=result, message=(
            f"bart_prefix_patch: transformers {gate.version} is not patched: its code does not match any release in "
            f"the fingerprint table (differing functions: {differing}), and the behavioural self-check "
            f"({_compat.UNKNOWN_ENV}=verify, fork {fork.__name__}, family {family} by feature detection) failed: "
            f"{result.summary()}. Supported: {_compat.SUPPORTED_RANGE}; see docs/adding-a-transformers-version.md."
        ))
    return replace(gate, family=family, fork=fork, accepted_by="self-check", selfcheck=result, message=(
        f"bart_prefix_patch: transformers {gate.version} is not in the fingerprint table (differing functions: "
        f"{differing}); patched with fork {fork.__name__} (family {family} by feature detection), verified by the "
        f"self-check ({result.summary()}). Add the release to the table: "
        f"python tools/gen_fingerprints.py --add {gate.version}"
    ))
