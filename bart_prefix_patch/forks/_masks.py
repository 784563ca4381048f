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

    Returns:
        The stock mask with the prefix columns prepended as always visible;
        ``None`` where the stock mask is ``None`` and no mask is needed (non
        causal, or a single query), which keeps the fast sdpa kernels; an
        explicit causal mask, bottom-right aligned over the real keys, where
        the stock code would rely on ``is_causal`` (PyTorch aligns that
        top-left, so a query would see prefix columns instead of itself).
    """
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
