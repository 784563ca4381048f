"""The adapter-config marker: which semantics an adapter was trained with, saved and read back.

Adapters saved with the integration carry ``"bart_prefix_patch": {"semantics":
"full", ...}`` in ``adapter_config.json``; an adapter loaded without it was
trained by stock PEFT and runs with the legacy semantics.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Optional

from .. import _registry
from .._version import __version__
from ..errors import PrefixError
from ._common import (
    CONFIG_KEY,
    FULL,
    LEGACY,
    SEMANTICS,
    SEMANTICS_ATTR as _SEMANTICS_ATTR,
    PeftIntegrationWarning,
    bind as _bind,
    is_installed,
    prefix_tuning as _prefix_tuning,
    semantics_of as _semantics_of,
    seq2seq_core as _bart_core,
    user_stacklevel as _user_stacklevel,
)

_SAVED_ATTR = "_bpp_saved_semantics"  # on a PeftConfig read from a file: what the file says
_WARNED_ATTR = "_bpp_legacy_warned"


def peft_semantics(peft_model: Any, adapter_name: Optional[str] = None) -> Optional[str]:
    """How the integration runs an adapter: ``"full"``, ``"legacy"``, or None (PEFT's own code).

    None when the integration is off, the adapter is not prefix-tuning, or the
    base model is not a BART model.
    """
    config = _adapter_config(peft_model, adapter_name)
    if not is_installed() or not _registry.is_applied() or not _prefix_tuning(config) or _bart_core(peft_model) is None:
        return None
    return _semantics_of(config)

def set_peft_semantics(peft_model: Any, semantics: str, adapter_name: Optional[str] = None) -> None:
    """Choose how a prefix-tuning adapter runs: ``"full"`` or ``"legacy"``.

    ``"full"`` opts a checkpoint trained by stock PEFT in to the full semantics
    (decoder self- and cross-attention prefix, unshifted positions; its cross
    half was never trained, so fine-tune it before relying on it). The choice is
    recorded on the adapter's config, so ``save_pretrained`` writes it.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    config = _adapter_config(peft_model, adapter_name)
    if not _prefix_tuning(config):
        raise PrefixError(f"set_peft_semantics: the adapter is {getattr(config, 'peft_type', None)}, not PREFIX_TUNING")
    setattr(config, _SEMANTICS_ATTR, semantics)

def _adapter_config(peft_model: Any, adapter_name: Optional[str]) -> Any:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise PrefixError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    if name not in configs:
        raise PrefixError(f"the model has no adapter {name!r} (adapters: {sorted(configs)})")
    return configs[name]

def warn_legacy(config: Any) -> None:
    if getattr(config, _WARNED_ATTR, False):
        return
    setattr(config, _WARNED_ATTR, True)
    length = getattr(config, "num_virtual_tokens", "P")
    warnings.warn(
        "bart_prefix_patch: this PEFT prefix-tuning adapter was saved without bart_prefix_patch (no "
        f"{CONFIG_KEY!r} key in its adapter_config.json), so it runs the way stock PEFT trained it: the prefix "
        f"reaches decoder self-attention only (its cross-attention half was never trained and is not used) and "
        f"decoder positions are shifted by the prefix length ({length}), in forward and in generate() alike. "
        "To opt in to the full semantics (decoder self- and cross-attention prefix, unshifted positions; "
        "fine-tune before relying on it): bart_prefix_patch.set_peft_semantics(model, 'full').",
        PeftIntegrationWarning,
        stacklevel=_user_stacklevel(),
    )

def _model_save_pretrained(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModel.save_pretrained``: prefix-tuning adapters of a supported model run with the full semantics are marked."""
    if _registry.is_applied() and isinstance(getattr(self, "peft_config", None), dict):
        for config in self.peft_config.values():
            if _prefix_tuning(config) and _semantics_of(config) == FULL and _bart_core(self) is not None:
                setattr(config, _SEMANTICS_ATTR, FULL)
    return original(self, *args, **kwargs)

def _config_save_pretrained(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftConfig.save_pretrained``: write the marker next to PEFT's own keys."""
    result = original(self, *args, **kwargs)
    if getattr(self, _SEMANTICS_ATTR, None) != FULL:
        return result
    from peft.utils import CONFIG_NAME

    directory = _bind(original, self, args, kwargs)["save_directory"]
    path = os.path.join(directory, CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data[CONFIG_KEY] = {"semantics": FULL, "version": __version__}
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True))  # PEFT's own format
    return result

def _saved_semantics(marker: Any) -> str:
    return FULL if isinstance(marker, dict) and marker.get("semantics") == FULL else LEGACY

def _from_peft_type(function: Callable, cls: type, args: tuple, kwargs: dict) -> Any:
    """``PeftConfig.from_peft_type`` (behind every config PEFT reads from a file): read and strip the marker."""
    kwargs = dict(kwargs)
    marker = kwargs.pop(CONFIG_KEY, None)
    config = function(cls, *args, **kwargs)
    if _prefix_tuning(config):
        setattr(config, _SAVED_ATTR, _saved_semantics(marker))
    return config

def _marker_on_disk(model_id: Any, subfolder: Optional[str]) -> str:
    """The semantics recorded in a local adapter directory (LEGACY when there is no marker to read)."""
    from peft.utils import CONFIG_NAME

    path = os.path.join(str(model_id), subfolder or "", CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            return _saved_semantics(json.load(handle).get(CONFIG_KEY))
    except (OSError, ValueError, AttributeError):
        return LEGACY

def _load_adapter(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModel.load_adapter`` (also behind ``from_pretrained``): weights from a checkpoint decide the semantics.

    A prefix-tuning adapter whose weights come from a checkpoint without the
    marker (trained by stock PEFT) runs with the legacy semantics, with a
    warning; an explicit :func:`set_peft_semantics` choice is kept.
    """
    result = original(self, *args, **kwargs)
    try:
        arguments = _bind(original, self, args, kwargs)
        config = self.peft_config.get(arguments.get("adapter_name"))
    except (TypeError, AttributeError):
        return result
    if not _prefix_tuning(config):
        return result
    if getattr(config, _SEMANTICS_ATTR, None) is None:
        saved = getattr(config, _SAVED_ATTR, None)
        if saved is None:  # a config passed in, not read from the checkpoint
            saved = _marker_on_disk(arguments.get("model_id"), arguments.get("subfolder"))
        setattr(config, _SEMANTICS_ATTR, saved)
    if _semantics_of(config) == LEGACY and _bart_core(self) is not None:
        warn_legacy(config)
    return result
