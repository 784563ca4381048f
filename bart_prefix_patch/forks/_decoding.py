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

from .._state import PrefixKV
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
    keep: Optional[PrefixKV] = None,
) -> torch.Tensor:
    """Softmax attention in plain matmuls, with a boolean or additive mask over every key.

    What sdpa computes, in the eager math; on the CPU it is faster than the
    sdpa kernel for one query over a few hundred keys that are not a
    multiple of its key block. The products are ``bmm`` over ``batch *
    heads`` rows: at one query, what these small operators cost is mostly
    dispatch, paid on every step of every layer.

    Args:
        keep: The module's :class:`PrefixKV` of this call, on which the keys'
            and values' ``bmm`` operands are kept between steps:
            cross-attention attends to the same cached tensors on every step.
            None: prepared on every call.

    Returns:
        ``(batch, heads, queries, head_dim)``.
    """
    batch, heads, queries, dim = query_states.shape
    keys_t, values, zero = _key_operands(key_states, value_states, batch, heads, keep)
    # The scaling rides on the product (alpha; beta=0 ignores the zero): no operator of its own.
    scores = torch.baddbmm(zero, query_states.reshape(batch * heads, queries, dim), keys_t, beta=0, alpha=scaling)
    if attention_mask is not None:
        scores = _masked_rows(scores, attention_mask, batch)
    return torch.bmm(_softmax(scores), values).view(batch, heads, queries, dim)


def _key_operands(keys: torch.Tensor, values: torch.Tensor, batch: int, heads: int, keep: Optional[PrefixKV]):
    """``(transposed keys, values, zero)`` as ``bmm`` operands for :func:`plain_attention`, kept on ``keep``.

    Kept only while the same key and value tensors come back and the
    operands are views of them (so they follow in-place changes too), and
    not under torch.compile.
    """
    found = getattr(keep, "_key_operands", None)
    if found is not None and found[0] is keys and found[1] is values:
        return found[2]
    rows_k, rows_v = _rows(keys, batch, heads), _rows(values, batch, heads)
    operands = (rows_k.transpose(1, 2), rows_v, values.new_zeros(()))
    if _keeps(keep) and rows_k.data_ptr() == keys.data_ptr() and rows_v.data_ptr() == values.data_ptr():
        keep._key_operands = (keys, values, operands)
    return operands


def _keeps(holder) -> bool:
    """Whether operands may be kept on ``holder`` for later steps: a :class:`PrefixKV`, outside torch.compile.

    A traced call builds its ``PrefixKV`` anew (and cannot trace data
    pointers), so nothing is kept there.
    """
    return isinstance(holder, PrefixKV) and not torch.compiler.is_compiling()


def _rows(states: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``(batch, heads, n, d)`` keys or values as the ``(batch * heads, n, d)`` operand of ``bmm`` (a view when it can be)."""
    # A broadcast operand (batch or heads 1) is expanded first.
    if states.shape[0] != batch or states.shape[1] != heads:
        states = states.expand(batch, heads, -1, -1)
    return states.reshape(batch * heads, states.shape[2], states.shape[3])


def _masked_rows(scores: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`_masked` for ``(batch * heads, queries, n)`` scores and a 4-D mask over ``(batch, heads, queries, n)``."""
    rows, queries, n = scores.shape
    return _masked(scores.view(batch, rows // batch, queries, n), mask).view(rows, queries, n)


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
    and every cached key. A prefix shared by every row (a batch-1 prefix at
    a larger batch) meets all the rows' queries in one product per head
    instead of being broadcast over the batch. The products are ``bmm`` over
    ``batch * heads`` rows, with the prefix's operands prepared once per call
    (:func:`_prefix_operands`): at one query they are small, and what they
    cost is mostly dispatch, paid on every step of every layer.

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
    batch, heads, queries, dim = query_states.shape
    n_keys = key_states.shape[2]
    # Shared: (heads, batch * queries, d) @ (heads, d, prefix_len), the batch folded into the queries.
    shared = batch > 1 and (prefix_kv[0].shape[0] == 1 or prefix_kv[0].stride(0) == 0)
    prefix_keys_t, prefix_values, zero = _prefix_operands(prefix_kv, query_states, shared, scaling)
    n_prefix = prefix_keys_t.shape[-1]
    query = query_states.reshape(batch * heads, queries, dim)
    if shared:
        folded = query.view(batch, heads, queries, dim).transpose(0, 1).reshape(heads, batch * queries, dim)
        prefix_scores = torch.bmm(folded, prefix_keys_t).view(heads, batch, queries, n_prefix).transpose(0, 1)
        prefix_scores = prefix_scores.reshape(batch * heads, queries, n_prefix)
    else:
        prefix_scores = torch.bmm(query, prefix_keys_t)
    # The scaling rides on the product (alpha; beta=0 ignores the zero): no operator of its own.
    scores = torch.baddbmm(zero, query, _rows(key_states, batch, heads).transpose(1, 2), beta=0, alpha=scaling)
    visible = getattr(prefix_kv, "visible", None)
    if visible is not None:
        prefix_scores = _masked_rows(prefix_scores, visible.to(prefix_scores.device)[:, None, None, :], batch)
    whole_mask = attention_mask is not None and attention_mask.shape[-1] == n_prefix + n_keys
    if attention_mask is not None and not whole_mask:
        if attention_mask.shape[-1] != n_keys:
            raise RuntimeError(
                f"attention mask covers {attention_mask.shape[-1]} keys, expected {n_keys} or {n_prefix + n_keys} "
                f"({n_prefix} prefix columns)"
            )
        scores = _masked_rows(scores, attention_mask, batch)
    scores = torch.cat([prefix_scores, scores], dim=-1)
    if whole_mask:
        scores = _masked_rows(scores, attention_mask, batch)
    weights = _softmax(scores)
    if head_mask is not None:
        weights = (head_mask.view(1, -1, 1, 1) * weights.view(batch, heads, queries, -1)).view(batch * heads, queries, -1)
    output = torch.bmm(weights[:, :, n_prefix:], _rows(value_states, batch, heads))
    if shared:
        prefix_weights = weights[:, :, :n_prefix].view(batch, heads, queries, n_prefix).transpose(0, 1)
        prefix_output = torch.bmm(prefix_weights.reshape(heads, batch * queries, n_prefix), prefix_values)
        output = output + prefix_output.view(heads, batch, queries, dim).transpose(0, 1).reshape(batch * heads, queries, dim)
    else:  # the prefix's weighted values added in the same product: one operator fewer
        output = torch.baddbmm(output, weights[:, :, :n_prefix], prefix_values)
    return output.view(batch, heads, queries, dim), weights.view(batch, heads, queries, -1)


def _prefix_operands(prefix_kv, query_states: torch.Tensor, shared: bool, scaling: float):
    """The prefix as ``bmm`` operands for ``query_states``: scaled transposed keys, values, and a zero.

    ``(rows, head_dim, prefix_len)`` keys multiplied by ``scaling`` (so the
    query needs no scaling of its own) and ``(rows, prefix_len, head_dim)``
    values, in the query's dtype: rows are the heads of a shared prefix, else
    ``batch * heads``; the zero is ``baddbmm``'s ignored input. Kept on a
    :class:`PrefixKV` (which ``PrefixState.kv_for`` hands every step of a
    call) so that later steps reuse them.
    """
    memo = (query_states.dtype, shared, scaling)
    found = getattr(prefix_kv, "_operands", None)
    if found is not None and found[0] == memo:
        return found[1]
    key, value = in_dtype_of(prefix_kv[0], query_states), in_dtype_of(prefix_kv[1], query_states)
    if shared:
        key, value = key[0], value[0]
    else:
        batch, heads = query_states.shape[:2]
        key, value = _rows(key, batch, heads), _rows(value, batch, heads)
    operands = (key.transpose(1, 2) * scaling, value, value.new_zeros(()))
    if _keeps(prefix_kv):
        prefix_kv._operands = (memo, operands)
    return operands
