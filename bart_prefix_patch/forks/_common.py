"""Helpers shared by the fork families."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from transformers.cache_utils import EncoderDecoderCache

from .._state import STATE_KWARG, active_state
from ..errors import UnsupportedConfigurationError

try:  # 4.54+: caches are made of layers
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # 4.44 - 4.53
    _DynamicLayer = None


def in_dtype_of(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``prefix`` in the dtype of ``states`` (the tensors it joins or meets)."""
    # The prefix already has the model's dtype; only autocast makes the states differ. Comparing
    # first skips a no-op .to() per join, which decoding pays in every layer on every step.
    return prefix if prefix.dtype == states.dtype else prefix.to(states.dtype)


def concat_prefix(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``[prefix ; states]`` along the sequence axis, in the states' dtype: :func:`join_cached` with nothing cached."""
    return join_cached(prefix, None, states)


def require_growable_cache(layer_cache, layer_idx: int) -> None:
    """Refuse caches of fixed length: ``[prefix ; keys]`` would overflow them.

    4.54+ keep ``max_cache_len`` on each layer, earlier releases on the cache.
    """
    layers = getattr(layer_cache, "layers", None)
    if layers is not None:
        fixed = layers[layer_idx] if layer_idx < len(layers) else None
    else:
        fixed = layer_cache
    if fixed is not None and getattr(fixed, "max_cache_len", None) is not None:
        raise UnsupportedConfigurationError(
            f"a prefix needs a growable (dynamic) cache, got {type(fixed).__name__} in layer {layer_idx}: "
            "use the default cache (no cache_implementation, or cache_implementation='dynamic')"
        )


def plain_dynamic_layer(layer_cache, layer_idx: int):
    """The cache layer at ``layer_idx`` if it is a plain ``DynamicLayer`` of a cache that does not offload.

    There ``Cache.update`` only calls ``DynamicLayer.update``, which
    concatenates (both fingerprinted through ``DynamicLayer.update`` and the
    gate), so the fork may do that concatenation itself. Anything else (older
    caches without layers, quantized, sliding or offloaded layers, a layer the
    cache has not created yet) returns None and takes the stock update.
    """
    if _DynamicLayer is None or getattr(layer_cache, "offloading", False):
        return None
    layers = getattr(layer_cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if type(layer) is _DynamicLayer else None


def join_cached(prefix: torch.Tensor, cached: Optional[torch.Tensor], states: torch.Tensor) -> torch.Tensor:
    """``[prefix ; cached ; states]`` in one concatenation, in the states' dtype."""
    prefix = in_dtype_of(prefix, states)
    return torch.cat([prefix, states] if cached is None else [prefix, cached, states], dim=2)


def cached_keys_values(layer_cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached layer's keys/values: ``layers[idx]`` from 4.54, ``key_cache[idx]`` before."""
    layers = getattr(layer_cache, "layers", None)
    if layers is not None:
        return layers[layer_idx].keys, layers[layer_idx].values
    return layer_cache.key_cache[layer_idx], layer_cache.value_cache[layer_idx]


def prefixed_keys_values(
    self,
    hidden_states: torch.Tensor,
    key_value_states: Optional[torch.Tensor],
    cache,
    prefix_kv: tuple[torch.Tensor, torch.Tensor],
    update: Callable,
    join: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values ``[prefix ; real]`` with a ``Cache``-object cache (4.52 - 5.25).

    Upstream's key/value block of ``BartAttention.forward`` (the same in
    families B to E2 but for how the cache is called), with the prefix joined:
    after the cache update for self-attention, so the cache holds real tokens
    only; before it for cross-attention, so ``[prefix ; encoder]`` is cached
    once and reused on every later step.

    Args:
        update: ``update(layer_cache, keys, values, is_cross_attention) ->
            (keys, values)``, the family's call of ``layer_cache.update``.
        join: False for a self-attention call with a cache whose caller joins
            the scores instead (:func:`._decoding.split_attention`): the real keys/values
            after the stock update, without the prefix.
    """
    is_cross_attention = key_value_states is not None
    prefix_key, prefix_value = prefix_kv
    curr_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        if is_cross_attention and cache.is_updated.get(self.layer_idx):
            # Reuse: the cached cross keys/values already hold [prefix ; encoder].
            return cached_keys_values(cache.cross_attention_cache, self.layer_idx)
        curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache

    current_states = key_value_states if is_cross_attention else hidden_states
    kv_shape = (*current_states.shape[:-1], -1, self.head_dim)
    key_states = self.k_proj(current_states).view(kv_shape).transpose(1, 2)
    value_states = self.v_proj(current_states).view(kv_shape).transpose(1, 2)
    if curr_cache is None:
        # DIFF: no cache (training, encoder): the prefix joins the projections.
        return concat_prefix(prefix_key, key_states), concat_prefix(prefix_value, value_states)

    require_growable_cache(curr_cache, self.layer_idx)  # DIFF: static caches cannot hold a prefix
    if not join and not is_cross_attention:
        # The stock update alone: the cache and its copies are exactly stock's.
        return update(curr_cache, key_states, value_states, False)
    layer = plain_dynamic_layer(curr_cache, self.layer_idx)
    if layer is not None and not layer.is_initialized:
        # A layer's first call: the stock update on zero tokens initialises it as upstream would.
        update(curr_cache, key_states[:, :, :0], value_states[:, :, :0], is_cross_attention)
    held = -1 if layer is None or layer.keys.dim() != 4 else layer.keys.shape[2]  # tokens held; -1: stock update
    if held == 0 or (held > 0 and not is_cross_attention):  # cross-attention joins into an empty layer only
        # DIFF (speed): a plain dynamic layer. What DynamicLayer.update and the
        # prefix join would do in two concatenations (each copying every
        # cached key) is done in one: [prefix ; cached ; new] for decoder
        # self-attention, whose layer keeps a view of the real part (the cache
        # still reports real tokens only: positions, generate()'s bookkeeping,
        # beam reordering and cropping act on the view as on stock keys, and it
        # grows per step exactly as stock's); [prefix ; encoder] for
        # cross-attention, cached whole.
        key_states = join_cached(prefix_key, layer.keys if held else None, key_states)
        value_states = join_cached(prefix_value, layer.values if held else None, value_states)
        if is_cross_attention:
            layer.keys, layer.values = key_states, value_states
        else:
            n_prefix = prefix_key.shape[2]
            layer.keys, layer.values = key_states[:, :, n_prefix:], value_states[:, :, n_prefix:]
    elif is_cross_attention:
        # DIFF: the cross prefix is concatenated with the encoder projections
        # (upstream would have replaced them) and cached together with them,
        # so generation computes both once per generate() call.
        key_states, value_states = update(
            curr_cache, concat_prefix(prefix_key, key_states), concat_prefix(prefix_value, value_states), True
        )
    else:
        # DIFF: the self-attention prefix joins after the cache update, so the
        # cache (hence positions and generate()'s bookkeeping) holds real tokens only.
        key_states, value_states = update(curr_cache, key_states, value_states, False)
        key_states, value_states = concat_prefix(prefix_key, key_states), concat_prefix(prefix_value, value_states)
    if is_cross_attention and isinstance(cache, EncoderDecoderCache):
        cache.is_updated[self.layer_idx] = True
    return key_states, value_states


def eager_attention_bmm(
    self,
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    layer_head_mask: Optional[torch.Tensor],
    output_attentions: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The 4.44 - 4.52 eager attention math, over ``[prefix ; keys]``.

    Upstream's own lines after the key/value block (identical in those
    releases); ``layer_head_mask`` multiplies the probabilities of every key,
    prefix columns included.

    Args:
        query_states: ``(bsz, heads, tgt_len, head_dim)``, already scaled.
        key_states: ``(bsz, heads, src_len, head_dim)``.
        value_states: Like ``key_states``.
        attention_mask: Additive, broadcastable to ``(bsz, 1, tgt_len, src_len)``.

    Returns:
        ``(projected output, attention weights or None)``.
    """
    bsz, _, tgt_len, _ = query_states.shape
    proj_shape = (bsz * self.num_heads, -1, self.head_dim)
    query_states = query_states.reshape(*proj_shape)
    key_states = key_states.reshape(*proj_shape)
    value_states = value_states.reshape(*proj_shape)

    src_len = key_states.size(1)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    if attention_mask is not None:
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)

    attn_weights = nn.functional.softmax(attn_weights, dim=-1)

    if layer_head_mask is not None:
        if layer_head_mask.size() != (self.num_heads,):
            raise ValueError(
                f"Head mask for a single layer should be of size {(self.num_heads,)}, but is"
                f" {layer_head_mask.size()}"
            )
        attn_weights = layer_head_mask.view(1, -1, 1, 1) * attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)

    if output_attentions:
        # Reshaped twice so that attn_weights keeps its gradient (as upstream).
        attn_weights_reshaped = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights_reshaped.view(bsz * self.num_heads, tgt_len, src_len)
    else:
        attn_weights_reshaped = None

    attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
    attn_output = torch.bmm(attn_probs, value_states)
    attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
    attn_output = attn_output.reshape(bsz, tgt_len, self.embed_dim)
    return self.out_proj(attn_output), attn_weights_reshaped


def attention_wrapper(fork: Callable) -> Callable:
    """Build the wrapt wrapper function that routes prefixed calls to ``fork``.

    The wrapper costs one ContextVar read when no prefix is active and then
    calls the upstream function itself, which keeps outputs without a prefix
    bitwise identical to unpatched transformers.
    """

    def wrapper(wrapped, instance, args, kwargs):
        if STATE_KWARG in kwargs:  # traced by torch.compile: the entry guard passed the state down
            state = kwargs.pop(STATE_KWARG)
        elif torch.compiler.is_compiling():
            return wrapped(*args, **kwargs)
        else:
            state = active_state()
        if state is None:
            return wrapped(*args, **kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        prefix_kv = state.kv_for(instance, hidden_states.shape[0])
        if prefix_kv is None:
            return wrapped(*args, **kwargs)
        return fork(instance, *args, prefix_kv=prefix_kv, **kwargs)

    return wrapper
