"""Helpers shared by the fork families."""

from __future__ import annotations

from typing import Callable

import torch

from .._state import active_state
from ..errors import UnsupportedConfigurationError


def concat_prefix(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``[prefix ; states]`` along the sequence axis, in the states' dtype (autocast)."""
    return torch.cat([prefix.to(states.dtype), states], dim=2)


def require_growable_cache(layer_cache, layer_idx: int) -> None:
    """Refuse caches of fixed length: ``[prefix ; keys]`` would overflow them."""
    layers = getattr(layer_cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    if getattr(layer, "max_cache_len", None) is not None:
        raise UnsupportedConfigurationError(
            f"a prefix needs a growable (dynamic) cache, got {type(layer).__name__} in layer {layer_idx}: "
            "use the default cache (no cache_implementation, or cache_implementation='dynamic')"
        )


def attention_wrapper(fork: Callable) -> Callable:
    """Build the wrapt wrapper function that routes prefixed calls to ``fork``.

    The wrapper costs one ContextVar read when no prefix is active and then
    calls the upstream function itself, which keeps outputs without a prefix
    bitwise identical to unpatched transformers.
    """

    def wrapper(wrapped, instance, args, kwargs):
        state = active_state()
        if state is None or torch.compiler.is_compiling():  # the entry guards refuse prefixes under compile
            return wrapped(*args, **kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        prefix_kv = state.kv_for(instance, hidden_states.shape[0])
        if prefix_kv is None:
            return wrapped(*args, **kwargs)
        return fork(instance, *args, prefix_kv=prefix_kv, **kwargs)

    return wrapper
