"""Attention of a one-query decoding step with a prefix, without joining the prefix to the keys.

On the CPU, decoding steps spend what a prefix costs them mostly on copies and
on sdpa's key blocks, not on arithmetic (docs/benchmarks.md, section 6): the
self-attention join ``[prefix ; cache ; new]`` re-copies the prefix rows with
the whole cache on every step of every layer, and PyTorch's CPU sdpa kernel
charges the prefix's few extra cross-attention keys a whole partial block.
The forks route such steps here (see :func:`decoding_step`); every other call
keeps the joined keys/values and the stock attention functions.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import in_dtype_of

#: Bytes of a decoder self-attention prefix's keys and values (at the runtime batch) from which a
#: CPU decoding step joins the scores (:func:`split_attention`) instead of the keys/values: 0,
#: every prefix. Timed alone in a tight loop, small prefixes looked faster joined (batch 1,
#: 20 tokens); inside greedy generate() the split was faster at batch 1, 2 and 4 (docs/benchmarks.md,
#: section 6, "Joined keys or joined scores: tried by size, kept the split"). Tests raise it to
#: run the join, the path of other devices, on the CPU.
SPLIT_MIN_BYTES = 0


def decoding_step(self, query_states: torch.Tensor, cache, prefix_kv, implementation: str) -> bool:
    """Whether this call is a CPU decoding step that the attention below serves faster than the stock kernels.

    One query with a cache, in eval mode (no attention dropout), on the CPU,
    with eager or sdpa attention and a non-empty prefix. Decoder
    self-attention then joins the prefix (:func:`splits_scores`) to the
    scores, not the keys/values (:func:`split_attention`): joining the keys
    re-copies the prefix rows with the whole cache on every step of every
    layer. Cross-attention runs :func:`plain_attention` over its cached ``[prefix ; encoder]`` keys,
    where the sdpa kernel charges the prefix's few extra keys a whole
    partial block. Both measured in docs/benchmarks.md (section 6); other
    devices keep the stock kernels, which these were not measured against.
    """
    return (
        cache is not None
        and query_states.shape[2] == 1
        and query_states.is_cpu  # a property read: this runs in every attention call of every step
        and not self.training
        and implementation in ("eager", "sdpa")
        and prefix_kv[0].shape[2] > 0
    )


def splits_scores(prefix_kv) -> bool:
    """Whether a decoder self-attention decoding step with this prefix runs :func:`split_attention`.

    The joined keys/values copy the prefix (its bytes at the runtime batch:
    batch, length, width, dtype) on every step; the split runs a few more
    small operators. At or above :data:`SPLIT_MIN_BYTES` (by default every
    prefix) the split is taken.
    """
    key = prefix_kv[0]
    return 2 * key.numel() * key.element_size() >= SPLIT_MIN_BYTES


def plain_attention(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """Softmax attention in plain matmuls, with a boolean or additive mask over every key.

    What sdpa computes, in the eager math; on the CPU it is faster than the
    sdpa kernel for one query over a few hundred keys that are not a
    multiple of its key block.

    Returns:
        ``(batch, heads, queries, head_dim)``.
    """
    scores = torch.matmul(query_states * scaling, key_states.transpose(2, 3))
    if attention_mask is not None:
        scores = _masked(scores, attention_mask)
    return torch.matmul(_softmax(scores), value_states)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype in (torch.float16, torch.bfloat16):  # as sdpa's CPU kernel: the softmax in float32
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.logical_not(), torch.finfo(scores.dtype).min)
    return scores + mask


def split_attention(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    prefix_kv: tuple[torch.Tensor, torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    head_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``[prefix ; keys]`` without concatenating the keys/values.

    The scores of the prefix and of the real keys are computed apart and
    joined (a few columns per query), one softmax runs over both, and the
    output is the sum of the two weighted value sums: the same attention as
    over the joined keys/values, whose concatenation would copy the prefix
    and every cached key. A prefix shared by every row (batch 1, or
    expanded from it) meets all the rows' queries in one matmul per head
    instead of being broadcast over the batch.

    Args:
        query_states: ``(batch, heads, queries, head_dim)``, before ``scaling``.
        key_states: ``(batch, heads, keys, head_dim)``, the real keys.
        value_states: Like ``key_states``.
        prefix_kv: The prefix's ``(batch or 1, heads, prefix_len, head_dim)``
            keys and values (a ``PrefixKV``; its ``visible`` rows, if any,
            hide prefix columns per row).
        attention_mask: ``None`` or the stock 4-D mask (boolean "may attend"
            or additive float) over the real keys, or over prefix and real
            keys together.
        scaling: Multiplies the scores.
        head_mask: ``(heads,)`` multiplying the probabilities (4.x eager).

    Returns:
        ``(output (batch, heads, queries, head_dim), probabilities (batch,
        heads, queries, prefix_len + keys))``.
    """
    prefix_key, prefix_value = prefix_kv
    n_prefix, n_keys = prefix_key.shape[2], key_states.shape[2]
    prefix_key, prefix_value = in_dtype_of(prefix_key, query_states), in_dtype_of(prefix_value, query_states)
    if scaling != 1.0:  # scaling the query (one row) is cheaper than scaling the scores
        query_states = query_states * scaling
    shared = prefix_key.shape[0] == 1 or prefix_key.stride(0) == 0
    if shared:  # the batch becomes the query axis: (queries, heads, batch, d) @ (1, heads, d, prefix_len)
        prefix_key, prefix_value = prefix_key[:1], prefix_value[:1]
        prefix_scores = torch.matmul(query_states.transpose(0, 2), prefix_key.transpose(2, 3)).transpose(0, 2)
    else:
        prefix_scores = torch.matmul(query_states, prefix_key.transpose(2, 3))
    scores = torch.matmul(query_states, key_states.transpose(2, 3))
    visible = getattr(prefix_kv, "visible", None)
    if visible is not None:
        prefix_scores = _masked(prefix_scores, visible.to(prefix_scores.device)[:, None, None, :])
    whole_mask = attention_mask is not None and attention_mask.shape[-1] == n_prefix + n_keys
    if attention_mask is not None and not whole_mask:
        if attention_mask.shape[-1] != n_keys:
            raise RuntimeError(
                f"attention mask covers {attention_mask.shape[-1]} keys, expected {n_keys} or {n_prefix + n_keys} "
                f"({n_prefix} prefix columns)"
            )
        scores = _masked(scores, attention_mask)
    scores = torch.cat([prefix_scores, scores], dim=-1)
    if whole_mask:
        scores = _masked(scores, attention_mask)
    weights = _softmax(scores)
    if head_mask is not None:
        weights = head_mask.view(1, -1, 1, 1) * weights
    prefix_weights = weights[..., :n_prefix]
    if shared:
        prefix_output = torch.matmul(prefix_weights.transpose(0, 2), prefix_value).transpose(0, 2)
    else:
        prefix_output = torch.matmul(prefix_weights, prefix_value)
    return torch.matmul(weights[..., n_prefix:], value_states) + prefix_output, weights
