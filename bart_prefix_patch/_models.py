"""Model introspection: which row of the architecture table a model is, and where its parts are.

Everything here reads the table in :mod:`._architectures` and the model
objects themselves; nothing names a particular architecture.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Optional

import torch

from ._architectures import ARCHITECTURES, Architecture


def modeling_module(row: Architecture) -> ModuleType:
    """Import (if needed) and return a row's modeling module."""
    return importlib.import_module(row.module)


def architecture_of(model: Any) -> Optional[Architecture]:
    """The table row of a model, encoder, decoder or head instance, or None if it is not supported.

    A model belongs to a row when it is an instance of that row's
    ``PreTrainedModel`` (its class lives in the row's module, which is
    therefore already imported).
    """
    for row in _candidates(model):
        module = sys.modules.get(row.module)
        base = getattr(module, row.pretrained_class, None) if module is not None else None
        if base is not None and isinstance(model, base):
            return row
    return None


def _candidates(model: Any) -> list[Architecture]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    first = ARCHITECTURES.get(model_type)
    return ([first] if first else []) + [row for row in ARCHITECTURES.values() if row is not first]


def head_classes(row: Architecture, module: ModuleType) -> list[type]:
    """Every model class of a row's module (heads, the bare model, encoder and decoder stacks).

    Found as the module's subclasses of its ``PreTrainedModel`` (class names
    are not derivable from one prefix), in definition order.
    """
    base = getattr(module, row.pretrained_class)
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, base) and value is not base and value.__module__ == module.__name__
    ]


def attention_classes(row: Architecture, module: ModuleType) -> list[type]:
    """The attention classes a row's module defines on this release."""
    return [getattr(module, name) for name in row.attention_classes if hasattr(module, name)]


class Stack:
    """A stand-in core for an encoder or decoder stack called on its own, or a decoder-only model.

    Attributes:
        standalone: True for a stack called on its own (the sites of the other
            stack are simply not part of the call); False for a decoder-only
            language model, which has no encoder and no cross-attention.
    """

    def __init__(self, module: torch.nn.Module, is_encoder: bool, standalone: bool = True):
        self.config = module.config
        self.standalone = standalone
        setattr(self, "encoder" if is_encoder else "decoder", module)


def _is_stack(module: Any) -> bool:
    return hasattr(module, "layers") and len(module.layers) > 0 and hasattr(module.layers[0], "self_attn")


def core_of(module: Any) -> Any:
    """The part of a model holding ``encoder`` and/or ``decoder`` layer stacks, or None.

    The bare model for a head (``model.model``), the model itself, a
    :class:`Stack` for an encoder or decoder called alone, or a decoder-only
    :class:`Stack` for a causal LM (``model.model.decoder``).
    """
    if hasattr(module, "encoder") and hasattr(module, "decoder"):
        return module
    inner = getattr(module, "model", None)
    if inner is not None and hasattr(inner, "encoder") and hasattr(inner, "decoder"):
        return inner
    if _is_stack(module):
        return Stack(module, is_encoder=not hasattr(module.layers[0], "encoder_attn"))
    for holder in (module, inner):
        decoder = getattr(holder, "decoder", None)
        if decoder is not None and _is_stack(decoder) and not hasattr(holder, "encoder"):
            return Stack(decoder, is_encoder=False, standalone=False)
    return None


def is_seq2seq_core(core: Any) -> bool:
    """Whether a core has both an encoder and a decoder (what :func:`attach` needs)."""
    return core is not None and hasattr(core, "encoder") and hasattr(core, "decoder")


def stacks(core: Any) -> list[torch.nn.Module]:
    """The encoder and/or decoder stacks of a core, in that order."""
    return [getattr(core, name) for name in ("encoder", "decoder") if hasattr(core, name)]


def site_layers(core: Any, site: str) -> Optional[list]:
    """The layers of the stack a site belongs to, or None when the core has no such stack.

    A decoder-only language model has decoder layers with cross-attention
    modules, but no encoder to attend to: it has no cross site.
    """
    if site == "cross" and isinstance(core, Stack) and not core.standalone:
        return None
    stack = getattr(core, "encoder" if site == "encoder" else "decoder", None)
    return None if stack is None else list(stack.layers)


def site_shape(config: Any, site: str) -> tuple[int, int]:
    """``(layers, heads)`` of the stack a site belongs to, read from a config."""
    if site == "encoder":
        return config.encoder_layers, config.encoder_attention_heads
    return config.decoder_layers, config.decoder_attention_heads


def site_attention(layer: torch.nn.Module, site: str) -> torch.nn.Module:
    """The attention module of one layer for a site."""
    return layer.encoder_attn if site == "cross" else layer.self_attn


def attention_modules(core: Any, site: str) -> list[torch.nn.Module]:
    """The attention modules of one site, in layer order (empty when the core lacks the stack)."""
    return [site_attention(layer, site) for layer in site_layers(core, site) or []]


#: The config entries a prefix's shape depends on (recorded next to saved prefixes).
DIM_KEYS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads")


def model_dims(config: Any) -> dict[str, int]:
    """The :data:`DIM_KEYS` of a config."""
    return {key: getattr(config, key) for key in DIM_KEYS}


__all__ = ["architecture_of", "core_of", "attention_modules", "site_shape", "Stack"]
