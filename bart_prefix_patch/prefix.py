"""The :class:`Prefix` data type and its validation against a model."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

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

    ``lengths`` (set by :meth:`stack`) makes rows of a batch-B prefix differ
    in length: site -> ``(B,)`` integer tensor (or sequence of ints), row
    ``b`` sees only the first ``lengths[site][b]`` prefix columns of that
    site (0: no prefix for that row). ``None``, or a site missing from it:
    every row sees every column.
    """

    encoder: Optional[Sequence[KeyValue]] = None
    decoder: Optional[Sequence[KeyValue]] = None
    cross: Optional[Sequence[KeyValue]] = None
    lengths: Optional[Mapping[str, Union[torch.Tensor, Sequence[int]]]] = None

    @classmethod
    def stack(cls, prefixes: Sequence[Optional["Prefix"]]) -> "Prefix":
        """One per-example prefix from one entry per example.

        Args:
            prefixes: Per example, a :class:`Prefix` of batch 1 or ``None``
                (no prefix). Lengths may differ between examples and sites;
                an example may lack a site that others have.

        Returns:
            A prefix of batch ``len(prefixes)``: per site, every example's
            keys/values padded with zero columns to the longest, and
            ``lengths`` recording each row's own length where rows differ
            (the padding columns are masked, so each row computes what its
            example computes alone). A site no entry has is ``None``; where
            every row has the same length, ``lengths`` omits the site and the
            prefix costs exactly what a batch-B prefix costs.

        Raises:
            PrefixError: An entry that is not a Prefix or None, of batch > 1,
                or whose layer count, heads, head_dim, dtype or device differ
                from the first entry with that site, naming the entry's index,
                the expected and the given value.
        """
        return _stack(cls, prefixes)

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
    _check_lengths(prefix, result)
    return result


def _stack(cls: type, prefixes: Sequence[Optional[Prefix]]) -> Prefix:
    if isinstance(prefixes, (Prefix, torch.Tensor)) or not isinstance(prefixes, Sequence) or not len(prefixes):
        given = "an empty sequence" if isinstance(prefixes, Sequence) and not isinstance(prefixes, Prefix) else type(prefixes).__name__
        raise PrefixError(f"Prefix.stack: expected a non-empty sequence of Prefix (batch 1) or None, one per example, got {given}")
    for index, entry in enumerate(prefixes):
        if entry is not None and not isinstance(entry, Prefix):
            raise PrefixError(f"Prefix.stack: entry {index}: expected a Prefix of batch 1 or None, got {type(entry).__name__}")
    fields: dict[str, Any] = {}
    lengths: dict[str, torch.Tensor] = {}
    for site in SITES:
        present = [(i, p) for i, p in enumerate(prefixes) if p is not None and getattr(p, site) is not None]
        if not present:
            continue
        first_index, first = present[0]
        template = _entry_pairs(first, site, first_index)
        n_layers, (_, heads, _, head_dim) = len(template), template[0][0].shape
        dtype, device = template[0][0].dtype, template[0][0].device
        rows: dict[int, tuple[list[KeyValue], int]] = {}
        for index, entry in present:
            pairs = _entry_pairs(entry, site, index)
            where = f"Prefix.stack: entry {index} Prefix.{site}"
            if len(pairs) != n_layers:
                raise PrefixError(f"{where}: expected {n_layers} layers (as entry {first_index}), got {len(pairs)}")
            lens = set()
            for layer, (key, value) in enumerate(pairs):
                for name, tensor in (("key", key), ("value", value)):
                    b, h, p, d = tensor.shape
                    at = f"{where}[{layer}] {name}"
                    if b != 1:
                        raise PrefixError(f"{at}: expected batch 1 (dim 0; one entry per example), got batch {b}")
                    if h != heads:
                        raise PrefixError(f"{at}: expected {heads} heads (dim 1, as entry {first_index}), got {h}")
                    if d != head_dim:
                        raise PrefixError(f"{at}: expected head_dim {head_dim} (dim 3, as entry {first_index}), got {d}")
                    if tensor.device != device:
                        raise PrefixError(f"{at}: expected device {device} (as entry {first_index}), got {tensor.device}")
                    if tensor.dtype != dtype:
                        raise PrefixError(f"{at}: expected dtype {dtype} (as entry {first_index}), got {tensor.dtype}")
                    lens.add(p)
            if len(lens) != 1:
                raise PrefixError(f"{where}: expected one prefix length for all layers and keys/values, got {sorted(lens)}")
            length = lens.pop()
            own = entry.lengths.get(site) if entry.lengths is not None else None
            if own is not None:
                length = min(length, int(torch.as_tensor(own).reshape(-1)[0]))
            rows[index] = (pairs, length)
        longest = max(pairs[0][0].shape[2] for pairs, _ in rows.values())
        zero = torch.zeros(1, heads, longest, head_dim, dtype=dtype, device=device)
        site_pairs = []
        for layer in range(n_layers):
            keys, values = [], []
            for index in range(len(prefixes)):
                if index in rows:
                    key, value = rows[index][0][layer]
                    pad = (0, 0, 0, longest - key.shape[2])
                    keys.append(torch.nn.functional.pad(key, pad) if pad[3] else key)
                    values.append(torch.nn.functional.pad(value, pad) if pad[3] else value)
                else:
                    keys.append(zero)
                    values.append(zero)
            site_pairs.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
        fields[site] = site_pairs
        row_lengths = [rows[i][1] if i in rows else 0 for i in range(len(prefixes))]
        if any(length != longest for length in row_lengths):
            lengths[site] = torch.tensor(row_lengths, dtype=torch.long, device=device)
    return cls(**fields, lengths=lengths or None)


def _entry_pairs(entry: Prefix, site: str, index: int) -> list[KeyValue]:
    pairs = getattr(entry, site)
    where = f"Prefix.stack: entry {index} Prefix.{site}"
    if isinstance(pairs, torch.Tensor) or not isinstance(pairs, Sequence) or not len(pairs):
        raise PrefixError(f"{where}: expected a non-empty sequence of (key, value) pairs, one per layer")
    for layer, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise PrefixError(f"{where}[{layer}]: expected a (key, value) pair, got {type(pair).__name__}")
        for name, tensor in zip(("key", "value"), pair):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise PrefixError(f"{where}[{layer}] {name}: expected a 4-D tensor (1, heads, prefix_len, head_dim), got {got}")
    return list(pairs)


def _check_lengths(prefix: Prefix, pairs: dict[str, list[KeyValue]]) -> None:
    """Check ``prefix.lengths`` against the validated keys/values."""
    lengths = prefix.lengths
    if lengths is None:
        return
    if not isinstance(lengths, Mapping):
        raise PrefixError(f"Prefix.lengths: expected a mapping site -> per-row lengths, got {type(lengths).__name__}")
    for site, given in lengths.items():
        if site not in SITES or getattr(prefix, site) is None:
            raise PrefixError(
                f"Prefix.lengths[{site!r}]: expected a site that carries a prefix, one of {list(prefix.sites())}"
            )
        if site not in pairs:
            continue  # a site this stack never runs
        shapes = {tuple(key.shape[::2]) for key, _ in pairs[site]}
        if len(shapes) != 1:
            raise PrefixError(
                f"Prefix.lengths[{site!r}]: expected one (batch, prefix_len) for every layer of the site, got {sorted(shapes)}"
            )
        (batch, width), = shapes
        given = torch.as_tensor(given)
        if given.dim() != 1 or given.shape[0] != batch or given.dtype.is_floating_point or given.dtype == torch.bool:
            raise PrefixError(
                f"Prefix.lengths[{site!r}]: expected {batch} integer lengths (one per prefix row), got "
                f"{given.dtype} of shape {tuple(given.shape)}"
            )
        if bool(((given < 0) | (given > width)).any()):
            raise PrefixError(
                f"Prefix.lengths[{site!r}]: expected lengths in 0..{width} (the prefix_len of the site), got {given.tolist()}"
            )


def site_visibility(prefix: Prefix, pairs: dict[str, list[KeyValue]]) -> dict[str, torch.Tensor]:
    """Per site with rows of different lengths: ``(batch, prefix_len)`` bool, which columns each row sees.

    Sites where every row sees every column are left out (no mask is needed
    for them: the fast path). Call after :func:`validate_prefix`.
    """
    result = {}
    for site, given in (prefix.lengths or {}).items():
        if site not in pairs:
            continue
        key = pairs[site][0][0]
        width = key.shape[2]
        given = torch.as_tensor(given, device=key.device)
        if bool((given == width).all()):
            continue
        result[site] = torch.arange(width, device=key.device)[None, :] < given[:, None]
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
