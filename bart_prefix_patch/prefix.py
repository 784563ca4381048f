"""The :class:`Prefix` data type and its validation against a model."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._architectures import ARCHITECTURES
from ._constants import SITES
from ._models import Stack, site_attention, site_layers, site_shape
from ._registry import is_applied, status_line
from .errors import (
    PatchNotAppliedError,
    PrefixError,
    PrefixMisplacedError,
    _MisplacedAttributeError,
    _NotAppliedAttributeError,
)

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
    receives one fails instead of silently using it as a cache, with
    :class:`~bart_prefix_patch.errors.PatchNotAppliedError` when the patch is
    not applied and :class:`~bart_prefix_patch.errors.PrefixMisplacedError`
    when it is (another model class, or a Prefix passed as a layer's cache).
    Unknown attributes raise
    :class:`~bart_prefix_patch.errors.PrefixAttributeError` (an
    ``AttributeError``), so ``hasattr(prefix, "to")`` is False.
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
    # as a cache. Make every such use fail loudly: a Prefix there would
    # otherwise be dropped or misused. Attribute lookups raise an
    # AttributeError subclass, so hasattr() probes (accelerate's
    # send_to_device asks for ``.to``) see "no such attribute" and pass the
    # Prefix through; the Python protocols stock code uses next (indexing,
    # iteration, len) keep failing with the cause.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in SITES:
            raise AttributeError(name)
        where = _caller()
        cause, sentence = _misuse_cause(where)
        error = _NotAppliedAttributeError if cause is PatchNotAppliedError else _MisplacedAttributeError
        raise error(_misuse_message(f"Prefix.{name}", where, sentence))

    def __getitem__(self, index: Any) -> Any:
        raise _misuse_error("Prefix[...]", _caller())

    def __iter__(self):
        raise _misuse_error("iter(Prefix)", _caller())

    def __len__(self) -> int:
        raise _misuse_error("len(Prefix)", _caller())


_PATCHED_CLASSES = "the models, encoders and decoders of the supported model types"


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _misuse_cause(where: str) -> tuple[type, str]:
    """The error class and the sentence naming why a Prefix reached ``where``."""
    if not is_applied():
        return PatchNotAppliedError, f"the patch is not active, so stock transformers code received it. {status_line()}"
    fix = "pass it as prefix= to the forward() or generate() of a supported model"
    parts = where.split(".")
    supported_modules = {row.module for row in ARCHITECTURES.values()}
    module = ".".join(parts[:4])
    if where.startswith("transformers.models.") and len(parts) > 3 and module not in supported_modules:
        return PrefixMisplacedError, (
            f"unsupported model class: {parts[2]} is not patched (supported model types: {_supported()}); {fix}"
        )
    if module in supported_modules:
        return PrefixMisplacedError, (
            f"a Prefix where a cache object is expected: a {parts[2]} layer or attention module was called directly "
            f"with it as its cache (only {_PATCHED_CLASSES} take a Prefix); {fix}"
        )
    return PrefixMisplacedError, (
        "a Prefix where a cache object is expected: it was passed to code that is not one of the patched entry "
        f"points ({_PATCHED_CLASSES}), e.g. another model class or a Cache helper; {fix}"
    )


def _caller() -> str:
    """``module.function`` of the code that used the Prefix (two frames up: past the dunder)."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # pragma: no cover - called from the top of a stack
        return "?"
    code = frame.f_code
    return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"


def _misuse_message(what: str, where: str, sentence: str) -> str:
    return f"a bart_prefix_patch.Prefix was used as a cache object ({what} in {where}): {sentence}"


def _misuse_error(what: str, where: str) -> Exception:
    cause, sentence = _misuse_cause(where)
    return cause(_misuse_message(what, where, sentence))


def validate_prefix(prefix: Any, core: torch.nn.Module, batch: Optional[int]) -> dict[str, list[KeyValue]]:
    """Check a prefix against a BART core model and normalise it.

    Args:
        prefix: The user's :class:`Prefix`.
        core: The ``BartModel`` (or a model with ``.encoder`` / ``.decoder``
            layer stacks and a BART config).
        batch: The input batch size of the call, or ``None`` when unknown.

    Returns:
        Site name -> list of ``(key, value)`` pairs (one per layer; None for a
        layer whose prefix has length 0), cast to the dtype of the matching
        attention projections. Sites that are None or empty sequences are left
        out (the empty-site rule).

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
        if pairs is None or (isinstance(pairs, Sequence) and not isinstance(pairs, torch.Tensor) and len(pairs) == 0):
            continue  # the empty-site rule: None and an empty sequence both mean "no prefix at this site"
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
            if batch is not None and b not in (1, batch):
                raise PrefixError(f"{where}: expected prefix batch 1 or the input batch {batch} (dim 0), got {b}")
            attention = site_attention(layer, site)
            weight = attention.k_proj.weight
            device = execution_device(attention.k_proj)
            if key.device != device or value.device != device:
                raise PrefixError(
                    f"{where}: expected tensors on the model's device {device}, got key on {key.device} "
                    f"and value on {value.device}"
                )
            # A layer whose prefix has length 0 follows the empty-site rule: no prefix in that layer.
            out.append((key.to(weight.dtype), value.to(weight.dtype)) if p else None)
        result[site] = out
    return result


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its weight's, or accelerate's for an offloaded module.

    accelerate's ``cpu_offload``, ``dispatch_model`` and ``device_map`` loading
    with offloading leave offloaded weights on the ``meta`` device and move them
    to the hook's ``execution_device`` for each call; the prefix must already be
    there (attention concatenates it with keys computed on that device).

    Raises:
        PrefixError: The weights are on ``meta`` and no accelerate hook says
            where they run (a model built on ``meta`` and never loaded).
    """
    weight = module.weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(module, "_hf_hook", None)
    # A SequentialHook holds several hooks; AlignDevicesHook is the one with the device.
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device)  # an int is an index of the current accelerator (cuda:0, xpu:0, ...)
    raise PrefixError(
        f"expected the model's weights on a real device or offloaded by accelerate (cpu_offload, dispatch_model, "
        f"device_map), got {type(module).__name__} weights on meta without an accelerate hook: load the weights "
        "(e.g. from_pretrained, or model.to_empty() and load_state_dict) before running a prefix"
    )
