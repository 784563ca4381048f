"""Mixed batches of PEFT prefix-tuning adapters: ``adapter_names=[...]``, one adapter per example.

PEFT's own mixed-batch convention (``forward(..., adapter_names=[...])`` and
``generate(..., adapter_names=[...])``, ``"__base__"`` = no adapter) is for
LoRA-like adapters; PEFT 0.21.2 ignores it in a prompt-learning ``forward`` and
rejects it in ``generate``. The integration takes it out of the call first and
hands the base model one stacked prefix (:meth:`Prefix.stack`): each adapter's
prompt (:func:`._prompt.adapter_prefix`) computed once per call, ``None`` for
``"__base__"`` rows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import PrefixError
from ..prefix import Prefix
from ._common import FULL, prefix_tuning as _prefix_tuning, semantics_of as _semantics_of
from ._prompt import adapter_prefix, peft_prefix

BASE = "__base__"
_BATCH_NAMES = ("input_ids", "inputs_embeds", "decoder_input_ids", "labels")


def call_prefix(peft_model: Any, mode: str, arguments: dict) -> Prefix:
    """The call's prefix: the active adapter's, or with ``adapter_names`` (popped) one per example."""
    names = arguments.pop("adapter_names", None)
    if names is None:
        return peft_prefix(peft_model, mode)
    return mixed_prefix(peft_model, names, _batch(arguments), mode)


def _batch(arguments: dict) -> Optional[int]:
    for name in _BATCH_NAMES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def mixed_prefix(peft_model: Any, names: Any, batch: Optional[int], mode: str) -> Prefix:
    """One stacked prefix for ``names`` (an adapter name or ``"__base__"`` per example).

    Raises:
        PrefixError: ``names`` not a list of strings of the batch's length, a
            name that is not an adapter of the model or not a PREFIX_TUNING
            adapter, or an adapter (or the active one) with the legacy
            semantics (its decoder positions are shifted, which cannot differ
            per row), each naming the index, expected and given.
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise PrefixError(f"adapter_names: expected a list with one adapter name per example, got {type(names).__name__}")
    if batch is not None and len(names) != batch:
        raise PrefixError(f"adapter_names: expected {batch} names (one per example of the batch), got {len(names)}")
    adapters = [name for name, config in peft_model.peft_config.items() if _prefix_tuning(config)]
    if mode != FULL:
        raise PrefixError(
            f"adapter_names: mixed batches need the full semantics, but the active adapter "
            f"{peft_model.active_adapter!r} runs with the legacy ones (trained by stock PEFT, decoder positions "
            "shifted); opt it in with bpp.set_peft_semantics(model, 'full') or activate another adapter"
        )
    computed: dict[str, Prefix] = {}
    for index, name in enumerate(names):
        if name == BASE or name in computed:
            continue
        if not isinstance(name, str) or name not in peft_model.peft_config:
            raise PrefixError(
                f"adapter_names[{index}]: expected one of {adapters + [BASE]}, got {name!r} (not an adapter of this model)"
            )
        config = peft_model.peft_config[name]
        if not _prefix_tuning(config):
            raise PrefixError(
                f"adapter_names[{index}]: expected a PREFIX_TUNING adapter (one of {adapters}) or {BASE!r}, got "
                f"{name!r}, a {getattr(config.peft_type, 'value', config.peft_type)} adapter"
            )
        if _semantics_of(config) != FULL:
            raise PrefixError(
                f"adapter_names[{index}]: adapter {name!r} runs with the legacy semantics (trained by stock PEFT, "
                "decoder positions shifted by its length), which a mixed batch cannot give one row; opt it in with "
                f"bpp.set_peft_semantics(model, 'full', adapter_name={name!r})"
            )
        computed[name] = adapter_prefix(peft_model, name, FULL)
    if len(computed) == 1 and BASE not in names:
        return next(iter(computed.values()))  # one adapter for every row: batch 1 broadcasts
    return Prefix.stack([None if name == BASE else computed[name] for name in names])
