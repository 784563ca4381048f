"""Attention masks for keys laid out as ``[prefix ; real keys]``.

Shared by every fork family: the rule is the same everywhere, only the
surrounding upstream code differs.
"""

from __future__ import annotations

from typing import Optional

import torch


def prefixed_mask(
    mask: Optional[torch.Tensor],
    n_prefix: int,
    query_len: int,
    key_len: int,
    causal: bool,
    boolean: bool,
    dtype: torch.dtype,
    device: torch.device,
    visible: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Return the mask for ``key_len`` keys whose first ``n_prefix`` are a prefix.

    Args:
        mask: The stock mask for the real keys (4-D, boolean "may attend" or
            additive float), or ``None``.
        n_prefix: Prefix columns in front of the real keys.
        query_len: Number of queries.
        key_len: Total number of keys, prefix included.
        causal: Whether the stock attention is causal (decoder self-attention).
        boolean: Build a boolean mask (sdpa) rather than an additive one (eager)
            when one must be built from scratch.
        dtype: Dtype of an additive mask.
        device: Device of a mask built from scratch.
        visible: ``None`` (every row sees every prefix column), or a
            ``(batch, n_prefix)`` bool tensor: which prefix columns each row
            may see (a stacked prefix whose rows have different lengths).
            Hidden columns are masked for that row (``False`` in a boolean
            mask, the dtype's minimum in an additive one); a mask is then
            always returned, also where the stock one is ``None``.

    Returns:
        The stock mask with the prefix columns prepended as always visible;
        ``None`` where the stock mask is ``None`` and no mask is needed (non
        causal, or a single query), which keeps the fast sdpa kernels; an
        explicit causal mask, bottom-right aligned over the real keys, where
        the stock code would rely on ``is_causal`` (PyTorch aligns that
        top-left, so a query would see prefix columns instead of itself).
    """
    if visible is not None:
        return _rowwise(mask, n_prefix, query_len, key_len, causal, boolean, dtype, device, visible)
    if mask is None:
        if not causal or query_len == 1:
            return None
        real_len = key_len - n_prefix
        query_pos = torch.arange(real_len - query_len, real_len, device=device)
        key_pos = torch.arange(real_len, device=device)
        visible = key_pos[None, :] <= query_pos[:, None]
        visible = torch.cat([visible.new_ones(query_len, n_prefix), visible], dim=-1)[None, None]
        if boolean:
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    extra = key_len - mask.shape[-1]
    if extra == 0:
        return mask
    if extra < 0:
        raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys but only {key_len} keys exist")
    columns = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([columns(*mask.shape[:-1], extra), mask], dim=-1)


def _rowwise(mask, n_prefix, query_len, key_len, causal, boolean, dtype, device, visible):
    """:func:`prefixed_mask` with per-row prefix columns: always an explicit mask."""
    if mask is None:
        # The mask the stock code implies: causal (bottom-right) over the real keys, or all visible.
        mask = prefixed_mask(None, 0, query_len, key_len - n_prefix, causal, True, dtype, device)
        if mask is None:
            mask = torch.ones(1, 1, 1, key_len - n_prefix, dtype=torch.bool, device=device)
        if not boolean:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    extra = key_len - mask.shape[-1]
    if extra not in (0, n_prefix):
        raise RuntimeError(
            f"attention mask covers {mask.shape[-1]} keys, expected {key_len - n_prefix} or {key_len} "
            f"({n_prefix} prefix columns)"
        )
    rows = visible.shape[0]
    shape = (max(rows, mask.shape[0]), mask.shape[1], mask.shape[2], n_prefix)
    seen = visible.to(mask.device)[:, None, None, :].expand(shape)
    if extra == 0:  # the mask already spans the prefix columns: hide the invisible ones too
        head = mask[..., :n_prefix].expand(shape)
        head = head & seen if mask.dtype == torch.bool else head.masked_fill(~seen, torch.finfo(mask.dtype).min)
        return torch.cat([head, mask[..., n_prefix:].expand(*shape[:3], -1)], dim=-1)
    if mask.dtype == torch.bool:
        columns = seen
    else:
        columns = torch.zeros(shape, dtype=mask.dtype, device=mask.device).masked_fill(~seen, torch.finfo(mask.dtype).min)
    return torch.cat([columns, mask.expand(*shape[:3], mask.shape[-1])], dim=-1)
