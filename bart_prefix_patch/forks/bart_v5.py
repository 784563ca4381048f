"""Fork of ``BartAttention.forward`` for transformers 5.0 - 5.24 (families D, E, E2).

Upstream shape: one attention class dispatching through
``ALL_ATTENTION_FUNCTIONS``; ``EncoderDecoderCache`` with ``is_updated``;
layers pass keyword arguments straight through to the attention. The
families differ in three small places, each an explicit branch below:

* the cache argument: ``cache`` in 5.24 (``past_key_values`` is a
  deprecated alias), ``past_key_values`` in 5.0 - 5.23; the fork accepts both;
* ``cache.update``: 5.0 - 5.3 (D) take explicit ``output_attentions`` and
  ``cache_position`` arguments and hand ``{"cache_position": ...}`` (``None``
  for cross-attention) to the cache; 5.4 - 5.23 (E) pass nothing; 5.24 (E2)
  passes ``kwargs=kwargs``;
* the attention function: 5.0.0 indexes ``ALL_ATTENTION_FUNCTIONS`` itself,
  5.1+ asks ``ALL_ATTENTION_FUNCTIONS.get_interface``.

The layers need no fork here: each decoder layer hands the same keyword
arguments to self- and cross-attention, and the attention fork tells the
sites apart itself. On D the layers return tuples and collect the attention
weights the fork returns (prefix columns included); on 5.4+ the weights are
recorded by hooks on the attention module. Gradient checkpointing re-runs
the layer (D: ``GradientCheckpointingLayer.__call__``; 5.24: a per-class
``forward`` wrapper that must stay outermost, which a layer fork would
break) through ``_gradient_checkpointing_func``, which ``_state`` binds to
the call's prefix.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ._common import attention_wrapper, prefixed_keys_values
from ._decoding import decoding_step, plain_attention, split_attention, splits_scores
from ._masks import prefixed_mask

FAMILIES = ("D", "E", "E2")


@dataclass(frozen=True)
class _Upstream:
    """Which family's small differences apply, read from the upstream code itself.

    Attributes:
        cache_position_to_update: D (5.0 - 5.3): ``cache_position`` is an
            argument and goes to ``cache.update``.
        kwargs_to_update: E2 (5.24+): the argument is named ``cache`` and
            ``cache.update`` receives ``kwargs=kwargs``.
        has_get_interface: 5.1+ ask ``ALL_ATTENTION_FUNCTIONS.get_interface``;
            5.0.0 indexes the registry for anything but eager.
        eager_attention_forward: The modeling module's own eager attention function.
    """

    cache_position_to_update: bool
    kwargs_to_update: bool
    has_get_interface: bool
    eager_attention_forward: Callable

    @classmethod
    def of(cls, attention: type, module: ModuleType) -> "_Upstream":
        # inspect.signature follows __wrapped__, so this holds after apply() too.
        parameters = inspect.signature(attention.forward).parameters
        return cls(
            cache_position_to_update="cache_position" in parameters,
            kwargs_to_update="cache" in parameters,
            has_get_interface=hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"),
            eager_attention_forward=module.eager_attention_forward,
        )


def attention_forward(
    self,
    hidden_states,
    key_value_states=None,
    cache=None,
    attention_mask=None,
    *,
    prefix_kv,
    upstream: _Upstream,
    past_key_values=None,
    **kwargs,
):
    """``BartAttention.forward`` with a key/value prefix (upstream 5.0 - 5.24).

    Differences from upstream are marked ``DIFF``; the family branches
    (the fields of ``upstream``) each follow one family's upstream line by line.
    On D, ``output_attentions`` arrives in ``kwargs`` and reaches the
    attention function through them, as upstream passes it explicitly.
    """
    if cache is None:  # DIFF: 5.0 - 5.23 spell the argument past_key_values
        cache = past_key_values
    is_cross_attention = key_value_states is not None
    cache_position = None  # bound on every family: torch.compile cannot trace a closure over an unset cell
    if upstream.cache_position_to_update:
        # D: cache_position is a named upstream argument, used for the cache
        # update only (never passed on to the attention function).
        cache_position = kwargs.pop("cache_position", None)
    input_shape = hidden_states.shape[:-1]
    query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)

    def update(layer_cache, key_states, value_states, is_cross_attention):
        if upstream.cache_position_to_update:  # D
            cache_kwargs = {"cache_position": None if is_cross_attention else cache_position}
            return layer_cache.update(key_states, value_states, self.layer_idx, cache_kwargs)
        if upstream.kwargs_to_update:  # E2
            return layer_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        return layer_cache.update(key_states, value_states, self.layer_idx)  # E

    implementation = self.config._attn_implementation
    # DIFF (speed): a one-query CPU decoding step skips the keys/values join (see _decoding.decoding_step).
    step = decoding_step(self, query_states, cache, prefix_kv, implementation)
    split = step and not is_cross_attention and splits_scores(prefix_kv)
    # DIFF: keys/values are [prefix ; real] (see prefixed_keys_values); real only where split.
    key_states, value_states = prefixed_keys_values(
        self, hidden_states, key_value_states, cache, prefix_kv, update, join=not split
    )
    if split:
        attn_output, attn_weights = split_attention(
            query_states, key_states, value_states, prefix_kv, attention_mask, self.scaling
        )
        attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        # As upstream: eager returns the probabilities (prefix columns included), sdpa None.
        return self.out_proj(attn_output), attn_weights if implementation == "eager" else None

    # DIFF: the mask gains always-visible prefix columns (see prefixed_mask).
    attention_mask = prefixed_mask(
        attention_mask,
        n_prefix=prefix_kv[0].shape[2],
        query_len=query_states.shape[2],
        key_len=key_states.shape[2],
        causal=self.is_causal and not is_cross_attention,
        boolean=implementation == "sdpa",
        dtype=query_states.dtype,
        device=query_states.device,
        visible=prefix_kv.visible,  # DIFF: per-row prefix lengths of a stacked prefix (None: all visible)
    )
    if step and is_cross_attention and implementation == "sdpa":
        # DIFF (speed): a CPU decoding step of cross-attention, in plain matmuls (see decoding_step).
        attn_output = plain_attention(
            query_states, key_states, value_states, attention_mask, self.scaling, keep=prefix_kv
        )
        attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), None
    if upstream.has_get_interface:  # 5.1+
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, upstream.eager_attention_forward)
    else:  # 5.0.0
        attention_interface = upstream.eager_attention_forward
        if implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[implementation]
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


def traceable(module: ModuleType, prefix: str) -> bool:
    """Whether a traced call's state reaches this module's attention forks as a keyword argument.

    From 5.4 on every layer takes ``**kwargs`` and hands them to its attention
    (and the stacks to their layers), so ``_state.STATE_KWARG`` travels from the
    entry guard down to the fork and prefixed calls compile under torch.compile.
    5.0 - 5.3 layers take no ``**kwargs`` (the keyword would be dropped, the
    prefix silently lost): there a prefixed call runs eagerly. The pinned
    releases' layer sources are fingerprinted; tests/test_compile_prefix.py and
    tests/test_compile_family.py check the result on each.
    """
    layers = [getattr(module, f"{prefix}{kind}Layer", None) for kind in ("Encoder", "Decoder")]
    return all(
        layer is not None
        and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(layer.forward).parameters.values())
        for layer in layers
    )


def patches(module: ModuleType, prefix: str) -> list[tuple[type, str, Callable]]:
    """What the patcher installs for a model family's module on these releases.

    Args:
        module: The family's modeling module (e.g. ``transformers.models.bart.modeling_bart``).
        prefix: Its class-name prefix (e.g. ``"Bart"``).
    """
    attention = getattr(module, f"{prefix}Attention")
    fork = functools.partial(attention_forward, upstream=_Upstream.of(attention, module))
    return [(attention, "forward", attention_wrapper(fork))]
