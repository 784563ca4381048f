"""Fork of ``BartAttention.forward`` for transformers 5.4 - 5.24 (families E, E2).

Upstream shape: one attention class dispatching through
``ALL_ATTENTION_FUNCTIONS``; ``EncoderDecoderCache`` with ``is_updated``;
layers pass keyword arguments straight through to the attention. 5.24 names
the cache argument ``cache`` (``past_key_values`` is a deprecated alias), 5.4
- 5.23 name it ``past_key_values``; the fork accepts both.

The decoder layer needs no fork here: the layer hands the same keyword
arguments to self- and cross-attention, and the attention fork tells the
sites apart itself. (Forking ``BartDecoderLayer.forward`` on 5.x would even
break gradient checkpointing, which wraps ``forward`` per class and checks
that it is still the outermost wrapper.)
"""

from __future__ import annotations

from transformers.cache_utils import EncoderDecoderCache
from transformers.models.bart import modeling_bart
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ._common import attention_wrapper, concat_prefix as _cat, require_growable_cache
from ._masks import prefixed_mask

FAMILIES = ("E", "E2")


def attention_forward(
    self,
    hidden_states,
    key_value_states=None,
    cache=None,
    attention_mask=None,
    *,
    prefix_kv,
    past_key_values=None,
    **kwargs,
):
    """``BartAttention.forward`` with a key/value prefix (upstream 5.4 - 5.24).

    Differences from upstream are marked ``DIFF``.
    """
    if cache is None:  # DIFF: 5.4 - 5.23 spell the argument past_key_values
        cache = past_key_values
    is_cross_attention = key_value_states is not None
    input_shape = hidden_states.shape[:-1]
    query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    prefix_key, prefix_value = prefix_kv

    is_updated = False
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        else:
            curr_cache = cache

    if is_cross_attention and cache is not None and is_updated:
        # Reuse: the cached cross keys/values already hold [prefix ; encoder].
        key_states = curr_cache.layers[self.layer_idx].keys
        value_states = curr_cache.layers[self.layer_idx].values
    else:
        current_states = key_value_states if is_cross_attention else hidden_states
        kv_shape = (*current_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(current_states).view(kv_shape).transpose(1, 2)
        value_states = self.v_proj(current_states).view(kv_shape).transpose(1, 2)
        if is_cross_attention:
            # DIFF: the cross prefix is concatenated with the encoder projections
            # (upstream would have replaced them) and cached together with them,
            # so generation computes both once per generate() call.
            key_states = _cat(prefix_key, key_states)
            value_states = _cat(prefix_value, value_states)
        if cache is not None:
            require_growable_cache(curr_cache, self.layer_idx)  # DIFF: static caches cannot hold a prefix
            key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    if not is_cross_attention:
        # DIFF: the self-attention prefix joins after the cache update, so the
        # cache (hence positions and generate()'s bookkeeping) holds real tokens only.
        key_states = _cat(prefix_key, key_states)
        value_states = _cat(prefix_value, value_states)

    implementation = self.config._attn_implementation
    # DIFF: the mask gains always-visible prefix columns (see prefixed_mask).
    attention_mask = prefixed_mask(
        attention_mask,
        n_prefix=prefix_key.shape[2],
        query_len=query_states.shape[2],
        key_len=key_states.shape[2],
        causal=self.is_causal and not is_cross_attention,
        boolean=implementation == "sdpa",
        dtype=query_states.dtype,
        device=query_states.device,
    )
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, modeling_bart.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.out_proj(attn_output), attn_weights


def patches():
    """What the patcher installs for these families."""
    return [(modeling_bart.BartAttention, "forward", attention_wrapper(attention_forward))]
