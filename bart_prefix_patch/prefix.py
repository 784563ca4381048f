"""The :class:`Prefix` data type and its validation against a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._constants import SITES
from ._models import Stack, site_attention, site_layers, site_shape
from ._registry import status_line
from .errors import PatchNotAppliedError, PrefixError

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prefix:
    """Key/value prefixes for the three attention sites of a BART model.

    Each field is ``None`` (no prefix at that site) or a sequence holding one
    ``(key, value)`` pair per layer of its stack: encoder layers for
    ``encoder``, decoder layers for ``decoder`` (self-attention) and ``cross``
    (cross-attention). Keys and values are shaped
    ``(batch or 1, num_heads, prefix_len, head_dim)``; a batch of 1 broadcasts
    over the inputs. Sites may use different prefix lengths. Tensors of another
    dtype are cast to the model's compute dtype when used (gradients flow
    through the cast).

    A ``Prefix`` is deliberately not a cache: stock transformers code that
    receives one (because the patch is not applied) fails with
    :class:`~bart_prefix_patch.errors.PatchNotAppliedError` instead of
    silently using it as a cache.
    """

    encoder: Optional[Sequence[KeyValue]] = None
    decoder: Optional[Sequence[KeyValue]] = None
    cross: Optional[Sequence[KeyValue]] = None

    @classmethod
    def from_legacy(cls, past_key_values: Sequence[Sequence[torch.Tensor]]) -> "Prefix":
        """Build a prefix from the seed's ``past_key_values`` format.

        Args:
            past_key_values: One entry per decoder layer, each ``(k, v)``
                (decoder self-attention only) or ``(k, v, cross_k, cross_v)``.

        Returns:
            A prefix with ``decoder`` (and ``cross`` for 4-tuples) filled in.
        """
        if isinstance(past_key_values, Prefix):
            return past_key_values
        entries = list(past_key_values)
        if not entries:
            raise PrefixError("Prefix.from_legacy: expected one entry per decoder layer, got an empty sequence")
        sizes = {len(entry) for entry in entries}
        if sizes not in ({2}, {4}):
            raise PrefixError(
                "Prefix.from_legacy: expected every layer entry to be (k, v) or (k, v, cross_k, cross_v), "
                f"got entry lengths {sorted(sizes)}"
            )
        decoder = [(entry[0], entry[1]) for entry in entries]
        cross = [(entry[2], entry[3]) for entry in entries] if sizes == {4} else None
        return cls(decoder=decoder, cross=cross)

    def sites(self) -> tuple[str, ...]:
        """Names of the sites that carry a prefix."""
        return tuple(site for site in SITES if getattr(self, site) is not None)

    # Stock transformers code treats whatever it finds in ``past_key_values``
    # as a cache. Make every such use fail loudly: a Prefix there means the
    # patch is not active and the prefix would otherwise be dropped or misused.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in SITES:
            raise AttributeError(name)
        raise PatchNotAppliedError(_not_applied_message(f"Prefix.{name}"))

    def __getitem__(self, index: Any) -> Any:
        raise PatchNotAppliedError(_not_applied_message("Prefix[...]"))

    def __iter__(self):
        raise PatchNotAppliedError(_not_applied_message("iter(Prefix)"))

    def __len__(self) -> int:
        raise PatchNotAppliedError(_not_applied_message("len(Prefix)"))


def _not_applied_message(what: str) -> str:
    return (
        f"a bart_prefix_patch.Prefix reached unpatched transformers code ({what}): the prefix would be ignored "
        f"or used as a cache. {status_line()}"
    )


def validate_prefix(prefix: Any, core: torch.nn.Module, batch: Optional[int]) -> dict[str, list[KeyValue]]:
    """Check a prefix against a BART core model and normalise it.

    Args:
        prefix: The user's :class:`Prefix`.
        core: The model part holding the layer stacks (:func:`._models.core_of`).
        batch: The input batch size of the call, or ``None`` when unknown.

    Returns:
        Site name -> list of ``(key, value)`` pairs, cast to the dtype of the
        matching attention projections.

    Raises:
        PrefixError: On any mismatch, naming expected and given values.
    """
    if not isinstance(prefix, Prefix):
        raise PrefixError(
            f"expected a bart_prefix_patch.Prefix (or a module returning one), got {type(prefix).__name__}"
        )
    config = core.config
    result: dict[str, list[KeyValue]] = {}
    for site in SITES:
        pairs = getattr(prefix, site)
        if pairs is None:
            continue
        layers = site_layers(core, site)
        if layers is None:
            if isinstance(core, Stack) and not core.standalone:
                raise PrefixError(
                    f"Prefix.{site}: this model is a decoder-only language model (no encoder, no cross-attention); "
                    "expected a prefix on the 'decoder' site only"
                )
            continue  # a stack called on its own never sees the other stack's sites
        heads = site_shape(config, site)[1]
        if isinstance(pairs, torch.Tensor) or not isinstance(pairs, Sequence):
            raise PrefixError(
                f"Prefix.{site}: expected a sequence of (key, value) pairs, one per layer, got {type(pairs).__name__}"
            )
        if len(pairs) != len(layers):
            raise PrefixError(
                f"Prefix.{site}: expected {len(layers)} (key, value) pairs (one per "
                f"{'encoder' if site == 'encoder' else 'decoder'} layer), got {len(pairs)}"
            )
        head_dim = config.d_model // heads
        out = []
        for index, (pair, layer) in enumerate(zip(pairs, layers)):
            where = f"Prefix.{site}[{index}]"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise PrefixError(f"{where}: expected a (key, value) pair, got {type(pair).__name__}")
            key, value = pair
            for name, tensor in (("key", key), ("value", value)):
                if not isinstance(tensor, torch.Tensor):
                    raise PrefixError(f"{where} {name}: expected a torch.Tensor, got {type(tensor).__name__}")
                if tensor.dim() != 4:
                    raise PrefixError(
                        f"{where} {name}: expected shape (batch or 1, num_heads={heads}, prefix_len, "
                        f"head_dim={head_dim}), got {tuple(tensor.shape)}"
                    )
            if key.shape != value.shape:
                raise PrefixError(f"{where}: key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
            b, h, p, d = key.shape
            if h != heads:
                raise PrefixError(f"{where}: expected {heads} heads (dim 1), got {h} (shape {tuple(key.shape)})")
            if d != head_dim:
                raise PrefixError(f"{where}: expected head_dim {head_dim} (dim 3), got {d} (shape {tuple(key.shape)})")
            if p < 1:
                raise PrefixError(f"{where}: expected prefix_len >= 1 (dim 2), got {p}")
            if batch is not None and b not in (1, batch):
                raise PrefixError(f"{where}: expected prefix batch 1 or the input batch {batch} (dim 0), got {b}")
            weight = site_attention(layer, site).k_proj.weight
            if key.device != weight.device or value.device != weight.device:
                raise PrefixError(
                    f"{where}: expected tensors on the model's device {weight.device}, got key on {key.device} "
                    f"and value on {value.device}"
                )
            out.append((key.to(weight.dtype), value.to(weight.dtype)))
        result[site] = out
    return result
