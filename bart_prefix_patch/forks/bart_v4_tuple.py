"""Forks of the BART attention classes for transformers 4.44 - 4.51 (families A1, A2).

Upstream shape: three attention classes, ``BartAttention`` (eager),
``BartSdpaAttention`` and ``BartFlashAttention2``, picked per layer through
``BART_ATTENTION_CLASSES[config._attn_implementation]`` when the model is
built, each with its own ``forward``. Caches are legacy tuples: one
``(self_k, self_v, cross_k, cross_v)`` per decoder layer; the decoder layer
hands ``past_key_value[:2]`` to self-attention and ``past_key_value[-2:]`` to
cross-attention, and each attention returns ``(output, weights, present)``
with ``present = (keys, values)`` to be cached. Masks are 4-D additive float
masks for eager and sdpa alike (``None`` where sdpa may rely on
``is_causal`` or there is no padding).

The upstream forwards of all these releases are identical (the gate's
fingerprints check it). Upstream reuses a cached cross-attention past only
when its length equals the encoder length (an old prefix-tuning hook), so a
cached ``[prefix ; encoder]`` would be recomputed without the prefix at
every step; the fork drops that length test.

The decoder layer needs no fork: self- and cross-attention are separate
modules with their own prefix slice, and the attention fork tells the sites
apart by ``key_value_states``. The cross cache is not reordered by
``_reorder_cache`` in beam search, which is fine: within one example every
beam holds the same ``[prefix ; encoder]`` rows (a per-example prefix is
repeated per beam like the encoder output).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable

import torch

from ..errors import UnsupportedConfigurationError
from ._common import attention_wrapper, concat_prefix as _cat, eager_attention_bmm, join_cached as _join
from ._masks import prefixed_mask

FAMILIES = ("A1", "A2")


def _keys_values(self, hidden_states, key_value_states, past_key_value, prefix_kv):
    """The key/value block shared by upstream's eager and sdpa forwards, with a prefix.

    Returns:
        ``(key_states, value_states, present)``: keys/values of shape
        ``(bsz, heads, prefix + keys, head_dim)`` for the attention, and the
        ``(keys, values)`` pair to cache (``None`` in the encoder, as
        upstream).
    """
    is_cross_attention = key_value_states is not None
    bsz = hidden_states.shape[0]
    prefix_key, prefix_value = prefix_kv
    # DIFF: no `past_key_value[0].shape[2] == key_value_states.shape[1]` test: a
    # cached cross past holds [prefix ; encoder] (longer than the encoder) and
    # is reused as it is, never recomputed and never replacing the encoder.
    if is_cross_attention and past_key_value is not None:
        # reuse k,v, cross_attentions
        key_states = past_key_value[0]
        value_states = past_key_value[1]
    elif is_cross_attention:
        # cross_attentions
        key_states = self._shape(self.k_proj(key_value_states), -1, bsz)
        value_states = self._shape(self.v_proj(key_value_states), -1, bsz)
        # DIFF: the cross prefix is concatenated with the encoder projections
        # and cached together with them (below), so generation computes both
        # once per generate() call.
        key_states = _cat(prefix_key, key_states)
        value_states = _cat(prefix_value, value_states)
    else:
        # self_attention; upstream's "reuse k, v, self_attention" when a past exists
        key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
        value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
        # DIFF: [prefix ; past ; new] in one concatenation (upstream: [past ; new]),
        # and the cache entry is the view of its real part, so the cache (hence
        # positions and generate()'s bookkeeping) holds real tokens only while
        # each step copies the cached keys once, as upstream does.
        cached_keys, cached_values = (None, None) if past_key_value is None else past_key_value[:2]
        key_states = _join(prefix_key, cached_keys, key_states)
        value_states = _join(prefix_value, cached_values, value_states)
        if self.is_decoder:
            n_prefix = prefix_key.shape[2]
            past_key_value = (key_states[:, :, n_prefix:], value_states[:, :, n_prefix:])
        return key_states, value_states, past_key_value

    past_key_value = (key_states, value_states)  # cross-attention: always a decoder's
    return key_states, value_states, past_key_value


def _mask(self, attention_mask, query_states, key_states, prefix_kv, is_cross_attention, boolean):
    """The stock mask for ``[prefix ; keys]`` (see ``prefixed_mask``).

    Args:
        boolean: Build a boolean mask where one is built from scratch (sdpa);
            the eager path adds the mask to the scores, so it needs an
            additive one.
    """
    # DIFF: the mask gains always-visible prefix columns (see prefixed_mask).
    return prefixed_mask(
        attention_mask,
        n_prefix=prefix_kv[0].shape[2],
        query_len=query_states.shape[-2],
        key_len=key_states.shape[-2],
        causal=self.is_causal and not is_cross_attention,
        boolean=boolean,
        dtype=query_states.dtype,
        device=query_states.device,
        visible=prefix_kv.visible,  # DIFF: per-row prefix lengths of a stacked prefix (None: all visible)
    )


def attention_forward(
    self,
    hidden_states,
    key_value_states=None,
    past_key_value=None,
    attention_mask=None,
    layer_head_mask=None,
    output_attentions=False,
    *,
    prefix_kv,
):
    """``BartAttention.forward`` (eager) with a key/value prefix (upstream 4.44 - 4.51).

    Differences from upstream are marked ``DIFF``. ``layer_head_mask``
    multiplies the attention probabilities of every key, prefix columns
    included, and ``output_attentions`` returns weights over
    ``[prefix ; keys]``.
    """
    is_cross_attention = key_value_states is not None

    bsz, tgt_len, _ = hidden_states.size()

    # get query proj
    query_states = self.q_proj(hidden_states) * self.scaling
    # DIFF: the key/value block (with the prefix) is shared with the sdpa fork.
    key_states, value_states, past_key_value = _keys_values(
        self, hidden_states, key_value_states, past_key_value, prefix_kv
    )

    query_states = self._shape(query_states, tgt_len, bsz)
    built = attention_mask is None
    attention_mask = _mask(  # DIFF: prefix columns (and a causal mask where upstream had none)
        self, attention_mask, query_states, key_states, prefix_kv, is_cross_attention, boolean=False
    )
    src_len = key_states.shape[-2]
    if attention_mask is not None and not built and attention_mask.size() != (bsz, 1, tgt_len, src_len):
        raise ValueError(
            f"Attention mask should be of size {(bsz, 1, tgt_len, src_len)}, but is {attention_mask.size()}"
        )
    attn_output, attn_weights_reshaped = eager_attention_bmm(
        self, query_states, key_states, value_states, attention_mask, layer_head_mask, output_attentions
    )
    return attn_output, attn_weights_reshaped, past_key_value


def sdpa_attention_forward(
    self,
    hidden_states,
    key_value_states=None,
    past_key_value=None,
    attention_mask=None,
    layer_head_mask=None,
    output_attentions=False,
    *,
    prefix_kv,
    logger,
):
    """``BartSdpaAttention.forward`` with a key/value prefix (upstream 4.44 - 4.51).

    Differences from upstream are marked ``DIFF``.
    """
    if output_attentions or layer_head_mask is not None:
        logger.warning_once(  # upstream's text, so that warning_once shows it once in all
            "BartModel is using BartSdpaAttention, but `torch.nn.functional.scaled_dot_product_attention` does not "
            "support `output_attentions=True` or `layer_head_mask` not None. Falling back to the manual attention"
            " implementation, but specifying the manual implementation will be required from Transformers version "
            'v5.0.0 onwards. This warning can be removed using the argument `attn_implementation="eager"` when '
            "loading the model."
        )
        # DIFF: upstream calls super().forward; the eager fork is called directly
        # with this call's prefix, so the prefix is applied exactly once.
        return attention_forward(
            self,
            hidden_states,
            key_value_states=key_value_states,
            past_key_value=past_key_value,
            attention_mask=attention_mask,
            layer_head_mask=layer_head_mask,
            output_attentions=output_attentions,
            prefix_kv=prefix_kv,
        )

    is_cross_attention = key_value_states is not None

    bsz, tgt_len, _ = hidden_states.size()

    # get query proj
    query_states = self.q_proj(hidden_states)
    # DIFF: the key/value block (with the prefix) is shared with the eager fork.
    key_states, value_states, past_key_value = _keys_values(
        self, hidden_states, key_value_states, past_key_value, prefix_kv
    )

    query_states = self._shape(query_states, tgt_len, bsz)
    attention_mask = _mask(  # DIFF: prefix columns (and a causal mask where upstream had none)
        self, attention_mask, query_states, key_states, prefix_kv, is_cross_attention, boolean=True
    )

    # DIFF: never is_causal=True: PyTorch aligns it top-left, so with prefix
    # columns a query would see prefix keys instead of itself. Where causality
    # matters (q_len > 1), _mask has built an explicit bottom-right mask.
    is_causal = False

    attn_output = torch.nn.functional.scaled_dot_product_attention(
        query_states,
        key_states,
        value_states,
        attn_mask=attention_mask,
        dropout_p=self.dropout if self.training else 0.0,
        is_causal=is_causal,
    )

    if attn_output.size() != (bsz, self.num_heads, tgt_len, self.head_dim):
        raise ValueError(
            f"`attn_output` should be of size {(bsz, self.num_heads, tgt_len, self.head_dim)}, but is"
            f" {attn_output.size()}"
        )

    attn_output = attn_output.transpose(1, 2)
    attn_output = attn_output.reshape(bsz, tgt_len, self.embed_dim)

    attn_output = self.out_proj(attn_output)

    return attn_output, None, past_key_value


def flash_attention_forward(self, *args, prefix_kv, **kwargs):
    """``BartFlashAttention2.forward`` with a prefix: refused.

    The entry guards already refuse a model whose config says
    ``flash_attention_2``; this catches flash modules in a model whose config
    was changed after it was built (4.x picks the class at construction), so
    that a prefix is never silently ignored.
    """
    raise UnsupportedConfigurationError(
        "prefixes run with attn_implementation 'eager' or 'sdpa', but this BART layer uses "
        f"{type(self).__name__} (flash_attention_2): load the model with attn_implementation='sdpa'"
    )


def patches(module: ModuleType, prefix: str) -> list[tuple[type, str, Callable]]:
    """What the patcher installs for a model family's module on these releases.

    Args:
        module: The family's modeling module (e.g. ``transformers.models.bart.modeling_bart``).
        prefix: Its class-name prefix (e.g. ``"Bart"``).
    """
    forks = {
        "Attention": attention_forward,
        "SdpaAttention": functools.partial(sdpa_attention_forward, logger=module.logger),
        "FlashAttention2": flash_attention_forward,
    }
    return [
        (getattr(module, prefix + suffix), "forward", attention_wrapper(fork))
        for suffix, fork in forks.items()
        if hasattr(module, prefix + suffix)
    ]
