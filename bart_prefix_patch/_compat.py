"""Version gate: which fork family (if any) fits the installed transformers.

The gate trusts code, not version strings: it fingerprints every upstream
function the forks replace or rely on (:mod:`._fingerprint`) and looks the
result up in ``_fingerprint_table.json``, generated from every release's
wheel by ``tools/gen_fingerprints.py``. Only an exact match of a known
release's fingerprints, in a family that has a fork, is patched ("table").

A release whose fingerprints are in no table entry is refused by default. With
``apply(unknown="verify")`` (or ``BART_PREFIX_PATCH_UNKNOWN=verify``) its fork
is chosen by feature detection (:func:`detect_fork`) and the release is
accepted only if a behavioural self-check passes ("self-check"; see
:mod:`._verify` and :mod:`._selfcheck`).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from . import _fingerprint

TABLE_PATH = Path(__file__).with_name("_fingerprint_table.json")

#: Family -> fork module (in :mod:`bart_prefix_patch.forks`). A family whose
#: module does not exist yet is known to the gate but not patched.
FORK_MODULES = {
    "A1": "bart_v4_tuple",
    "A2": "bart_v4_tuple",
    "B": "bart_v4_cache",
    "C": "bart_v4_cache",
    "D": "bart_v5",
    "E": "bart_v5",
    "E2": "bart_v5",
}

#: Human-readable range, kept in step with FORK_MODULES and setup.cfg.
SUPPORTED_RANGE = "4.44.0 - 5.25.x"

#: The environment variable naming the policy for releases the table does not know.
UNKNOWN_ENV = "BART_PREFIX_PATCH_UNKNOWN"


@dataclass
class GateResult:
    """Outcome of the version gate."""

    version: str
    family: Optional[str] = None
    release: Optional[str] = None
    fork: Optional[ModuleType] = None
    message: str = ""
    mismatched: list[str] = field(default_factory=list)
    #: How the release was accepted: "table" (its fingerprints are a known
    #: release's), "self-check" (unknown, verified by behaviour), None (refused).
    accepted_by: Optional[str] = None
    #: Whether the installed fingerprints equal a table entry.
    in_table: bool = False
    #: The installed fingerprints of every table key.
    fingerprints: dict[str, str] = field(default_factory=dict, repr=False)
    #: The self-check's result (:class:`._selfcheck.SelfCheckResult`) when one ran.
    selfcheck: Any = None

    @property
    def ok(self) -> bool:
        """Whether a fork was selected."""
        return self.fork is not None


def load_table() -> dict[str, Any]:
    """The checked-in fingerprint table (empty if the file is missing)."""
    try:
        with TABLE_PATH.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"keys": [], "sets": {}, "releases": {}}


def check(original: Optional[Callable[[str, str], Any]] = None) -> GateResult:
    """Fingerprint the installed transformers and select a fork.

    Args:
        original: Lookup of saved originals (see
            :func:`._fingerprint.installed_fingerprints`).
    """
    import transformers

    version = transformers.__version__
    table = load_table()
    installed = _fingerprint.installed_fingerprints(original)
    relevant = {key: installed.get(key, "missing") for key in table["keys"]}
    matches = [set_id for set_id, entry in table["sets"].items() if entry["fingerprints"] == relevant]
    if not matches:
        closest = table["releases"].get(version) or _closest_set(table, relevant)
        known = table["sets"][closest]["fingerprints"] if closest else {}
        mismatched = sorted(k for k, v in known.items() if relevant.get(k) != v)
        return GateResult(
            version,
            mismatched=mismatched,
            fingerprints=relevant,
            message=(
                f"bart_prefix_patch: transformers {version} is not patched: its code does not match any release "
                f"in the fingerprint table ({len(table['releases'])} releases {_first_last(table)}); supported: {SUPPORTED_RANGE}. Differing functions: "
                f"{', '.join(mismatched) or 'none'}. Set {UNKNOWN_ENV}=verify (or call "
                "bart_prefix_patch.apply(unknown='verify')) to patch it if a behavioural self-check passes, install "
                "a supported release (pip install 'transformers>=4.44,<5.26'), or see "
                "docs/adding-a-transformers-version.md."
            ),
        )
    family = table["sets"][matches[0]]["family"]
    releases = [r for r, s in table["releases"].items() if s == matches[0]]
    release = version if version in releases else (releases[-1] if releases else None)
    try:
        fork = importlib.import_module(f".forks.{FORK_MODULES[family]}", __package__) if family in FORK_MODULES else None
    except ModuleNotFoundError:
        fork = None
    if fork is None or family not in getattr(fork, "FAMILIES", ()):
        return GateResult(
            version,
            family=family,
            release=release,
            in_table=True,
            fingerprints=relevant,
            message=(
                f"bart_prefix_patch: transformers {version} (family {family}) is known but has no fork yet; "
                f"supported: {SUPPORTED_RANGE}. Nothing was patched."
            ),
        )
    return GateResult(
        version,
        family=family,
        release=release,
        fork=fork,
        message=f"family {family}, fork {fork.__name__}",
        accepted_by="table",
        in_table=True,
        fingerprints=relevant,
    )


# ------------------------------------------------- feature detection (unknown releases)


def _upstream_features(original: Optional[Callable[[str, str], Any]] = None) -> set[str]:
    """What the installed BART code looks like, read from the upstream objects (never our wrappers)."""
    from transformers.models.bart import modeling_bart

    bart = "transformers.models.bart.modeling_bart"

    def upstream(qualname: str) -> Any:
        found = original(bart, qualname) if original else None
        return found if found is not None else _fingerprint.resolve(bart, qualname)

    features: set[str] = set()
    forward = upstream("BartAttention.forward")
    if forward is None:
        return features
    try:
        # signature() follows __wrapped__ (deprecate_kwarg's exposed names included).
        features.update(f"param:{name}" for name in inspect.signature(forward).parameters)
        source = inspect.getsource(inspect.unwrap(forward))
    except (TypeError, ValueError, OSError):
        source = ""
    if "is_updated" in source:
        features.add("is_updated")
    if hasattr(modeling_bart, "BartSdpaAttention"):
        features.add("per-implementation classes")
    if "prepare_inputs_for_generation" in vars(modeling_bart.BartForConditionalGeneration):
        features.add("own prepare_inputs_for_generation")
    return features


#: Newest family first: (family, features that must be present, features that must be absent).
#: The forks branch on these same features (the argument names, the cache layout, the classes).
FAMILY_FEATURES: tuple[tuple[str, frozenset, frozenset], ...] = (
    ("E2", frozenset({"param:cache", "param:key_value_states"}), frozenset({"param:layer_head_mask"})),
    ("E", frozenset({"param:past_key_values", "param:key_value_states"}),
     frozenset({"param:layer_head_mask", "param:cache_position", "param:output_attentions"})),
    ("D", frozenset({"param:cache_position", "param:key_value_states"}), frozenset({"param:layer_head_mask"})),
    ("C", frozenset({"param:layer_head_mask", "is_updated"}), frozenset({"per-implementation classes"})),
    ("B", frozenset({"param:layer_head_mask", "is_updated", "per-implementation classes"}), frozenset()),
    ("A2", frozenset({"param:layer_head_mask", "per-implementation classes"}),
     frozenset({"is_updated", "own prepare_inputs_for_generation"})),
    ("A1", frozenset({"param:layer_head_mask", "per-implementation classes", "own prepare_inputs_for_generation"}),
     frozenset({"is_updated"})),
)


def detect_fork(original: Optional[Callable[[str, str], Any]] = None) -> tuple[Optional[str], Optional[ModuleType], str]:
    """Pick a fork for a release the table does not know, by the features of its code.

    Returns:
        ``(family, fork module, explanation)``; family and fork are None when no
        family's features are all present or its fork cannot be imported.
    """
    features = _upstream_features(original)
    for family, present, absent in FAMILY_FEATURES:
        if present <= features and not (absent & features):
            try:
                fork = importlib.import_module(f".forks.{FORK_MODULES[family]}", __package__)
            except Exception as error:  # an unknown release may break a fork's imports
                return None, None, f"family {family} by feature detection, but its fork does not import ({type(error).__name__}: {error})"
            if family not in getattr(fork, "FAMILIES", ()):
                return None, None, f"family {family} by feature detection has no fork"
            return family, fork, f"family {family} by feature detection, fork {fork.__name__}"
    return None, None, "no family's features match the installed BART code"


def _closest_set(table: dict[str, Any], relevant: dict[str, str]) -> Optional[str]:
    if not table["sets"]:
        return None
    return max(
        table["sets"],
        key=lambda set_id: sum(relevant.get(k) == v for k, v in table["sets"][set_id]["fingerprints"].items()),
    )


def _first_last(table: dict[str, Any]) -> str:
    releases = list(table["releases"])
    return f"{releases[0]} - {releases[-1]}" if releases else "(empty)"
