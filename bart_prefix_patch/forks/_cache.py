"""Beam search's cache reordering during a prefixed ``generate()`` (every release with ``EncoderDecoderCache``).

Beam search calls ``EncoderDecoderCache.reorder_cache(beam_idx)`` after every
step, which upstream applies to the self-attention cache and to the
cross-attention cache alike. The cross-attention keys/values are the same
for every beam of an example: they are computed from the encoder output
(expanded per beam by ``generate()``) and, here, the cross prefix (a batch-1
prefix broadcast, or a per-example one repeated per beam, the same layout),
and ``beam_idx`` only ever picks beams of the same example. Reordering them
copies every cached encoder key and value on every step and changes nothing;
with a prefix that copy is longer by the prefix. During a prefixed call the
patched method therefore reorders the self-attention cache only (upstream
BART did the same with its tuple caches up to 4.51, in ``_reorder_cache``).
Calls without a prefix run the upstream method.
"""

from __future__ import annotations

from typing import Callable

from transformers.cache_utils import EncoderDecoderCache

from .._state import active_state


def reorder_cache(wrapped: Callable, instance, args, kwargs):
    """Wrapper of ``EncoderDecoderCache.reorder_cache(beam_idx)``."""
    if active_state() is None:
        return wrapped(*args, **kwargs)
    beam_idx = args[0] if args else kwargs["beam_idx"]
    # DIFF: upstream also reorders instance.cross_attention_cache, whose rows are equal within each beam group.
    instance.self_attention_cache.reorder_cache(beam_idx)
    return None


def patches() -> list[tuple[type, str, Callable]]:
    """``(owner, attribute, wrapper)`` triples, installed once with the attention forks."""
    return [(EncoderDecoderCache, "reorder_cache", reorder_cache)]
