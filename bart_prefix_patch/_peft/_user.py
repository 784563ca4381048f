"""A user's own prefix next to a PEFT prefix-tuning adapter: which one applies, and the composition.

A ``PeftModelForSeq2SeqLM`` run by the integration hands its base model
``prefix=`` (the adapter's prompt as a :class:`Prefix`). A prefix of the
user's (``prefix=`` given to the PeftModel, a :class:`Prefix` passed as its
``past_key_values``, or one attached to the base model with
:func:`bart_prefix_patch.attach`) would otherwise collide with it (``got
multiple values for keyword argument 'prefix'``) or be replaced by it without
a word. Instead both apply: per site and layer, keys and values are
``[adapter prefix ; user prefix]`` (docs/peft.md, "Your own prefix").
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .._attach import attachment_of, call_source
from .._guards import _take_prefix
from .._constants import SITES
from ..errors import PrefixError
from ..prefix import Prefix, validate_prefix

KeyValue = tuple[torch.Tensor, torch.Tensor]


def take_user_prefix(peft_model: Any, arguments: dict) -> Optional[Prefix]:
    """Remove the user's prefix from a call's arguments and return it, resolved to a :class:`Prefix`.

    A per-call prefix (``prefix=``, or a :class:`Prefix` passed as
    ``past_key_values``) wins over one attached to the base model, as it does
    for a plain model. An attached module is called here (with autograd when
    it is on, so a trainable module attached to the base model gets its
    gradient).

    Args:
        peft_model: The ``PeftModelForSeq2SeqLM``.
        arguments: The call's keyword arguments; ``prefix`` and a Prefix
            passed as a cache are popped.

    Returns:
        The user's prefix, or None when there is none.

    Raises:
        PrefixError: Two prefixes in one call (``prefix=`` and a Prefix as the cache).
    """
    _, prefix = _take_prefix((), arguments)
    if prefix is not None:
        return prefix
    attachment = attachment_of(peft_model.get_base_model())
    if attachment is None:
        return None
    source = attachment.source
    return call_source(source) if isinstance(source, torch.nn.Module) else source


def compose(adapter: Prefix, user: Prefix, core: torch.nn.Module) -> Prefix:
    """The adapter's prefix followed by the user's, per site and layer.

    Each site's keys (and values) are concatenated along the prefix-length
    axis, the adapter's first: ``[adapter ; user]``. A site only one of them
    fills is taken as it is (the adapter never has an encoder prefix, and no
    cross prefix under the ``"legacy"`` semantics). A batch-1 side is expanded
    to the other side's batch (no copy until the concatenation).

    Args:
        adapter: The prefix :func:`peft_prefix` computed for the call (batch 1).
        user: The user's prefix.
        core: The base model's encoder-decoder core (``BartModel``).

    Returns:
        The composed prefix; the entry guard validates it against the call.

    Raises:
        PrefixError: The user's prefix does not fit the base model (the
            message names the site, layer, expected and given values). Nothing
            has been run or changed.
    """
    try:
        # The user's prefix on its own first: its errors then name its own shapes, not the composed ones.
        validate_prefix(user, core, None)
    except PrefixError as error:
        raise PrefixError(f"the prefix given with a PEFT prefix-tuning adapter does not fit the base model: {error}") from None
    sites = {}
    for site in SITES:
        ours, theirs = getattr(adapter, site), getattr(user, site)
        if ours is None or theirs is None:
            sites[site] = theirs if ours is None else ours
            continue
        sites[site] = [_concat(a, u) for a, u in zip(ours, theirs)]
    return Prefix(**sites)


def _concat(adapter: KeyValue, user: KeyValue) -> KeyValue:
    pairs = []
    for first, second in zip(adapter, user):
        second = second.to(first.dtype)  # the adapter's dtype is the one PEFT computes in
        batch = max(first.shape[0], second.shape[0])
        if first.shape[0] != batch:
            first = first.expand(batch, *first.shape[1:])
        if second.shape[0] != batch:
            second = second.expand(batch, *second.shape[1:])
        pairs.append(torch.cat([first, second], dim=2))
    return pairs[0], pairs[1]
