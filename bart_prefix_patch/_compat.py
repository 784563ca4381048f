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
from ._architectures import ARCHITECTURES, fingerprinted

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
    """Outcome of the version gate.

    Attributes:
        version: The installed transformers version.
        family: The shape family of the matching table entry.
        release: The release whose fingerprints matched.
        fork: The fork module (None: nothing is patched).
        message: What was decided, in a sentence.
        mismatched: Functions whose fingerprints differ from the closest table entry.
        models: ``config.model_type`` -> None when that model is patched, else
            why it is not (its code drifted, or the release does not have it).
            Each model is gated on its own.
        drifted: The refused models whose code exists but differs from the
            table (a subset of ``models``), model type -> why.
        accepted_by: How the release was accepted: ``"table"`` (its
            fingerprints are a known release's), ``"self-check"`` (unknown,
            verified by behaviour), None (refused).
        in_table: Whether the shared upstream code matches a table entry.
        fingerprints: The installed fingerprints of every key.
        selfcheck: The self-check's result (:class:`._selfcheck.SelfCheckResult`) when one ran.
    """

    version: str
    family: Optional[str] = None
    release: Optional[str] = None
    fork: Optional[ModuleType] = None
    message: str = ""
    mismatched: list[str] = field(default_factory=list)
    models: dict[str, Optional[str]] = field(default_factory=dict)
    drifted: dict[str, str] = field(default_factory=dict)
    accepted_by: Optional[str] = None
    in_table: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict, repr=False)
    selfcheck: Any = None

    @property
    def ok(self) -> bool:
        """Whether a fork was selected (for at least one model)."""
        return self.fork is not None

    @property
    def patched_models(self) -> list[str]:
        """The model types whose forks are installed."""
        return [model for model, refusal in self.models.items() if refusal is None] if self.ok else []


def load_table() -> dict[str, Any]:
    """The checked-in fingerprint table (empty if the file is missing)."""
    try:
        with TABLE_PATH.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"keys": [], "sets": {}, "releases": {}}


def _row_keys(keys) -> dict[str, list[str]]:
    """Model type -> its fingerprint keys among ``keys`` (the rest belong to shared upstream code)."""
    return {
        row.model_type: [key for key in keys if key.split(":")[0] == row.module] for row in ARCHITECTURES.values()
    }


def check(original: Optional[Callable[[str, str], Any]] = None) -> GateResult:
    """Fingerprint the installed transformers and select a fork, model by model.

    The shared upstream code (cache, generation, masks) must match a table
    entry for anything to be patched; among the entries it matches, the one
    under which most models' code matches is chosen, and each model whose own
    functions differ from that entry is refused alone (the others are patched).

    Args:
        original: Lookup of saved originals (see
            :func:`._fingerprint.installed_fingerprints`).
    """
    import transformers

    version = transformers.__version__
    table = load_table()
    installed = _fingerprint.installed_fingerprints(fingerprinted(), original)
    row_keys = _row_keys(installed)
    owned = {key for keys in row_keys.values() for key in keys}
    shared = [key for key in installed if key not in owned]
    present = {model for model, keys in row_keys.items() if any(installed[k] != "missing" for k in keys)}

    def matching_models(entry: dict[str, str]) -> set[str]:
        return {m for m in present if all(entry.get(k) == installed[k] for k in row_keys[m])}

    candidates = [
        set_id for set_id, entry in table["sets"].items()
        if all(entry["fingerprints"].get(k, "missing") == installed[k] for k in shared)
    ]
    scored = sorted(
        candidates,
        key=lambda set_id: (len(matching_models(table["sets"][set_id]["fingerprints"])),
                            table["releases"].get(version) == set_id),
        reverse=True,
    )
    chosen = scored[0] if scored and matching_models(table["sets"][scored[0]]["fingerprints"]) else None
    if chosen is None:
        relevant = {key: installed.get(key, "missing") for key in table["keys"]}
        closest = table["releases"].get(version) or _closest_set(table, relevant)
        known = table["sets"][closest]["fingerprints"] if closest else {}
        mismatched = sorted(k for k, v in known.items() if relevant.get(k) != v)
        # Which models' own code some release had (what a self-check on BART can vouch for the rest).
        anywhere = set().union(*(matching_models(entry["fingerprints"]) for entry in table["sets"].values()))
        models = {
            model: None if model in anywhere else f"its code in transformers {version} is in no table entry"
            for model in present
        }
        return GateResult(
            version,
            mismatched=mismatched,
            models=models,
            fingerprints=installed,
            message=(
                f"bart_prefix_patch: transformers {version} is not patched: its code does not match any release "
                f"in the fingerprint table ({len(table['releases'])} releases {_first_last(table)}); supported: {SUPPORTED_RANGE}. Differing functions: "
                f"{', '.join(mismatched) or 'none'}. Set {UNKNOWN_ENV}=verify (or call "
                "bart_prefix_patch.apply(unknown='verify')) to patch it if a behavioural self-check passes, install "
                "a supported release (pip install 'transformers>=4.44,<5.26'), or see "
                "docs/adding-a-transformers-version.md."
            ),
        )
    entry = table["sets"][chosen]["fingerprints"]
    accepted = matching_models(entry)
    models: dict[str, Optional[str]] = {}
    drifted: dict[str, str] = {}
    mismatched = []
    for model in row_keys:
        if model in accepted:
            models[model] = None
        elif model not in present:
            models[model] = f"transformers {version} has no {model} model"
        else:
            differing = sorted(k for k in row_keys[model] if entry.get(k) != installed[k])
            mismatched += differing
            models[model] = drifted[model] = (
                f"its code in transformers {version} differs from every release in the fingerprint table "
                f"(differing functions: {', '.join(differing)})"
            )
    family = table["sets"][chosen]["family"]
    releases = [r for r, s in table["releases"].items() if s == chosen]
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
            fingerprints=installed,
            message=(
                f"bart_prefix_patch: transformers {version} (family {family}) is known but has no fork yet; "
                f"supported: {SUPPORTED_RANGE}. Nothing was patched."
            ),
        )
    return GateResult(
        version, family=family, release=release, fork=fork, message=f"family {family}, fork {fork.__name__}",
        mismatched=mismatched, models=models, drifted=drifted, accepted_by="table", in_table=True,
        fingerprints=installed,
    )


# ------------------------------------------------- feature detection (unknown releases)


def _upstream_features(original: Optional[Callable[[str, str], Any]] = None) -> set[str]:
    """What the installed code of the table's reference row (BART) looks like, read from the upstream objects."""
    row = ARCHITECTURES["bart"]
    module = importlib.import_module(row.module)

    def upstream(qualname: str) -> Any:
        found = original(row.module, qualname) if original else None
        return found if found is not None else _fingerprint.resolve(row.module, qualname)

    features: set[str] = set()
    forward = upstream(f"{row.prefix}Attention.forward")
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
    if hasattr(module, f"{row.prefix}SdpaAttention"):
        features.add("per-implementation classes")
    if "prepare_inputs_for_generation" in vars(getattr(module, row.head_class)):
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
