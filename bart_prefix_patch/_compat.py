"""Version gate: which fork family (if any) fits the installed transformers.

The gate trusts code, not version strings: it fingerprints every upstream
function the forks replace or rely on (:mod:`._fingerprint`) and looks the
result up in ``_fingerprint_table.json``, generated from every release's
wheel by ``tools/gen_fingerprints.py``. Only an exact match of a known
release's fingerprints, in a family that has a fork, is patched.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from . import _fingerprint
from ._architectures import fingerprinted

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
SUPPORTED_RANGE = "4.44.0 - 5.24.x"


@dataclass
class GateResult:
    """Outcome of the version gate."""

    version: str
    family: Optional[str] = None
    release: Optional[str] = None
    fork: Optional[ModuleType] = None
    message: str = ""
    mismatched: list[str] = field(default_factory=list)

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
    installed = _fingerprint.installed_fingerprints(fingerprinted(), original)
    relevant = {key: installed.get(key, "missing") for key in table["keys"]}
    matches = [set_id for set_id, entry in table["sets"].items() if entry["fingerprints"] == relevant]
    if not matches:
        closest = table["releases"].get(version) or _closest_set(table, relevant)
        known = table["sets"][closest]["fingerprints"] if closest else {}
        mismatched = sorted(k for k, v in known.items() if relevant.get(k) != v)
        return GateResult(
            version,
            mismatched=mismatched,
            message=(
                f"bart_prefix_patch: transformers {version} is not patched: its code does not match any release "
                f"in the fingerprint table ({len(table['releases'])} releases {_first_last(table)}); supported: {SUPPORTED_RANGE}. Differing functions: "
                f"{', '.join(mismatched) or 'none'}. Install a supported release "
                "(pip install 'transformers>=4.44,<5.25'), or see docs/adding-a-transformers-version.md."
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
            message=(
                f"bart_prefix_patch: transformers {version} (family {family}) is known but has no fork yet; "
                f"supported: {SUPPORTED_RANGE}. Nothing was patched."
            ),
        )
    return GateResult(version, family=family, release=release, fork=fork, message=f"family {family}, fork {fork.__name__}")


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
