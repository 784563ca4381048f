"""PEFT's ``forward`` and ``generate`` of a seq2seq prefix-tuning model, run through the core patch."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from .. import _registry
from ..errors import PrefixError
from ._common import (
    ENV_VAR,
    CONFIG_KEY,
    FULL,
    LEGACY,
    PeftIntegrationWarning,
    bind as _bind,
    is_installed,
    prefix_tuning as _prefix_tuning,
    semantics_of as _semantics_of,
    seq2seq_core as _bart_core,
    user_stacklevel as _user_stacklevel,
)
from ._marker import warn_legacy as _warn_legacy
from ._positions import positions_shifted as _positions_shifted
from ._mixed import call_prefix as _adapter_prefix
from ._user import compose as _compose, take_user_prefix as _take_user_prefix

_ANNOUNCED = False


def _mode(peft_model: Any) -> Optional[str]:
    """FULL or LEGACY when the integration runs this model's call, None for PEFT's own code."""
    if not is_installed() or not _registry.is_applied() or getattr(peft_model, "_adapters_disabled", False):
        return None
    config = peft_model.active_peft_config
    if not _prefix_tuning(config) or _bart_core(peft_model) is None:
        return None
    return _semantics_of(config)

def _announce() -> None:
    global _ANNOUNCED
    if _ANNOUNCED:
        return
    _ANNOUNCED = True
    warnings.warn(
        "bart_prefix_patch changes how PEFT prefix-tuning runs on BART: the prefix now reaches decoder "
        "self-attention and cross-attention (concatenated with the encoder; stock PEFT throws the cross half "
        "away), in forward and in generate() (stock generate() ignores or misplaces it); decoder positions are "
        "no longer shifted by num_virtual_tokens; decoder_attention_mask covers the real tokens only. Adapters "
        f"saved now record this in adapter_config.json ({CONFIG_KEY!r}); adapters trained without it run as "
        f"trained. To keep PEFT's own behaviour: bart_prefix_patch.apply(peft=False) or {ENV_VAR}=0. "
        "See docs/peft.md.",
        PeftIntegrationWarning,
        stacklevel=_user_stacklevel(),
    )

def _adjust_kwargs(peft_model: Any, config: Any, mode: str, kwargs: dict) -> None:
    """PEFT's own keyword adjustments, except the position-id shift under the full semantics."""
    adjust = getattr(peft_model, "_adjust_prompt_learning_kwargs", None)
    if adjust is None:
        return
    position_ids = kwargs.get("position_ids")
    adjust(config, kwargs=kwargs)
    if mode == FULL and position_ids is not None:
        kwargs["position_ids"] = position_ids

def _start(peft_model: Any, mode: str) -> tuple[Any, Any, int]:
    config = peft_model.active_peft_config
    if mode == LEGACY:
        _warn_legacy(config)
    else:
        _announce()
    shift = config.num_virtual_tokens if mode == LEGACY else 0
    return config, _bart_core(peft_model), shift

def _call_prefix(peft_model: Any, mode: str, arguments: dict) -> Any:
    """The call's prefix (``prefix=`` and ``adapter_names`` are popped from ``arguments``).

    The active adapter's prefix, or with ``adapter_names`` one adapter per
    example (``_mixed``); composed with the user's own prefix if there is one
    (``_user``). A user prefix and ``adapter_names`` together are refused: the
    per-example adapter prefixes have rows of different lengths, after which
    a user prefix's columns would have no fixed place.
    """
    user = _take_user_prefix(peft_model, arguments)
    if user is not None and arguments.get("adapter_names") is not None:
        raise PrefixError(
            "a prefix of your own (prefix=, past_key_values=Prefix or an attached one) and adapter_names= cannot be "
            "combined in one call: pass one of them"
        )
    prefix = _adapter_prefix(peft_model, mode, arguments)
    if user is None:
        return prefix
    return _compose(prefix, user, _bart_core(peft_model))

def forward(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModelForSeq2SeqLM.forward``: the prompt as ``prefix=`` instead of a cache."""
    mode = _mode(self)
    if mode is None:
        return original(self, *args, **kwargs)  # traceable by torch.compile, as upstream
    return _prefixed_forward(original, self, args, kwargs, mode)

@torch.compiler.disable  # a prefixed call runs eagerly (docs/how-it-works.md)
def _prefixed_forward(original: Callable, self: Any, args: tuple, kwargs: dict, mode: str) -> Any:
    arguments = _bind(original, self, args, kwargs)
    arguments.pop("task_ids", None)  # not used by prefix tuning (PEFT ignores it too)
    prefix = _call_prefix(self, mode, arguments)  # before anything is announced or shifted: it may refuse
    config, core, shift = _start(self, mode)
    _adjust_kwargs(self, config, mode, arguments)
    with _positions_shifted(core, shift):
        return self.base_model(**arguments, prefix=prefix)

def generate(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModelForSeq2SeqLM.generate``: stock ``generate()`` with ``prefix=``, no cache injection."""
    mode = _mode(self)
    if mode is None or args:
        return original(self, *args, **kwargs)
    return _prefixed_generate(self, kwargs, mode)

@torch.compiler.disable
def _prefixed_generate(self: Any, kwargs: dict, mode: str) -> Any:
    if "input_ids" not in kwargs:
        raise ValueError("input_ids must be provided for Peft model generation")  # as PEFT
    kwargs = dict(kwargs)
    kwargs.pop("task_ids", None)
    with torch.no_grad():
        prefix = _call_prefix(self, mode, kwargs)
    config, core, shift = _start(self, mode)
    _adjust_kwargs(self, config, mode, kwargs)
    with _positions_shifted(core, shift):
        return self.base_model.generate(**kwargs, prefix=prefix)
