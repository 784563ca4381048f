"""Legacy semantics: decoder positions shifted by the prefix length, as stock PEFT trained them.

The hook finds the position argument by name (``past_key_values_length``,
``past_key_values_length`` as the second positional argument, or
``position_ids``), so it serves every family's positional embedding.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import weakref
from typing import Any

import torch

_SHIFT_HOOK_ATTR = "_bpp_position_shift_hook"
_SHIFT_HOOKS: list[tuple[weakref.ref, Any]] = []  # (embed_positions module, hook handle)
_SHIFTS: contextvars.ContextVar[dict] = contextvars.ContextVar("bart_prefix_position_shift", default={})


#: The name of the "tokens already cached" argument of positional embeddings across releases.
_LENGTH_NAMES = ("cache_length", "past_key_values_length", "past_key_value_length")


def _length_argument(module: torch.nn.Module) -> tuple[str, int]:
    """The name and positional index (``self`` excluded) of the cached-length argument, found by name."""
    names = list(inspect.signature(module.forward).parameters)
    for name in _LENGTH_NAMES:
        if name in names:
            return name, names.index(name)
    raise TypeError(
        f"{type(module).__name__}.forward{inspect.signature(module.forward)} has none of {_LENGTH_NAMES}: "
        "cannot shift its positions"
    )


def _shift_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    shift = _SHIFTS.get().get(id(module))
    if not shift:
        return None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
        return args, kwargs
    # BART passes (input_ids, length), M2M100 (input_ids, inputs_embeds, length): find it by name.
    name, index = _length_argument(module)
    if len(args) > index:
        args = (*args[:index], args[index] + shift, *args[index + 1:])
    else:
        kwargs[name] = kwargs.get(name, 0) + shift
    return args, kwargs


@contextlib.contextmanager
def positions_shifted(core: Any, shift: int):
    """Decoder positions start at ``shift`` (stock PEFT's training-time positions) inside the block."""
    if not shift:
        yield
        return
    module = core.decoder.embed_positions
    if _SHIFT_HOOK_ATTR not in module.__dict__:
        handle = module.register_forward_pre_hook(_shift_hook, with_kwargs=True)
        module.__dict__[_SHIFT_HOOK_ATTR] = handle
        _SHIFT_HOOKS.append((weakref.ref(module), handle))
    token = _SHIFTS.set({**_SHIFTS.get(), id(module): shift})
    try:
        yield
    finally:
        _SHIFTS.reset(token)



def remove_shift_hooks() -> None:
    """Remove every position-shift hook (the integration is being uninstalled)."""
    while _SHIFT_HOOKS:
        module_ref, handle = _SHIFT_HOOKS.pop()
        handle.remove()
        module = module_ref()
        if module is not None:
            module.__dict__.pop(_SHIFT_HOOK_ATTR, None)
