"""The one registry of every attribute this package replaces in other libraries.

Every patch (attention forks, entry guards, the ``save_pretrained`` guard,
PEFT's methods, the Trainer's checkpoint loading) is installed through
:func:`install` with an *owner* naming who installed it, and removed through
:func:`uninstall`. The registry keeps the upstream object behind each
attribute the first time it is replaced (``setdefault``, as gevent's
``saved``), so a second installation never records one of our own wrappers
as the original; :func:`get_original` answers for every owner.

It also holds the patch status that the lower layers report in their error
messages (applied or not, and why not), set by the patcher.

This module is the bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

LOCK = threading.RLock()


@dataclass(frozen=True)
class Patch:
    """One installed replacement.

    Attributes:
        owner: Who installed it (``"forks"``, ``"guards"``, ``"peft"``, ``"trainer"``, ...).
        target: The class (or module) whose attribute was replaced.
        attr: The attribute name.
        installed: The object now there.
        permanent: Stays when the patch is reverted (the entry guards, which
            keep refusing prefixes while the patch is not applied).
    """

    owner: str
    target: Any
    attr: str
    installed: Any
    permanent: bool = False

    @property
    def name(self) -> str:
        """``module.Class.attr``, for listings."""
        return f"{getattr(self.target, '__module__', '')}.{getattr(self.target, '__qualname__', self.target)}.{self.attr}"


_ORIGINALS: dict[tuple[Any, str], tuple[bool, Any]] = {}  # (target, attr) -> (was in target.__dict__, original)
_INSTALLED: dict[tuple[Any, str], Patch] = {}


def install(owner: str, target: Any, attr: str, make: Callable[[Any], Any], permanent: bool = False) -> Any:
    """Replace ``target.attr`` by ``make(original)`` unless a patch of ``owner`` is already there.

    Args:
        owner: Who installs it.
        target: A class or module.
        attr: The attribute to replace.
        make: Builds the replacement from the upstream object (the raw
            ``__dict__`` entry: a function, or a ``classmethod`` object).

    Returns:
        The installed object.
    """
    with LOCK:
        key = (target, attr)
        current = _INSTALLED.get(key)
        if current is not None and target.__dict__.get(attr) is current.installed:
            return current.installed
        in_dict = attr in target.__dict__
        _ORIGINALS.setdefault(key, (in_dict, target.__dict__[attr] if in_dict else getattr(target, attr)))
        installed = make(_ORIGINALS[key][1])
        setattr(target, attr, installed)
        _INSTALLED[key] = Patch(owner, target, attr, installed, permanent)
        return installed


def uninstall(owner: Optional[str] = None) -> None:
    """Put back the original of every patch of ``owner`` (every non-permanent patch when None).

    An attribute that somebody else replaced after us is left alone: their
    object is not ours to remove.
    """
    with LOCK:
        for key, patch in list(_INSTALLED.items()):
            if patch.permanent if owner is None else patch.owner != owner:
                continue
            del _INSTALLED[key]
            target, attr = key
            if target.__dict__.get(attr) is not patch.installed:
                continue
            in_dict, original = _ORIGINALS[key]
            if in_dict:
                setattr(target, attr, original)
            else:
                delattr(target, attr)


def installed(owner: Optional[str] = None) -> list[Patch]:
    """The patches in place now (of ``owner``, or all), in installation order."""
    with LOCK:
        return [
            patch
            for (target, attr), patch in _INSTALLED.items()
            if (owner is None or patch.owner == owner) and target.__dict__.get(attr) is patch.installed
        ]


def get_original(target: Any, attr: str) -> Any:
    """The upstream object behind ``target.attr``, patched or not."""
    entry = _ORIGINALS.get((target, attr))
    if entry is not None:
        return entry[1]
    return target.__dict__.get(attr, getattr(target, attr, None))


def original_if_patched(module_name: str, qualname: str) -> Any:
    """The upstream object behind ``module:Class.attr`` when our patch is there now, else None.

    The version gate fingerprints upstream code, never our wrappers.
    """
    owner_name, _, attr = qualname.rpartition(".")
    with LOCK:
        for (target, name), patch in _INSTALLED.items():
            if (
                name == attr
                and getattr(target, "__name__", None) == owner_name
                and getattr(target, "__module__", None) == module_name
                and target.__dict__.get(attr) is patch.installed
            ):
                return _ORIGINALS[(target, name)][1]
    return None


# ------------------------------------------------------------------ status


class _Status:
    applied = False
    refusal: Optional[str] = None  # the gate's message when it refused the installed release
    models: dict[str, str] = {}  # model type -> why the gate refused that model alone
    # Bumped at the start and the end of every revert(): a prefixed call that sees it change ran
    # (partly) while the forks were being removed, so some of its layers may have run without the prefix.
    reverts = 0


def count_revert() -> None:
    """Mark the start or the end of a revert (see :func:`reverts`). Called by the patcher only."""
    _Status.reverts += 1


def reverts() -> int:
    """How many times a revert started or ended: read it before a call, compare after."""
    return _Status.reverts


def set_status(applied: bool, refusal: Optional[str] = None, models: Optional[dict[str, str]] = None) -> None:
    """Record whether the patch is applied (and why not; ``models``: the models refused alone). Patcher only."""
    _Status.applied, _Status.refusal, _Status.models = applied, refusal, dict(models or {})


def model_refusal(model_type: str) -> Optional[str]:
    """Why the patch does not cover ``model_type`` although it is applied (None: it does)."""
    reason = _Status.models.get(model_type)
    return f"bart_prefix_patch does not patch {model_type}: {reason}" if reason else None


def is_applied() -> bool:
    """Whether the patch is currently applied."""
    return _Status.applied


def status_line() -> str:
    """One sentence on the patch state, for error messages."""
    if _Status.applied:
        return "bart_prefix_patch is applied."
    if _Status.refusal:
        return _Status.refusal
    return "bart_prefix_patch is not applied (bpp.revert() was called); call bpp.apply() first."
