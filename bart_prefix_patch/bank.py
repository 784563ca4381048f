"""PrefixBank: named prefixes (one per task) and per-example selection for mixed batches.

A bank maps names to :class:`~bart_prefix_patch.Prefix` objects or prefix
modules (:class:`~bart_prefix_patch.PrefixEncoder`, or any module returning a
batch-1 ``Prefix``). :meth:`PrefixBank.select` turns one name per example into
one stacked prefix (:meth:`Prefix.stack`), calling each selected module once
and no other, so a mixed-task training step sends gradients to the tasks in
the batch only.

On disk a bank is one directory: ``prefix_bank.json`` (format, names in
order, which sub-directory holds which name) and one sub-directory per entry
in the prefix format of :mod:`bart_prefix_patch.io` (written by
:func:`~bart_prefix_patch.io.save_prefix`, read by
:func:`~bart_prefix_patch.io.read_prefix`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ._constants import SITES
from ._models import site_shape
from .encoder import PrefixEncoder
from .errors import PrefixError
from .io import load_prefix, read_prefix, save_prefix
from .prefix import Prefix

BANK_NAME = "prefix_bank.json"
BANK_FORMAT = 1

Entry = Union[Prefix, nn.Module]


class _FixedPrefix(nn.Module):
    """A fixed :class:`Prefix` held as buffers (it follows ``.to()``), returned as it is when called."""

    def __init__(self, prefix: Prefix, name: str):
        super().__init__()
        self.layout: dict[str, int] = {}
        for site in prefix.sites():
            pairs = getattr(prefix, site)
            self.layout[site] = len(pairs)
            for layer, pair in enumerate(pairs):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise PrefixError(f"PrefixBank: entry {name!r} Prefix.{site}[{layer}]: expected a (key, value) pair")
                for kind, tensor in zip("kv", pair):
                    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[0] != 1:
                        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                        raise PrefixError(
                            f"PrefixBank: entry {name!r} Prefix.{site}[{layer}]: expected tensors of shape "
                            f"(1, heads, prefix_len, head_dim), got {got}"
                        )
                    self.register_buffer(f"{site}_{layer}_{kind}", tensor)
        if prefix.lengths is not None:
            raise PrefixError(f"PrefixBank: entry {name!r}: expected a single prefix, got a stacked one (lengths set)")

    def forward(self) -> Prefix:
        return Prefix(
            **{
                site: [(getattr(self, f"{site}_{i}_k"), getattr(self, f"{site}_{i}_v")) for i in range(n)]
                for site, n in self.layout.items()
            }
        )


class PrefixBank(nn.Module):
    """Named prefixes for mixed-task batches.

    Args:
        mapping: Name -> :class:`Prefix` (batch 1) or a module returning one
            (e.g. a :class:`PrefixEncoder`). Names follow ``nn.ModuleDict``
            rules (non-empty strings without ``"."``).

    The entries are sub-modules (``bank.entries[name]``): parameters of every
    prefix module train with the bank, fixed prefixes are buffers.
    """

    def __init__(self, mapping: Mapping[str, Entry]):
        super().__init__()
        if not isinstance(mapping, Mapping):
            raise PrefixError(f"PrefixBank: expected a mapping name -> Prefix or prefix module, got {type(mapping).__name__}")
        entries = {}
        for name, entry in mapping.items():
            if not isinstance(name, str) or not name or "." in name:
                raise PrefixError(f"PrefixBank: names must be non-empty strings without '.' (nn.ModuleDict rules), got {name!r}")
            if isinstance(entry, Prefix):
                entry = _FixedPrefix(entry, name)
            elif not isinstance(entry, nn.Module):
                raise PrefixError(
                    f"PrefixBank: entry {name!r}: expected a Prefix or a module returning one, got {type(entry).__name__}"
                )
            entries[name] = entry
        try:
            self.entries = nn.ModuleDict(entries)
        except (KeyError, TypeError) as error:
            raise PrefixError(f"PrefixBank: {error}") from None

    def names(self) -> list[str]:
        """The names, in order."""
        return list(self.entries.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def forward(self, names: Sequence[Optional[str]]) -> Prefix:
        """Same as :meth:`select`."""
        return self.select(names)

    def select(self, names: Sequence[Optional[str]]) -> Prefix:
        """The prefix of a batch: one name (or ``None`` = no prefix) per example.

        Each distinct selected entry is called once; unselected entries are not
        called. All examples naming the same entry return that entry's
        batch-1 prefix itself (it broadcasts, no copy); otherwise the result
        is :meth:`Prefix.stack` of the per-example prefixes.

        Raises:
            PrefixError: A name missing from the bank (naming the example's
                index, the name and the bank's names), or a module whose
                result is not a batch-1 Prefix.
        """
        if isinstance(names, str) or not isinstance(names, Sequence) or not len(names):
            raise PrefixError(
                f"PrefixBank.select: expected a non-empty sequence of names (or None), one per example, got {names!r}"
            )
        computed: dict[str, Prefix] = {}
        for index, name in enumerate(names):
            if name is None or name in computed:
                continue
            if not isinstance(name, str) or name not in self.entries:
                raise PrefixError(
                    f"PrefixBank.select: example {index}: expected one of {self.names()} or None, got {name!r}"
                )
            prefix = self.entries[name]()
            if not isinstance(prefix, Prefix):
                raise PrefixError(
                    f"PrefixBank.select: entry {name!r} returned {type(prefix).__name__}, expected a Prefix"
                )
            computed[name] = prefix
        if len(computed) == 1 and None not in names:
            return next(iter(computed.values()))  # one task: batch 1 broadcasts, as a plain prefix does
        try:
            return Prefix.stack([None if name is None else computed[name] for name in names])
        except PrefixError as error:
            raise PrefixError(f"PrefixBank.select({list(names)!r}): {error}") from None

    # ------------------------------------------------------------ saving

    def save(self, path: Union[str, Path], config: Any = None) -> Path:
        """Write the bank to directory ``path`` (created if missing).

        Every entry is written with :func:`~bart_prefix_patch.save_prefix` into
        a sub-directory; ``prefix_bank.json`` records the names in order. A
        fixed :class:`Prefix` entry is saved as the flat
        :class:`PrefixEncoder` producing exactly its keys/values (and loads
        back as one); that needs the model dimensions, taken from ``config``
        (the model's config) or else from a :class:`PrefixEncoder` of the bank.

        Raises:
            PrefixError: An entry that is neither a PrefixEncoder nor a fixed
                Prefix, or a fixed Prefix with no config to save it against.
        """
        directory = Path(path)
        if config is None:
            config = next((e.config for e in self.entries.values() if isinstance(e, PrefixEncoder)), None)
        encoders = {}
        for name, entry in self.entries.items():
            if isinstance(entry, PrefixEncoder):
                encoders[name] = entry
            elif isinstance(entry, _FixedPrefix):
                if config is None:
                    raise PrefixError(
                        f"PrefixBank.save: entry {name!r} is a fixed Prefix: pass config=model.config so that it can "
                        "be saved in the prefix format"
                    )
                encoders[name] = _flat_encoder(entry(), config, name)
            else:
                raise PrefixError(
                    f"PrefixBank.save: entry {name!r} is a {type(entry).__name__}; only PrefixEncoders and fixed "
                    "Prefix objects can be saved"
                )
        directory.mkdir(parents=True, exist_ok=True)
        folders = {}
        for index, (name, encoder) in enumerate(encoders.items()):
            folder = f"entry_{index}"
            save_prefix(encoder, directory / folder)
            folders[name] = folder
        manifest = {"format": BANK_FORMAT, "names": list(folders), "directories": folders}
        (directory / BANK_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, path: Union[str, Path], model: Optional[nn.Module] = None) -> "PrefixBank":
        """Load a bank written by :meth:`save` (entries come back as :class:`PrefixEncoder` s).

        Args:
            path: The bank directory.
            model: Optional model to validate dimensions against (and whose
                device and dtype the entries are moved to).

        Raises:
            PrefixError: Naming the file and the problem.
        """
        directory = Path(path)
        manifest_path = directory / BANK_NAME
        if not manifest_path.is_file():
            raise PrefixError(f"{directory}: no {BANK_NAME} (expected a folder written by PrefixBank.save)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PrefixError(f"{manifest_path}: invalid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise PrefixError(f"{manifest_path}: expected format {BANK_FORMAT}, got {got!r}")
        names, folders = manifest.get("names"), manifest.get("directories")
        if (
            not isinstance(names, list)
            or not isinstance(folders, dict)
            or sorted(map(str, names)) != sorted(folders)
            or any(not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".") for f in folders.values())
        ):
            raise PrefixError(f"{manifest_path}: expected 'names' (a list) and 'directories' (name -> sub-folder) that agree")
        return cls.from_prefix_dirs({name: directory / folders[name] for name in names}, model=model)

    @classmethod
    def from_prefix_dirs(
        cls, mapping: Mapping[str, Union[str, Path]], model: Optional[nn.Module] = None
    ) -> "PrefixBank":
        """A bank from several single-task prefix directories (written by ``save_prefix`` or ``train``).

        Args:
            mapping: Name -> prefix directory.
            model: Optional model to validate dimensions against (and whose
                device and dtype the entries are moved to).

        Raises:
            PrefixError: Naming the directory and the problem (see
                :func:`~bart_prefix_patch.io.read_prefix`).
        """
        entries = {}
        for name, folder in mapping.items():
            read_prefix(folder, model.config if model is not None else None)  # every entry checked before any loads
        for name, folder in mapping.items():
            entries[name] = load_prefix(folder, model)
        return cls(entries)


def _flat_encoder(prefix: Prefix, config: Any, name: str) -> PrefixEncoder:
    """The flat PrefixEncoder whose output is exactly ``prefix`` (batch 1)."""
    lengths = {}
    for site in prefix.sites():
        layers, heads = site_shape(config, site)
        pairs = getattr(prefix, site)
        shapes = {tuple(t.shape) for pair in pairs for t in pair}
        expected_dims = (heads, config.d_model // heads)
        if len(pairs) != layers or len(shapes) != 1 or next(iter(shapes))[1::2] != expected_dims:
            raise PrefixError(
                f"PrefixBank.save: entry {name!r} Prefix.{site}: expected {layers} layers of (1, {heads}, P, "
                f"{config.d_model // heads}), got {len(pairs)} layers of {sorted(shapes)}"
            )
        lengths[site] = next(iter(shapes))[2]
    if not lengths:
        raise PrefixError(f"PrefixBank.save: entry {name!r} is an empty Prefix (no site)")
    sample = next(iter(getattr(prefix, next(iter(lengths)))))[0]
    encoder = PrefixEncoder(config, lengths, tuple(site for site in SITES if site in lengths), hidden_size=None)
    encoder = encoder.to(device=sample.device, dtype=sample.dtype)
    with torch.no_grad():
        for site, length in lengths.items():
            # forward() reads flat (P, layers * 2 * d_model) as view(P, layers, 2, heads, head_dim).
            kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in getattr(prefix, site)])  # (L, 2, H, P, D)
            encoder.prefixes[site].flat.copy_(kv.permute(3, 0, 1, 2, 4).reshape(length, -1))
    return encoder
