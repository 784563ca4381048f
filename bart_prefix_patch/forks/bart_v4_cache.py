"""Forks of the BART attention for transformers 4.52 - 4.57 (families B and C).

Upstream shapes served here, all with an ``EncoderDecoderCache`` whose
``is_updated`` flags say when a layer's cross-attention keys/values are
cached (4.x before 4.52 instead reused a cross past only when its length
equalled the encoder's; that length test is gone from these releases):

* **B** (4.52): three attention classes with forwards of their own,
  ``BartAttention`` (eager), ``BartSdpaAttention`` (falls back to the eager
  forward for ``output_attentions``) and ``BartFlashAttention2``; cached
  cross keys/values are read as ``key_cache[idx]``; the forward returns
  ``(out, weights, past_key_value)``.
* **C** (4.53 - 4.57): one ``BartAttention`` dispatching through
  ``ALL_ATTENTION_FUNCTIONS``. Inside the family the forward changes three
  times: 4.54 reads the cache as ``layers[idx].keys`` (4.53:
  ``key_cache[idx]``) and returns ``(out, weights)`` (4.53 also returns the
  cache); 4.56 renames the ``past_key_value`` argument ``past_key_values``;
  4.57 initialises ``is_updated`` and marks it only on an
  ``EncoderDecoderCache``.

One fork handles every variant with feature checks, not version strings: the
cache layout is read off the cache object, the argument name is accepted in
both spellings, and the return arity is read off the upstream function
(:func:`_upstream_returns_cache`). Head masks still exist in all of these
releases; the eager paths apply them to the prefix columns too.

The decoder layer needs no fork: it hands the same arguments to self- and
cross-attention (cross-attention gets ``key_value_states``), and the fork
tells the sites apart itself.

The shared key/value block (:func:`_keys_values`) is upstream's cache block,
common to every class and release here, with the prefix ``DIFF`` s added;
its ``view`` shape is written ``(batch, length, -1, head_dim)``, which is
what both upstream spellings (B: ``(bsz, -1, num_heads, head_dim)``, C:
``kv_input_shape``) produce.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from ..errors import UnsupportedConfigurationError
from ._common import attention_wrapper, eager_attention_bmm, prefixed_keys_values
from ._decoding import decoding_step, plain_attention, split_attention, splits_scores
from ._masks import prefixed_mask

FAMILIES = ("B", "C")


def _upstream_returns_cache(attention: type) -> bool:
    """Whether upstream ``XAttention.forward`` returns ``(out, weights, cache)``.

    True for 4.52 and 4.53, False from 4.54 on, where it returns
    ``(out, weights)``. Read from the upstream code itself (the last
    ``return`` of the unwrapped function), so the fork returns what the
    installed decoder layer unpacks.
    """
    function = inspect.unwrap(attention.forward)
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    returns = [node.value for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value is not None]
    return bool(returns) and isinstance(returns[-1], ast.Tuple) and len(returns[-1].elts) == 3


@dataclass(frozen=True)
class _Upstream:
    """What the family C fork reads off the upstream module.

    Attributes:
        returns_cache: See :func:`_upstream_returns_cache`.
        eager_attention_forward: The module's eager attention function.
        attention_functions: The module's ``ALL_ATTENTION_FUNCTIONS``.
    """

    returns_cache: bool
    eager_attention_forward: Callable
    attention_functions: Any


# ------------------------------------------------------------------ helpers


def _keys_values(self, hidden_states, key_value_states, cache, cache_position, prefix_kv, join=True):
    """Keys/values ``[prefix ; real]`` of one call (see ``prefixed_keys_values``)."""

    def update(layer_cache, key_states, value_states, is_cross_attention):
        cache_kwargs = {"cache_position": None if is_cross_attention else cache_position}
        return layer_cache.update(key_states, value_states, self.layer_idx, cache_kwargs)

    return prefixed_keys_values(self, hidden_states, key_value_states, cache, prefix_kv, update, join=join)


def _mask(self, attention_mask, prefix_kv, query_len, key_len, is_cross_attention, boolean, dtype, device):
    """The stock mask cut to the real keys, then given the prefix columns.

    The cut is upstream's own ``mask[..., :key_len]`` (4.52's classes and the
    sdpa interface slice the mask to the keys) taken over the real keys only,
    before :func:`prefixed_mask` prepends the always-visible prefix columns
    (or builds the explicit causal mask where the stock code relies on
    ``is_causal``).
    """
    n_prefix = prefix_kv[0].shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key_len - n_prefix]
    return prefixed_mask(
        attention_mask,
        n_prefix=n_prefix,
        query_len=query_len,
        key_len=key_len,
        causal=self.is_causal and not is_cross_attention,
        boolean=boolean,
        dtype=dtype,
        device=device,
        visible=prefix_kv.visible,  # DIFF: per-row prefix lengths of a stacked prefix (None: all visible)
    )


# --------------------------------------------------------- family B (4.52)


def eager_forward(
    self,
    hidden_states,
    key_value_states=None,
    past_key_value=None,
    attention_mask=None,
    layer_head_mask=None,
    output_attentions=False,
    cache_position=None,
    *,
    prefix_kv,
):
    """``BartAttention.forward`` (eager, 4.52) with a key/value prefix.

    Differences from upstream are marked ``DIFF``.
    """
    is_cross_attention = key_value_states is not None
    bsz, tgt_len, _ = hidden_states.size()

    query_states = self.q_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
    query_states = query_states * self.scaling
    # DIFF: keys/values are [prefix ; real] (see _keys_values).
    key_states, value_states = _keys_values(
        self, hidden_states, key_value_states, past_key_value, cache_position, prefix_kv
    )

    # DIFF: the mask gains always-visible prefix columns (upstream only sliced it to the keys).
    attention_mask = _mask(
        self, attention_mask, prefix_kv, tgt_len, key_states.shape[-2], is_cross_attention,
        boolean=False, dtype=query_states.dtype, device=query_states.device,
    )
    attn_output, attn_weights_reshaped = eager_attention_bmm(
        self, query_states, key_states, value_states, attention_mask, layer_head_mask, output_attentions
    )
    return attn_output, attn_weights_reshaped, past_key_value


def sdpa_forward(
    self,
    hidden_states,
    key_value_states=None,
    past_key_value=None,
    attention_mask=None,
    layer_head_mask=None,
    output_attentions=False,
    cache_position=None,
    *,
    prefix_kv,
    logger,
):
    """``BartSdpaAttention.forward`` (4.52) with a key/value prefix.

    Differences from upstream are marked ``DIFF``. Like upstream, the sdpa
    path ignores ``layer_head_mask`` (and the ``output_attentions`` fallback
    does not pass it on).
    """
    if output_attentions:
        logger.warning_once(
            "BartSdpaAttention does not support `output_attentions=True`; falling back to the eager attention."
        )
        # DIFF: upstream calls super().forward(); the eager fork is called
        # directly, so the prefix is applied exactly once, by this call.
        return eager_forward(
            self,
            hidden_states,
            key_value_states=key_value_states,
            past_key_value=past_key_value,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            cache_position=cache_position,
            prefix_kv=prefix_kv,
        )

    is_cross_attention = key_value_states is not None
    bsz, tgt_len, _ = hidden_states.size()

    query_states = self.q_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
    # DIFF: keys/values are [prefix ; real] (see _keys_values).
    key_states, value_states = _keys_values(
        self, hidden_states, key_value_states, past_key_value, cache_position, prefix_kv
    )

    # DIFF: the mask gains always-visible prefix columns; where upstream would
    # leave None and use is_causal, an explicit bottom-right causal mask is built.
    causal_mask = _mask(
        self, attention_mask, prefix_kv, tgt_len, key_states.shape[-2], is_cross_attention,
        boolean=True, dtype=query_states.dtype, device=query_states.device,
    )

    # Memory-efficient sdpa is bugged with non-contiguous inputs and a custom mask (as upstream).
    if query_states.device.type == "cuda" and causal_mask is not None:
        query_states = query_states.contiguous()
        key_states = key_states.contiguous()
        value_states = value_states.contiguous()

    attn_output = torch.nn.functional.scaled_dot_product_attention(
        query_states,
        key_states,
        value_states,
        attn_mask=causal_mask,
        dropout_p=self.dropout if self.training else 0.0,
        is_causal=False,  # DIFF: PyTorch aligns is_causal top-left, wrong with prefix columns
    )

    attn_output = attn_output.transpose(1, 2).contiguous()
    attn_output = attn_output.view(bsz, tgt_len, self.embed_dim)
    attn_output = self.out_proj(attn_output)
    return attn_output, None, past_key_value


def flash_forward(self, hidden_states, *args, prefix_kv, **kwargs):
    """``BartFlashAttention2.forward`` (4.52) with a prefix: refused.

    The entry guards already refuse ``config._attn_implementation ==
    "flash_attention_2"``; this catches flash layers behind a config that was
    changed after the model was built, which would otherwise drop the prefix.
    """
    raise UnsupportedConfigurationError(
        "prefixes run with attn_implementation 'eager' or 'sdpa', but this model's layers are "
        "BartFlashAttention2: load the model with attn_implementation='sdpa'"
    )


# --------------------------------------------------- family C (4.53 - 4.57)


def attention_forward(
    self,
    hidden_states,
    key_value_states=None,
    past_key_value=None,
    attention_mask=None,
    layer_head_mask=None,
    output_attentions=False,
    cache_position=None,
    *,
    prefix_kv,
    upstream: _Upstream,
    past_key_values=None,
    **kwargs,
):
    """``BartAttention.forward`` (4.53 - 4.57) with a key/value prefix.

    Differences from upstream are marked ``DIFF``.
    """
    # DIFF: 4.56+ spell the argument past_key_values, 4.53 - 4.55 past_key_value; both are accepted.
    cache = past_key_values if past_key_values is not None else past_key_value
    is_cross_attention = key_value_states is not None
    bsz, tgt_len = hidden_states.shape[:-1]

    query_states = self.q_proj(hidden_states).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
    implementation = self.config._attn_implementation
    # DIFF (speed): a one-query CPU decoding step skips the keys/values join (see _decoding.decoding_step).
    step = decoding_step(self, query_states, cache, prefix_kv, implementation)
    split = step and not is_cross_attention and splits_scores(prefix_kv)
    # DIFF: keys/values are [prefix ; real] (see _keys_values); real only where split.
    key_states, value_states = _keys_values(
        self, hidden_states, key_value_states, cache, cache_position, prefix_kv, join=not split
    )
    if split:
        if attention_mask is not None and attention_mask.dim() == 4:  # upstream's cut to the (real) keys
            attention_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        eager = implementation == "eager"  # as upstream: sdpa ignores the head mask and returns no weights
        attn_output, attn_weights = split_attention(
            query_states, key_states, value_states, prefix_kv, attention_mask, self.scaling,
            head_mask=layer_head_mask if eager else None,
        )
        attn_output = self.out_proj(attn_output.transpose(1, 2).reshape(bsz, tgt_len, -1).contiguous())
        attn_weights = attn_weights if eager else None
        if upstream.returns_cache:
            return attn_output, attn_weights, cache
        return attn_output, attn_weights

    # DIFF: the mask gains always-visible prefix columns; where upstream would
    # leave None and let sdpa use is_causal, an explicit causal mask is built.
    attention_mask = _mask(
        self, attention_mask, prefix_kv, tgt_len, key_states.shape[-2], is_cross_attention,
        boolean=implementation == "sdpa", dtype=query_states.dtype, device=query_states.device,
    )

    if step and is_cross_attention and implementation == "sdpa":
        # DIFF (speed): a CPU decoding step of cross-attention, in plain matmuls (see decoding_step).
        attn_output = plain_attention(
            query_states, key_states, value_states, attention_mask, self.scaling, keep=prefix_kv
        )
        attn_output = self.out_proj(attn_output.transpose(1, 2).reshape(bsz, tgt_len, -1).contiguous())
        return (attn_output, None, cache) if upstream.returns_cache else (attn_output, None)

    attention_interface = upstream.eager_attention_forward
    if implementation != "eager":
        attention_interface = upstream.attention_functions[implementation]

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.dropout,
        scaling=self.scaling,
        output_attentions=output_attentions,
        head_mask=layer_head_mask,
        **kwargs,
    )

    attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
    attn_output = self.out_proj(attn_output)
    if upstream.returns_cache:  # 4.53 returns the cache too, 4.54+ do not
        return attn_output, attn_weights, cache
    return attn_output, attn_weights


def patches(module: ModuleType, prefix: str) -> list[tuple[type, str, Callable]]:
    """What the patcher installs for a model family's module on these releases.

    Args:
        module: The family's modeling module (e.g. ``transformers.models.bart.modeling_bart``).
        prefix: Its class-name prefix (e.g. ``"Bart"``).
    """
    attention = getattr(module, f"{prefix}Attention")
    if not hasattr(module, "eager_attention_forward"):
        # Family B: one attention class per implementation, each with its own forward (models
        # without sdpa or flash support on this release have only the eager class).
        forks = {
            "Attention": eager_forward,
            "SdpaAttention": functools.partial(sdpa_forward, logger=module.logger),
            "FlashAttention2": flash_forward,
        }
        return [
            (getattr(module, prefix + suffix), "forward", attention_wrapper(fork))
            for suffix, fork in forks.items()
            if hasattr(module, prefix + suffix)
        ]
    upstream = _Upstream(
        returns_cache=_upstream_returns_cache(attention),
        eager_attention_forward=module.eager_attention_forward,
        attention_functions=module.ALL_ATTENTION_FUNCTIONS,
    )
    return [(attention, "forward", attention_wrapper(functools.partial(attention_forward, upstream=upstream)))]
